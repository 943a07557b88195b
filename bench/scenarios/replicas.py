"""Scenario 7: three replicas sharing one Redis, without and with cross-replica coalescing.

Scenario 5's burst (1,000 stream requests over 50 prompts within one second,
each answer ~1 s: 100 events, 10 ms apart), sent round-robin over three
llm-sidecar processes sharing one Redis (the cache and, when on, the
cross-replica path; `cache.timeout` and `cluster.timeout` 1 s, since every
server shares one core): once with `cluster.coalesce_across_replicas` off (each
replica coalesces its own callers), once on. Prompts are new to each run.
Upstream calls come from the fake's /_fake/stats; latency is per request,
from sending it to its last event.

Then the added latency per event of a remote reader: one stream at a time
(100 events, 10 ms apart, first after 300 ms), one reader on the owner
replica and one on another replica, both attached before the first event.
For every event, the remote reader's arrival time minus the owner reader's,
on the client's one clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import aiohttp

from bench import burst
from bench.burst import EVENTS, PROMPTS, TOKEN_DELAY
from bench.common import (
    Context,
    Section,
    Target,
    describe_counts,
    diff_counts,
    metric_samples,
    num,
    percentile,
    served_counts,
)
from bench.procs import Server
from bench.servers import Lab, sidecar_policy
from bench.sse_client import StreamTiming, chat_body, fake_headers, read_stream, session

REPLICAS = 3
PAIRS = 20  # streams for the per-event comparison
PAIR_TTFT = 0.3


def _policy(fake: Server, redis: Server, across: bool) -> dict[str, Any]:
    policy = sidecar_policy(fake.port, backend="redis", redis_port=redis.port)
    # Every server shares one core here (three replicas, Redis, the fake), so a
    # Redis round trip can wait for a time slice: 1 s per call, for the cache
    # and the cross-replica path alike, rather than the default 200 ms, past
    # which the cache's breaker opens and this becomes a fault test (answers
    # never cached, later callers calling again).
    policy["cache"]["timeout"] = "1s"
    policy["cluster"] = {"coalesce_across_replicas": across, "timeout": "1s"}
    # Room for the whole burst on each replica, as in scenario 5's one process.
    wide = {"max_concurrency": 1024, "max_queue": 4096, "queue_timeout": "60s"}
    policy["stages"] = {"leader": wide, "follower": wide, "upstream": wide}
    return policy


async def _burst(
    ctx: Context, lab: Lab, fake: Server, redis: Server, replicas: list[Server], label: str
) -> dict[str, Any]:
    await lab.fake_reset(fake)
    headers = fake_headers(EVENTS - 3, TOKEN_DELAY)
    bodies = [chat_body(f"replicas {ctx.nonce} {label} {p}", stream=True) for p in range(PROMPTS)]

    def read(client: aiohttp.ClientSession, index: int) -> Awaitable[StreamTiming]:
        url = f"{replicas[index % REPLICAS].url}/v1/chat/completions"
        return read_stream(client, url, bodies[(index // REPLICAS) % PROMPTS], headers)

    cpu = sum(r.cpu_seconds() for r in replicas)
    redis_cpu = redis.cpu_seconds()
    before = [served_counts(await metric_samples(lab, r)) for r in replicas]
    timings = await burst.send(read)
    stats = await lab.fake_stats(fake)
    after = [served_counts(await metric_samples(lab, r)) for r in replicas]
    served: dict[str, int] = {}
    for a, b in zip(after, before, strict=True):
        for key, value in diff_counts(a, b).items():
            served[key] = served.get(key, 0) + value
    cluster: dict[str, float] = {}
    for replica in replicas:
        for (name, labels), sample in (await metric_samples(lab, replica)).items():
            if name.startswith("llm_sidecar_cluster_") and name.endswith("_total") and sample:
                which = ",".join(v for _, v in sorted(labels))
                key = name.removeprefix("llm_sidecar_cluster_").removesuffix("_total")
                key = f"{key}[{which}]" if which else key
                cluster[key] = cluster.get(key, 0) + sample
    return {
        "label": label,
        **burst.summarise(timings),
        "upstream_calls": stats["total"],
        "server_cpu": sum(r.cpu_seconds() for r in replicas) - cpu,
        "redis_cpu": redis.cpu_seconds() - redis_cpu,
        "served": served,
        "cluster": cluster,
    }


async def _remote_delay(ctx: Context, replicas: list[Server]) -> dict[str, Any]:
    """Per event: the remote reader's arrival minus the owner reader's."""
    owner, remote = replicas[0], replicas[1]
    headers = fake_headers(EVENTS - 3, TOKEN_DELAY, ttft=PAIR_TTFT)
    deltas: list[float] = []
    broken = 0
    async with session(timeout=60) as client:
        for index in range(PAIRS):
            body = chat_body(f"remote delay {ctx.nonce} {index}", stream=True)
            local = asyncio.create_task(
                read_stream(
                    client, f"{owner.url}/v1/chat/completions", body, headers, keep_arrivals=True
                )
            )
            await asyncio.sleep(PAIR_TTFT / 3)  # the owner has claimed the key by now
            far = await read_stream(
                client, f"{remote.url}/v1/chat/completions", body, headers, keep_arrivals=True
            )
            near = await local
            if not (near.ok and far.ok and len(near.arrivals) == len(far.arrivals)):
                broken += 1
                continue
            if far.served != "follow" or near.served != "lead":
                broken += 1
                continue
            deltas += [f - n for f, n in zip(far.arrivals, near.arrivals, strict=True)]
    return {
        "pairs": PAIRS - broken,
        "events": len(deltas),
        "p50": percentile(deltas, 50),
        "p90": percentile(deltas, 90),
        "p99": percentile(deltas, 99),
    }


async def run(ctx: Context) -> Section:
    section = Section(
        key="replicas",
        title="7. Three replicas, one Redis: scenario 5's burst without and with "
        "cross-replica coalescing",
        method=__doc__.split("\n\n", 1)[1].replace("\n", " ").strip(),
        columns=[
            "cross-replica",
            "ok",
            "upstream calls",
            "p50 ms",
            "p99 ms",
            "TTFE p50 ms",
            "TTFE p99 ms",
            "server CPU s",
            "Redis CPU s",
        ],
    )
    results: dict[str, dict[str, Any]] = {}
    delay: dict[str, Any] = {}
    for across in (False, True):
        label = "on" if across else "off"
        async with ctx.lab() as lab:
            fake = await lab.fake()
            redis = await lab.redis()
            replicas = [
                await lab.sidecar(_policy(fake, redis, across), name=f"replica{i}")
                for i in range(REPLICAS)
            ]
            await burst.warm([r.url for r in replicas], f"warm {ctx.nonce} {label}")
            results[label] = await _burst(ctx, lab, fake, redis, replicas, label)
            if across:
                delay = await _remote_delay(ctx, replicas)
    off, on = results["off"], results["on"]
    for r in (off, on):
        section.rows.append(
            [
                r["label"],
                f"{r['ok']:,}",
                f"{r['upstream_calls']:,}",
                num(r["p50"] * 1000, 0),
                num(r["p99"] * 1000, 0),
                num(r["ttfe_p50"] * 1000, 1),
                num(r["ttfe_p99"] * 1000, 1),
                num(r["server_cpu"], 2),
                num(r["redis_cpu"], 2),
            ]
        )
        section.notes.append(f"served with it {r['label']}: {describe_counts(r['served'])}")
        if r["cluster"]:
            counts = ", ".join(f"{k}: {v:,.0f}" for k, v in sorted(r["cluster"].items()))
            section.notes.append(f"cross-replica counters (3 replicas, whole run): {counts}")
        if r["errors"]:
            section.notes.append(f"{r['label']}: failures: {'; '.join(r['errors'])}")
    section.notes.append(
        f"Remote reader vs reader on the owner, per event ({delay['events']:,} events over "
        f"{delay['pairs']} streams): p50 {delay['p50'] * 1000:.3f} ms, p90 "
        f"{delay['p90'] * 1000:.3f} ms, p99 {delay['p99'] * 1000:.3f} ms added."
    )
    section.notes.append(
        "Server CPU is the three replicas' together; Redis serves the shared cache in both runs."
    )
    section.raw = {"off": off, "on": on, "remote_delay": delay}
    section.targets.append(
        Target(
            "7",
            f"upstream calls = distinct prompts ({PROMPTS}) across {REPLICAS} replicas",
            f"{on['upstream_calls']} with it on, {off['upstream_calls']} with it off",
            on["upstream_calls"] == PROMPTS,
        )
    )
    section.targets.append(
        Target(
            "7",
            "a remote reader's added latency per event under 1 ms at p50",
            f"{delay['p50'] * 1000:.3f} ms",
            delay["p50"] < 0.001,
        )
    )
    section.headline.append(
        f"Three replicas, 1,000 requests over 50 prompts: {on['upstream_calls']} upstream calls "
        f"with cross-replica coalescing vs {off['upstream_calls']} without; p50/p99 "
        f"{on['p50'] * 1000:.0f}/{on['p99'] * 1000:.0f} ms vs "
        f"{off['p50'] * 1000:.0f}/{off['p99'] * 1000:.0f} ms; a remote reader gets each event "
        f"{delay['p50'] * 1000:.2f} ms (p50) after a reader on the owner."
    )
    return section
