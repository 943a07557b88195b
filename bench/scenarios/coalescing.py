"""Scenario 5: coalescing savings: 1,000 stream requests over 50 prompts within one second.

Request i is sent at i ms (so all 1,000 within a second) for prompt i mod
50; each answer is a ~1 s stream (100 events, 10 ms apart). The same load
goes once through llm-sidecar and once straight to the fake upstream, with
prompts new to this run. Upstream calls come from the fake's /_fake/stats;
latency is per request, from sending it to its last event.
"""

from __future__ import annotations

import resource
from collections.abc import Awaitable
from typing import Any

import aiohttp

from bench import burst, plots
from bench.burst import EVENTS, PROMPTS, TOKEN_DELAY
from bench.common import (
    Context,
    Section,
    Target,
    describe_counts,
    diff_counts,
    metric_samples,
    num,
    served_counts,
)
from bench.procs import Server
from bench.servers import Lab, sidecar_policy
from bench.sse_client import StreamTiming, chat_body, fake_headers, read_stream


async def _load(ctx: Context, lab: Lab, fake: Server, target: Server, label: str) -> dict[str, Any]:
    await lab.fake_reset(fake)
    url = f"{target.url}/v1/chat/completions"
    headers = fake_headers(EVENTS - 3, TOKEN_DELAY)
    bodies = [chat_body(f"coalesce {ctx.nonce} {label} {p}", stream=True) for p in range(PROMPTS)]

    def read(client: aiohttp.ClientSession, index: int) -> Awaitable[StreamTiming]:
        return read_stream(client, url, bodies[index % PROMPTS], headers)

    cpu = target.cpu_seconds()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    client_cpu = usage.ru_utime + usage.ru_stime
    timings = await burst.send(read)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    client_cpu = usage.ru_utime + usage.ru_stime - client_cpu
    stats = await lab.fake_stats(fake)
    return {
        "label": label,
        **burst.summarise(timings),
        "upstream_calls": stats["total"],
        "server_cpu": target.cpu_seconds() - cpu,
        "client_cpu": client_cpu,
    }


def _mean_ttfb(samples: dict[tuple[str, frozenset[Any]], float]) -> dict[str, float]:
    """Mean proxy-side time to first byte in ms, by how the request was served."""
    out = {}
    for served in ("lead", "follow", "hit"):
        labels = frozenset({("served", served)})
        total = samples.get(("llm_sidecar_time_to_first_byte_seconds_sum", labels), 0.0)
        count = samples.get(("llm_sidecar_time_to_first_byte_seconds_count", labels), 0.0)
        out[served] = total / count * 1000 if count else float("nan")
    return out


async def run(ctx: Context) -> Section:
    section = Section(
        key="coalescing",
        title="5. Coalescing: 1,000 requests, 50 distinct prompts, within one second",
        method=__doc__.split("\n\n", 1)[1].replace("\n", " ").strip(),
        columns=[
            "path",
            "ok",
            "upstream calls",
            "p50 ms",
            "p99 ms",
            "TTFE p50 ms",
            "TTFE p99 ms",
            "sent within s",
            "server CPU s",
            "client CPU s",
        ],
    )
    async with ctx.lab() as lab:
        fake = await lab.fake()
        proxy = await lab.sidecar(sidecar_policy(fake.port))
        await burst.warm([proxy.url], f"warm {ctx.nonce}")
        before = served_counts(await metric_samples(lab, proxy))
        with_proxy = await _load(ctx, lab, fake, proxy, "llm-sidecar")
        samples = await metric_samples(lab, proxy)
        after = served_counts(samples)
        ttfb = _mean_ttfb(samples)
        direct = await _load(ctx, lab, fake, fake, "direct")
    section.notes.append(
        f"llm-sidecar served: {describe_counts(diff_counts(after, before))} (a request "
        "arriving after its stream ended is a cache hit, still no upstream call)."
    )
    section.notes.append(
        "llm-sidecar's own time to first byte (its /metrics histogram, arrival to first event "
        f"written): mean {ttfb['follow']:.3f} ms for followers, {ttfb['lead']:.3f} ms for "
        f"leaders, {ttfb['hit']:.3f} ms for hits. The client-side TTFE above that is the "
        "client's: one Python process reading 1,000 streams (see client CPU) and opening "
        "1,000 connections."
    )
    for r in (direct, with_proxy):
        section.rows.append(
            [
                "direct (no proxy)" if r is direct else "llm-sidecar",
                f"{r['ok']:,}",
                f"{r['upstream_calls']:,}",
                num(r["p50"] * 1000, 0),
                num(r["p99"] * 1000, 0),
                num(r["ttfe_p50"] * 1000, 1),
                num(r["ttfe_p99"] * 1000, 1),
                f"{r['send_spread']:.2f}",
                num(r["server_cpu"], 2),
                num(r["client_cpu"], 2),
            ]
        )
        if r["errors"]:
            section.notes.append(f"{r['label']}: failures: {'; '.join(r['errors'])}")
    section.notes.append(
        "Server CPU is the fake upstream's for the direct path and llm-sidecar's for the other."
    )
    section.raw = {"direct": direct, "llm-sidecar": with_proxy}
    calls = with_proxy["upstream_calls"]
    section.targets.append(
        Target(
            "5",
            f"upstream calls = distinct prompts ({PROMPTS})",
            f"{calls} with llm-sidecar, {direct['upstream_calls']} without",
            calls == PROMPTS,
        )
    )
    section.headline.append(
        f"Coalescing: 1,000 requests over 50 prompts made {calls} upstream calls through "
        f"llm-sidecar vs {direct['upstream_calls']:,} direct; p50/p99 "
        f"{with_proxy['p50'] * 1000:.0f}/{with_proxy['p99'] * 1000:.0f} ms vs "
        f"{direct['p50'] * 1000:.0f}/{direct['p99'] * 1000:.0f} ms direct."
    )
    section.plots.append(
        plots.bars(
            ctx.out_dir / "coalescing.png",
            "Scenario 5: 1,000 stream requests over 50 prompts in 1 s",
            ["upstream calls", "p50 ms", "p99 ms"],
            {
                "direct": [direct["upstream_calls"], direct["p50"] * 1000, direct["p99"] * 1000],
                "llm-sidecar": [calls, with_proxy["p50"] * 1000, with_proxy["p99"] * 1000],
            },
            "count / ms",
        )
    )
    return section
