"""Scenario 1: relay overhead for non-stream calls, every request a cache miss.

wrk drives `distinct.lua` (a new prompt per request) at 1 and 16
connections against the fake upstream directly and through each hop:
nginx (proxy_pass with upstream keepalive), the bare aiohttp relay,
llm-sidecar on the default policy as shipped (access log on, memory cache:
every request is a miss that is looked up, coalesced, relayed as a plain
call and cached),
the same with the access log off ("quiet") and, in full runs, LiteLLM's
proxy and Portkey's gateway. Each round also runs a fixed number of
requests per hop (`counted.lua`) and reads the CPU time the hop process
and the fake upstream spent on them. Rounds interleave the hops so drift
on a noisy machine hits them all alike; each figure is the median over rounds.

"llm-sidecar 2 targets" is the shipped policy with every route naming two
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
from bench.servers import LITELLM, Lab, ensure_portkey, shipped_policy
from bench.sse_client import chat_body, post_json, session
from bench.wrk import WrkResult, run_wrk

CONCURRENCY = (1, 16)
TOKENS = "8"
SIDECAR = "llm-sidecar"  # the default policy as shipped: the headline row
QUIET = "llm-sidecar quiet"  # the same, access log off
TWO_TARGETS = "llm-sidecar 2 targets"  # the shipped policy, a fallback on every route
SLOW = frozenset({"LiteLLM", "Portkey"})  # fewer requests in their fixed-count runs


@dataclass
class Cell:
    runs: list[WrkResult]
    # Fixed-count runs: CPU seconds of the hop and of the fake, and the requests they served.
    cpu: list[float] = field(default_factory=list)
    upstream_cpu: list[float] = field(default_factory=list)
    counted: list[int] = field(default_factory=list)

    def med(self, attr: str) -> float:
        return median([getattr(r, attr) for r in self.runs])

    @property
    def cpu_per_1k(self) -> float:
        """The hop's CPU seconds per 1,000 requests."""
        pairs = zip(self.cpu, self.counted, strict=True)
        return median([c / n * 1000 for c, n in pairs if n])

    @property
    def upstream_cpu_per_1k(self) -> float:
        pairs = zip(self.upstream_cpu, self.counted, strict=True)
        return median([c / n * 1000 for c, n in pairs if n])

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
    for pair in filter(None, server.extra.get("headers", "").split("|")):
        name, _, value = pair.partition(":")
        headers[name.strip()] = value.strip()
    return headers


def _wrk_args(server: Server, label: str) -> list[str]:
    return [label, TOKENS, server.extra.get("bearer", "-"), "-", server.extra.get("headers", "")]


async def start_hops(ctx: Context, lab: Lab, notes: list[str]) -> tuple[Server, dict[str, Server]]:
    fake = await lab.fake()
    hops: dict[str, Server] = {"direct": fake}
    hops["nginx"] = await lab.nginx(fake)
    hops["bare relay"] = await lab.bare_relay(fake)
    hops[SIDECAR] = await lab.sidecar(shipped_policy(fake.port))
    hops[QUIET] = await lab.sidecar(shipped_policy(fake.port, quiet=True), "llm-sidecar-quiet")
    hops[TWO_TARGETS] = await lab.sidecar(two_target_policy(fake.port), "llm-sidecar-2t")
    if ctx.quick:
        notes.append("LiteLLM and Portkey are left out of quick runs; a full run includes them.")
        return fake, hops
    if LITELLM.exists():
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
    why_not = ensure_portkey()
    if why_not is None:
        try:
            hops["Portkey"] = await lab.portkey(fake)
        except RuntimeError as exc:
            notes.append(f"Portkey did not start: {str(exc).splitlines()[0]}")
    else:
        notes.append(f"Portkey not measured: {why_not}.")
    return fake, hops


