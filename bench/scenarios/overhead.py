"""Scenario 1: relay overhead for non-stream calls, every request a cache miss.

wrk drives `distinct.lua` (a new prompt per request) at 1 and 16
connections against the fake upstream directly and through each hop:
nginx (proxy_pass with upstream keepalive), the bare aiohttp relay,
llm-sidecar (coalescing and memory cache on, so every request is a miss
that is looked up, coalesced, relayed as a plain call and cached) and,
when it installed, LiteLLM's proxy. Rounds interleave the hops so drift on
a noisy machine hits them all alike; each figure is the median over rounds.

"llm-sidecar 2 targets" is the same policy with every route naming two
targets (a primary that always answers and a fallback never needed): what
the retry machinery costs a request that needs no retry.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

from bench import plots
from bench.common import (
    Context,
    Section,
    Target,
    added_text,
    describe_counts,
    diff_counts,
    median,
    metric_samples,
    num,
    ratio,
    served_counts,
)
from bench.procs import Server
from bench.servers import LITELLM, Lab, sidecar_policy
from bench.sse_client import chat_body, post_json, session
from bench.wrk import WrkResult, run_wrk

CONCURRENCY = (1, 16)
TOKENS = "8"
TWO_TARGETS = "llm-sidecar 2 targets"


@dataclass
class Cell:
    runs: list[WrkResult]
    cpu: list[float]  # hop CPU seconds per run
    upstream_cpu: list[float] = field(default_factory=list)  # the fake's, per run (hops only)

    def med(self, attr: str) -> float:
        return median([getattr(r, attr) for r in self.runs])

    @property
    def cpu_us_per_request(self) -> float:
        per = [c / r.requests * 1e6 for c, r in zip(self.cpu, self.runs, strict=True) if r.requests]
        return median(per)

    @property
    def upstream_cpu_us_per_request(self) -> float:
        pairs = zip(self.upstream_cpu, self.runs, strict=False)
        return median([c / r.requests * 1e6 for c, r in pairs if r.requests])

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.runs)


async def warm(lab: Lab, server: Server, nonce: str, count: int = 100) -> list[str]:
    """A few requests so pools and caches are set up; returns distinct failures."""
    failures: set[str] = set()
    async with session() as client:
        for index in range(count):
            body = chat_body(f"warm {nonce} {index}", stream=False)
            timing = await post_json(
                client,
                f"{server.url}/v1/chat/completions",
                body,
                _headers(server),
            )
            if timing.status != 200:
                failures.add(f"{timing.status} {timing.error}".strip())
    return sorted(failures)


def _headers(server: Server) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "x-fake-tokens": TOKENS}
    if "bearer" in server.extra:
        headers["Authorization"] = f"Bearer {server.extra['bearer']}"
    return headers


def _wrk_args(server: Server, label: str) -> list[str]:
    return [label, TOKENS, *([server.extra["bearer"]] if "bearer" in server.extra else [])]


async def start_hops(ctx: Context, lab: Lab, notes: list[str]) -> tuple[Server, dict[str, Server]]:
    fake = await lab.fake()
    hops: dict[str, Server] = {"direct": fake}
    hops["nginx"] = await lab.nginx(fake)
    hops["bare relay"] = await lab.bare_relay(fake)
    hops["llm-sidecar"] = await lab.sidecar(sidecar_policy(fake.port))
    hops[TWO_TARGETS] = await lab.sidecar(two_target_policy(fake.port), "llm-sidecar-2t")
    if ctx.quick:
        notes.append("LiteLLM (scenario 7) is left out of quick runs; a full run includes it.")
    elif LITELLM.exists():
        try:
            hops["LiteLLM"] = await lab.litellm(fake)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            notes.append(f"LiteLLM (scenario 7) was installed but did not start: {first}")
    else:
        notes.append(
            f"LiteLLM (scenario 7) not measured: {LITELLM} is missing "
            "(pip install 'litellm[proxy]' into /tmp/bench-tools-venv to include it)."
        )
    return fake, hops


def two_target_policy(upstream_port: int) -> dict[str, Any]:
    """The bench policy with a fallback target on every route; the primary always answers."""
    policy = sidecar_policy(upstream_port)
    policy["upstreams"]["backup"] = {"base_url": f"http://127.0.0.1:{upstream_port}/v1"}
    for route in policy["routes"]:
        route["targets"] = [{"upstream": route.pop("upstream")}, {"upstream": "backup"}]
    return policy


async def run(ctx: Context) -> Section:
    seconds = ctx.pick(3, 1)
    rounds = ctx.pick(3, 1)
    section = Section(
        key="overhead",
        title="1. Relay overhead (non-stream, every request a miss)",
        method=(
            f"wrk, `distinct.lua` (a new prompt per request, {TOKENS} tokens), {seconds} s per "
            f"run, {rounds} interleaved round(s), median shown. Added latency is the hop's "
            "percentile minus the direct percentile at the same concurrency. Hop CPU is the "
            "CPU time of the hop process alone per request, fake CPU the fake upstream's; both "
            "share the one server core, so req/s is about 1 / (hop + fake CPU). "
            "llm-sidecar asks the upstream in the caller's mode (a plain call, the caller's "
            "bytes), and writes each answer to its memory cache."
        ),
        columns=[
            "hop",
            "conc.",
            "req/s",
            "vs direct",
            "p50 ms",
            "p99 ms",
            "added p50 ms",
            "added p99 ms",
            "hop CPU µs/req",
            "fake CPU µs/req",
            "errors",
        ],
    )
    cells: dict[tuple[str, int], Cell] = {}
    async with ctx.lab() as lab:
        fake, hops = await start_hops(ctx, lab, section.notes)
        for name, server in hops.items():
            failures = await warm(lab, server, f"{ctx.nonce}-{name}", ctx.pick(200, 50))
            if failures:
                section.notes.append(f"{name}: warm-up failures: {'; '.join(failures)}")
        sidecar = hops["llm-sidecar"]
        before = served_counts(await metric_samples(lab, sidecar))
        for round_no in range(rounds):
            for conc in CONCURRENCY:
                for name, server in hops.items():
                    await lab.fake_reset(fake)
                    cpu_before, fake_before = server.cpu_seconds(), fake.cpu_seconds()
                    result = await run_wrk(
                        server.url,
                        "distinct.lua",
                        _wrk_args(server, f"{ctx.nonce}-{name}-{round_no}-{conc}"),
                        connections=conc,
                        seconds=seconds,
                    )
                    cpu = server.cpu_seconds() - cpu_before
                    cell = cells.setdefault((name, conc), Cell([], []))
                    cell.runs.append(result)
                    cell.cpu.append(cpu)
                    if server is not fake:
                        cell.upstream_cpu.append(fake.cpu_seconds() - fake_before)
                    if name == "llm-sidecar":
                        stats = await lab.fake_stats(fake)
                        section.raw.setdefault("sidecar_upstream_calls", []).append(
                            {"wrk_requests": result.requests, "upstream_calls": stats["total"]}
                        )
        after = served_counts(await metric_samples(lab, sidecar))
        section.notes.append(
            "llm-sidecar answered (served,status → count, from its /metrics, warm-up "
            f"excluded): {describe_counts(diff_counts(after, before))}."
        )
        for server in hops.values():
            with contextlib.suppress(OSError):
                section.raw.setdefault("peak_rss_mib", {})[server.name] = server.peak_rss_mib()
    _rows(section, cells, hops)
    _targets(section, cells)
    _plot(ctx, section, cells, list(hops))
    return section


def _rows(section: Section, cells: dict[tuple[str, int], Cell], hops: dict[str, Server]) -> None:
    for conc in CONCURRENCY:
        direct = cells[("direct", conc)]
        for name in hops:
            cell = cells[(name, conc)]
            added50 = cell.med("p50_ms") - direct.med("p50_ms")
            added99 = cell.med("p99_ms") - direct.med("p99_ms")
            section.rows.append(
                [
                    name,
                    str(conc),
                    num(cell.med("rps")),
                    ratio(cell.med("rps"), direct.med("rps")),
                    num(cell.med("p50_ms"), 3),
                    num(cell.med("p99_ms"), 3),
                    # One wrk run per round gives no spread to estimate noise
                    # from; only the impossible negative cost is named as noise.
                    "—" if name == "direct" else added_text(added50, 0.0, 3),
                    "—" if name == "direct" else added_text(added99, 0.0, 3),
                    num(cell.cpu_us_per_request, 0),
                    num(
                        cell.cpu_us_per_request
                        if name == "direct"
                        else cell.upstream_cpu_us_per_request,
                        0,
                    ),
                    str(cell.errors),
                ]
            )
        section.raw[f"c{conc}"] = {
            name: {
                "rps": cells[(name, conc)].med("rps"),
                "p50_ms": cells[(name, conc)].med("p50_ms"),
                "p99_ms": cells[(name, conc)].med("p99_ms"),
                "cpu_us_per_request": cells[(name, conc)].cpu_us_per_request,
                "runs": [r.__repr__() for r in cells[(name, conc)].runs],
            }
            for name in hops
        }


def _added(cells: dict[tuple[str, int], Cell], name: str, conc: int, attr: str) -> float:
    return cells[(name, conc)].med(attr) - cells[("direct", conc)].med(attr)


def _shown(added_ms: float, digits: int = 3) -> str:
    """An added latency for a headline: a negative one is noise, never a saving."""
    text = added_text(added_ms, 0.0, digits)
    return text if text in ("n/a", "within noise") else f"{text} ms"


def _targets(section: Section, cells: dict[tuple[str, int], Cell]) -> None:
    side50 = _added(cells, "llm-sidecar", 1, "p50_ms")
    bare50 = _added(cells, "bare relay", 1, "p50_ms")
    p50_ratio = side50 / bare50 if bare50 > 0 else math.nan
    section.targets.append(
        Target(
            "1",
            "llm-sidecar added p50 at c=1 ≤ 1.2x the bare relay's",
            f"{side50:.3f} ms vs {bare50:.3f} ms = {p50_ratio:.2f}x",
            None if math.isnan(p50_ratio) else p50_ratio <= 1.2,
        )
    )
    side_rps = cells[("llm-sidecar", 16)].med("rps")
    bare_rps = cells[("bare relay", 16)].med("rps")
    rps_ratio = side_rps / bare_rps if bare_rps else math.nan
    section.targets.append(
        Target(
            "1",
            "llm-sidecar req/s at c=16 ≥ 0.9x the bare relay's",
            f"{side_rps:,.0f} vs {bare_rps:,.0f} = {rps_ratio:.2f}x",
            None if math.isnan(rps_ratio) else rps_ratio >= 0.9,
        )
    )
    two50 = _added(cells, TWO_TARGETS, 1, "p50_ms")
    two_rps = cells[(TWO_TARGETS, 16)].med("rps")
    section.targets.append(
        Target(
            "1",
            "two-target route: added p50 at c=1 within 0.1 ms of the one-target route's",
            f"{two50:.3f} ms vs {side50:.3f} ms ({two50 - side50:+.3f} ms); c=16 req/s "
            f"{two_rps:,.0f} vs {side_rps:,.0f}",
            two50 - side50 <= 0.1,
        )
    )
    direct16 = cells[("direct", 16)].med("rps")
    nginx50 = _added(cells, "nginx", 1, "p50_ms")
    section.headline.append(
        f"Overhead (c=1, added p50): nginx {_shown(nginx50)}, bare relay {_shown(bare50)}, "
        f"llm-sidecar {_shown(side50)} ({p50_ratio:.2f}x bare). c=16 req/s: direct "
        f"{direct16:,.0f}, bare relay {bare_rps:,.0f}, llm-sidecar {side_rps:,.0f} "
        f"({rps_ratio:.2f}x bare)."
    )
    if ("LiteLLM", 1) in cells:
        lite50 = _added(cells, "LiteLLM", 1, "p50_ms")
        lite_rps = cells[("LiteLLM", 16)].med("rps")
        section.headline.append(
            f"LiteLLM proxy: added p50 {_shown(lite50, 2)} at c=1, {lite_rps:,.0f} req/s at c=16 "
            f"({lite_rps / side_rps if side_rps else math.nan:.2f}x llm-sidecar)."
        )


def _plot(
    ctx: Context, section: Section, cells: dict[tuple[str, int], Cell], names: list[str]
) -> None:
    hops = [n for n in names if n != "direct"]
    section.plots.append(
        plots.bars(
            ctx.out_dir / "overhead_added_latency.png",
            "Scenario 1: latency added to a non-stream call, concurrency 1 (ms)",
            hops,
            {
                "added p50": [_added(cells, n, 1, "p50_ms") for n in hops],
                "added p99": [_added(cells, n, 1, "p99_ms") for n in hops],
            },
            "ms over direct",
        )
    )
    section.plots.append(
        plots.bars(
            ctx.out_dir / "overhead_throughput.png",
            "Scenario 1: requests/s, every request a miss",
            names,
            {f"c={c}": [cells[(n, c)].med("rps") for n in names] for c in CONCURRENCY},
            "requests/s",
        )
    )
