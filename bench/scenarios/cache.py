"""Scenario 3: cache hits, memory and Redis backends, against the direct fake and the bare relay.

wrk drives `fixed.lua` (one prompt, non-stream) at 1 and 16 connections.
The fake answers instantly with 8 tokens, so "direct" is the fastest an
upstream could possibly be; a hit must beat it to be worth having. Both
llm-sidecars are warmed with the prompt first; their /metrics confirm that
every measured request was served as a hit. The Redis llm-sidecar runs as
configured by default, with its in-process tier in front of Redis (a repeat
is answered without a round trip); the "Redis only" row turns the tier off,
so every hit is a Redis GET.
"""

from __future__ import annotations

from bench import plots
from bench.common import (
    Context,
    Section,
    Target,
    describe_counts,
    diff_counts,
    metric_samples,
    num,
    ratio,
    served_counts,
)
from bench.procs import Server
from bench.scenarios.overhead import CONCURRENCY, TOKENS, Cell
from bench.servers import sidecar_policy
from bench.sse_client import chat_body, post_json, session
from bench.wrk import run_wrk


async def run(ctx: Context) -> Section:
    seconds = ctx.pick(3, 1)
    rounds = ctx.pick(3, 1)
    prompt = f"cache bench {ctx.nonce}"
    section = Section(
        key="cache",
        title="3. Cache hits (non-stream, one prompt)",
        method=__doc__.split("\n\n", 1)[1].replace("\n", " ").strip()
        + f" {seconds} s per run, {rounds} interleaved round(s), median shown.",
        columns=["target", "conc.", "req/s", "vs direct", "vs bare relay", "p50 ms", "p99 ms"],
    )
    cells: dict[tuple[str, int], Cell] = {}
    async with ctx.lab() as lab:
        fake = await lab.fake()
        redis = await lab.redis()
        targets: dict[str, Server] = {
            "direct": fake,
            "bare relay": await lab.bare_relay(fake),
            "llm-sidecar hit (memory)": await lab.sidecar(sidecar_policy(fake.port)),
            "llm-sidecar hit (Redis)": await lab.sidecar(
                sidecar_policy(fake.port, backend="redis", redis_port=redis.port)
            ),
            "llm-sidecar hit (Redis only)": await lab.sidecar(
                sidecar_policy(fake.port, backend="redis", redis_port=redis.port, local_tier=False),
                "llm-sidecar-redis-only",
            ),
        }
        sidecars = [n for n in targets if n.startswith("llm-sidecar")]
        before = {}
        async with session() as client:
            for name in sidecars:
                server = targets[name]
                headers = {"Content-Type": "application/json", "x-fake-tokens": TOKENS}
                url = f"{server.url}/v1/chat/completions"
                first = await post_json(client, url, chat_body(prompt, stream=False), headers)
                second = await post_json(client, url, chat_body(prompt, stream=False), headers)
                section.notes.append(
                    f"{name}: warm-up answered {first.status} {first.served}, "
                    f"then {second.status} {second.served}."
                )
                before[name] = served_counts(await metric_samples(lab, server))
        for _ in range(rounds):
            for conc in CONCURRENCY:
                for name, server in targets.items():
                    await lab.fake_reset(fake)
                    cpu = server.cpu_seconds()
                    result = await run_wrk(
                        server.url,
                        "fixed.lua",
                        [prompt, TOKENS],
                        connections=conc,
                        seconds=seconds,
                    )
                    cell = cells.setdefault((name, conc), Cell([], []))
                    cell.runs.append(result)
                    cell.cpu.append(server.cpu_seconds() - cpu)
        for name in sidecars:
            after = served_counts(await metric_samples(lab, targets[name]))
            section.notes.append(
                f"{name}: answered {describe_counts(diff_counts(after, before[name]))} "
                "during the measured runs."
            )
    for conc in CONCURRENCY:
        direct, bare = cells[("direct", conc)], cells[("bare relay", conc)]
        for name in targets:
            cell = cells[(name, conc)]
            section.rows.append(
                [
                    name,
                    str(conc),
                    num(cell.med("rps")),
                    ratio(cell.med("rps"), direct.med("rps")),
                    ratio(cell.med("rps"), bare.med("rps")),
                    num(cell.med("p50_ms"), 3),
                    num(cell.med("p99_ms"), 3),
                ]
            )
            section.raw[f"{name}/c{conc}"] = [repr(r) for r in cell.runs]
    for name in sidecars[:2]:  # "Redis only" is there to show what the tier saves
        hit50 = cells[(name, 1)].med("p50_ms")
        direct50 = cells[("direct", 1)].med("p50_ms")
        section.targets.append(
            Target(
                "3",
                f"{name}: faster than a direct call at p50 (c=1)",
                f"{hit50:.3f} ms vs {direct50:.3f} ms = {hit50 / direct50:.2f}x",
                hit50 < direct50,
            )
        )
    mem, red, remote = sidecars
    section.headline.append(
        "Cache hits, c=16 req/s: direct "
        f"{cells[('direct', 16)].med('rps'):,.0f}, bare relay "
        f"{cells[('bare relay', 16)].med('rps'):,.0f}, memory "
        f"{cells[(mem, 16)].med('rps'):,.0f}, Redis {cells[(red, 16)].med('rps'):,.0f} "
        f"(Redis only {cells[(remote, 16)].med('rps'):,.0f}); p50 at c=1: direct "
        f"{cells[('direct', 1)].med('p50_ms'):.3f} ms, memory "
        f"{cells[(mem, 1)].med('p50_ms'):.3f} ms, Redis {cells[(red, 1)].med('p50_ms'):.3f} ms "
        f"(Redis only {cells[(remote, 1)].med('p50_ms'):.3f} ms)."
    )
    names = list(targets)
    labels = ["direct", "bare relay", "hit (memory)", "hit (Redis)", "hit (Redis only)"]
    section.plots.append(
        plots.bars(
            ctx.out_dir / "cache_hits.png",
            "Scenario 3: requests/s, one prompt (cache hits for llm-sidecar)",
            labels,
            {f"c={c}": [cells[(n, c)].med("rps") for n in names] for c in CONCURRENCY},
            "requests/s",
        )
    )
    return section