def two_target_policy(upstream_port: int) -> dict[str, Any]:
    """The shipped policy with a fallback target on every route; the primary always answers."""
    policy = shipped_policy(upstream_port)
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
            "CPU seconds the hop process alone spent per 1,000 requests, in a run of a fixed "
            f"number of requests per round (counted.lua, at the row's concurrency; "
            f"{ctx.pick(2000, 500):,} per hop, {ctx.pick(200, 50):,} for LiteLLM and Portkey), "
            "fake CPU the fake upstream's in the same run; both share the one server core, so "
            "req/s is about 1 / (hop + fake CPU). llm-sidecar runs the default policy as shipped "
            "(access log on, memory cache: every answer is written to it); llm-sidecar quiet is "
            "the same policy with the access log off and level warning; llm-sidecar 2 targets "
            "is the shipped policy with a second target, never needed, on every route. "
            "Portkey needs a "
            "one-line fix to stream on Node 20 (bench/servers.py, PORTKEY_STREAM_FIX); this "
            "scenario does not stream."
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
            "CPU s/1k req",
            "fake CPU s/1k req",
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
        sidecars = {name: hops[name] for name in (SIDECAR, QUIET, TWO_TARGETS)}
        before = {n: served_counts(await metric_samples(lab, s)) for n, s in sidecars.items()}
        for round_no in range(rounds):
            for conc in CONCURRENCY:
                for name, server in hops.items():
                    await lab.fake_reset(fake)
                    label = f"{ctx.nonce}-{name}-{round_no}-{conc}"
                    result = await run_wrk(
                        server.url,
                        "distinct.lua",
                        _wrk_args(server, label),
                        connections=conc,
                        seconds=seconds,
                    )
                    cell = cells.setdefault((name, conc), Cell([]))
                    cell.runs.append(result)
                    if name == SIDECAR:
                        stats = await lab.fake_stats(fake)
                        section.raw.setdefault("sidecar_upstream_calls", []).append(
                            {"wrk_requests": result.requests, "upstream_calls": stats["total"]}
                        )
                    count = ctx.pick(200, 50) if name in SLOW else ctx.pick(2000, 500)
                    cpu_before, fake_before = server.cpu_seconds(), fake.cpu_seconds()
                    # wrk runs its whole duration even after the last response: size it
                    # from the timed run (the idle rest costs the hop no CPU).
                    expected = count / max(result.rps, 1.0)
                    counted = await run_wrk(
                        server.url,
                        "counted.lua",
                        _wrk_args(server, f"{label}-counted"),
                        connections=conc,
                        seconds=min(60.0, math.ceil(expected * 1.5 + 0.5)),
                        stop_after=count,
                    )
                    cell.cpu.append(server.cpu_seconds() - cpu_before)
                    cell.upstream_cpu.append(fake.cpu_seconds() - fake_before)
                    cell.counted.append(counted.requests)
        for name, server in sidecars.items():
            after = served_counts(await metric_samples(lab, server))
            section.notes.append(
                f"{name} answered (served,status → count, from its /metrics, warm-up "
                f"excluded): {describe_counts(diff_counts(after, before[name]))}."
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
                    num(cell.cpu_per_1k, 3),
                    "—" if name == "direct" else num(cell.upstream_cpu_per_1k, 3),
                    str(cell.errors),
                ]
            )
        section.raw[f"c{conc}"] = {
            name: {
                "rps": cells[(name, conc)].med("rps"),
                "p50_ms": cells[(name, conc)].med("p50_ms"),
                "p99_ms": cells[(name, conc)].med("p99_ms"),
                "cpu_s_per_1k": cells[(name, conc)].cpu_per_1k,
                "fake_cpu_s_per_1k": cells[(name, conc)].upstream_cpu_per_1k,
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


def _ratio_target(
    goal: str,
    value: float,
    base: float,
    unit: str,
    at_most: float | None,
    at_least: float | None = None,
    digits: int = 3,
) -> Target:
    ratio_ = value / base if base > 0 else math.nan
    met = (
        None
        if math.isnan(ratio_)
        else (ratio_ <= at_most if at_most is not None else ratio_ >= (at_least or 0.0))
    )
    return Target(
        "1", goal, f"{value:,.{digits}f}{unit} vs {base:,.{digits}f}{unit} = {ratio_:.2f}x", met
    )


def _targets(section: Section, cells: dict[tuple[str, int], Cell]) -> None:
    side50 = _added(cells, SIDECAR, 1, "p50_ms")
    bare50 = _added(cells, "bare relay", 1, "p50_ms")
    section.targets.append(
        _ratio_target(
            "llm-sidecar (policy as shipped) added p50 at c=1 ≤ 1.2x the bare relay's",
            side50,
            bare50,
            " ms",
            1.2,
        )
    )
    side_rps = cells[(SIDECAR, 16)].med("rps")
    bare_rps = cells[("bare relay", 16)].med("rps")
    section.targets.append(
        _ratio_target(
            "llm-sidecar (policy as shipped) req/s at c=16 ≥ 0.9x the bare relay's",
            side_rps,
            bare_rps,
            "",
            None,
            0.9,
            digits=0,
        )
    )
    side_cpu = cells[(SIDECAR, 16)].cpu_per_1k
    bare_cpu = cells[("bare relay", 16)].cpu_per_1k
    section.targets.append(
        _ratio_target(
            "llm-sidecar (policy as shipped) CPU per request at c=16 ≤ 1.3x the bare relay's",
            side_cpu,
            bare_cpu,
            " CPU-s/1k",
            1.3,
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
    quiet50 = _added(cells, QUIET, 1, "p50_ms")
    quiet_rps = cells[(QUIET, 16)].med("rps")
    section.headline.append(
        f"Overhead (c=1, added p50): nginx {_shown(nginx50)}, bare relay {_shown(bare50)}, "
        f"llm-sidecar {_shown(side50)} ({side50 / bare50 if bare50 else math.nan:.2f}x bare; "
        f"quiet {_shown(quiet50)}). c=16 req/s: direct {direct16:,.0f}, bare relay "
        f"{bare_rps:,.0f}, llm-sidecar {side_rps:,.0f} "
        f"({side_rps / bare_rps if bare_rps else math.nan:.2f}x bare; quiet {quiet_rps:,.0f}). "
        f"CPU per 1,000 requests at c=16: bare relay {bare_cpu:.3f} s, llm-sidecar "
        f"{side_cpu:.3f} s, quiet {cells[(QUIET, 16)].cpu_per_1k:.3f} s."
    )
    for other in ("LiteLLM", "Portkey"):
        if (other, 1) in cells:
            added = _added(cells, other, 1, "p50_ms")
            rps = cells[(other, 16)].med("rps")
            section.headline.append(
                f"{other}: added p50 {_shown(added, 2)} at c=1, {rps:,.0f} req/s at c=16 "
                f"({rps / side_rps if side_rps else math.nan:.2f}x llm-sidecar), "
                f"{cells[(other, 16)].cpu_per_1k:.3f} CPU-s per 1,000 requests."
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
