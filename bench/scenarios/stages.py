"""Scenario 6: stage decoupling: new requests are prepared while long streams hold the upstream.

llm-sidecar runs with `leader` at 2 slots and `upstream` at 4; phase
"idle" sends 20 new distinct requests at once with nothing else running,
phase "saturated" first lets 4 long streams take every upstream slot.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench import plots
from bench.common import Context, Section, Target, metric_samples, num, percentile
from bench.procs import Server
from bench.servers import Lab, sidecar_policy
from bench.sse_client import chat_body, fake_headers, post_json, read_stream, session

METHOD = """\
llm-sidecar runs with `leader` at 2 slots and `upstream` at 4. Phase "idle": 20 new
distinct stream requests arrive at once with nothing else running. Phase "saturated":
4 long streams (200 events over {long:.0f} s) first take every upstream slot, then the
same kind of 20 requests arrive. Measured inside the proxy: the leader-stage wait of the
20 (mean, from the delta of `llm_sidecar_stage_wait_seconds{{stage="leader"}}` sum and
count on /metrics), and "all prepared after": polling /status every 10 ms, the first
moment the leader stage is empty and the upstream queue holds all 20, i.e. every new
request has been prepared and waits only for an upstream slot. Measured outside: each
new request's time to first event (it needs an upstream slot, so under saturation that
is when a long stream ends) and cache-hit latency (one warm prompt, 50 sequential
non-stream hits) in both phases. If a leader slot were held for a stream's life, the
saturated leader wait would be the long streams' remaining time, seconds."""

NEW = 20
LONG = 4
HITS = 50
STAGES = {
    "leader": {"max_concurrency": 2, "max_queue": 100, "queue_timeout": "30s"},
    "upstream": {"max_concurrency": LONG, "max_queue": 100, "queue_timeout": "60s"},
}


async def _leader_wait(lab: Lab, proxy: Server) -> tuple[float, float]:
    samples = await metric_samples(lab, proxy)
    labels = frozenset({("stage", "leader")})
    return (
        samples.get(("llm_sidecar_stage_wait_seconds_sum", labels), 0.0),
        samples.get(("llm_sidecar_stage_wait_seconds_count", labels), 0.0),
    )


async def _poll(
    lab: Lab, proxy: Server, t0: float, until: float, out: list[dict[str, Any]]
) -> None:
    while time.perf_counter() < until:
        try:
            status = await lab.get_json(f"{proxy.url}/status")
        except Exception:
            await asyncio.sleep(0.01)
            continue
        stages = status.get("stages", {})
        out.append(
            {
                "t": time.perf_counter() - t0,
                "leader_busy": stages.get("leader", {}).get("in_use", 0)
                + stages.get("leader", {}).get("queued", 0),
                "upstream_in_use": stages.get("upstream", {}).get("in_use", 0),
                "upstream_queued": stages.get("upstream", {}).get("queued", 0),
                "streams": len(status.get("streams", [])),
            }
        )
        await asyncio.sleep(0.01)


async def _phase(
    ctx: Context, lab: Lab, proxy: Server, label: str, long_seconds: float
) -> dict[str, Any]:
    url = f"{proxy.url}/v1/chat/completions"
    hit_body = chat_body(f"stages {ctx.nonce} hit", stream=False)
    json_headers = {"Content-Type": "application/json"}
    async with session(timeout=120) as client:
        longs: list[asyncio.Task[Any]] = []
        if label == "saturated":
            delay = long_seconds / 200
            longs = [
                asyncio.create_task(
                    read_stream(
                        client,
                        url,
                        chat_body(f"stages {ctx.nonce} long {i}", stream=True),
                        fake_headers(197, delay),
                    )
                )
                for i in range(LONG)
            ]
            async with asyncio.timeout(10):
                while True:
                    status = await lab.get_json(f"{proxy.url}/status")
                    if status["stages"]["upstream"]["in_use"] >= LONG:
                        break
                    await asyncio.sleep(0.01)
        wait_sum, wait_count = await _leader_wait(lab, proxy)
        trace: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        poller = asyncio.create_task(_poll(lab, proxy, t0, t0 + long_seconds + 3, trace))
        new = [
            asyncio.create_task(
                read_stream(
                    client,
                    url,
                    chat_body(f"stages {ctx.nonce} {label} new {i}", stream=True),
                    fake_headers(8),
                )
            )
            for i in range(NEW)
        ]
        await asyncio.sleep(0.2)  # the 20 have arrived and been prepared (or are waiting)
        hits = []
        for _ in range(HITS):
            hits.append(await post_json(client, url, hit_body, json_headers))
        async with asyncio.timeout(long_seconds + 30):
            new_timings = await asyncio.gather(*new)
            await asyncio.gather(*longs)
        poller.cancel()
        await asyncio.gather(poller, return_exceptions=True)
        after_sum, after_count = await _leader_wait(lab, proxy)
    # All prepared: the leader stage empty and every new request queued for upstream.
    # (Idle, the new requests go straight through, so there is no queue to watch.)
    prepared = next(
        (p["t"] for p in trace if p["leader_busy"] == 0 and p["upstream_queued"] >= NEW),
        None,
    )
    ok_new = [t for t in new_timings if t.ok]
    waits = max(after_count - wait_count, 1)
    return {
        "label": label,
        "leader_wait_mean": (after_sum - wait_sum) / waits,
        "leader_waits": after_count - wait_count,
        "prepared": prepared,
        "ttfe_p50": percentile([t.ttfe for t in ok_new], 50),
        "ttfe_max": max((t.ttfe for t in ok_new), default=float("nan")),
        "new_ok": len(ok_new),
        "hit_p50": percentile([h.latency for h in hits if h.status == 200], 50),
        "hit_p99": percentile([h.latency for h in hits if h.status == 200], 99),
        "hits_served": sorted({h.served for h in hits}),
        "errors": sorted({f"{t.status} {t.error}".strip() for t in new_timings if not t.ok})[:5],
        "trace": trace,
    }


async def run(ctx: Context) -> Section:
    long_seconds = ctx.pick(4.0, 2.0)
    section = Section(
        key="stages",
        title="6. Stage decoupling: preparation does not wait for long streams",
        method=METHOD.format(long=long_seconds),
        columns=[
            "phase",
            "leader wait mean µs",
            "all 20 prepared after ms",
            "new: TTFE p50 ms",
            "new: TTFE max ms",
            "new ok",
            "cache hit p50 ms",
            "cache hit p99 ms",
        ],
    )
    async with ctx.lab() as lab:
        fake = await lab.fake()
        proxy = await lab.sidecar(sidecar_policy(fake.port, stages=STAGES))
        async with session() as client:  # warm the hit prompt (and pools)
            url = f"{proxy.url}/v1/chat/completions"
            await post_json(
                client,
                url,
                chat_body(f"stages {ctx.nonce} hit", stream=False),
                {"Content-Type": "application/json"},
            )
        idle = await _phase(ctx, lab, proxy, "idle", long_seconds)
        busy = await _phase(ctx, lab, proxy, "saturated", long_seconds)
    for r in (idle, busy):
        prepared = "—" if r["prepared"] is None else num(r["prepared"] * 1000, 0)
        section.rows.append(
            [
                r["label"] if r is idle else f"saturated ({LONG} long streams)",
                num(r["leader_wait_mean"] * 1e6, 1),
                prepared,
                num(r["ttfe_p50"] * 1000, 1),
                num(r["ttfe_max"] * 1000, 1),
                f"{r['new_ok']}/{NEW}",
                num(r["hit_p50"] * 1000, 3),
                num(r["hit_p99"] * 1000, 3),
            ]
        )
        if r["errors"]:
            section.notes.append(f"{r['label']}: failures: {'; '.join(r['errors'])}")
        section.notes.append(
            f"{r['label']}: {int(r['leader_waits'])} leader acquisitions; "
            f"cache requests served as {', '.join(r['hits_served'])}."
        )
    section.notes.append(
        "'All prepared after' is a 10 ms poll of /status, so it has 10 ms resolution and "
        "includes the poll's own round trip (idle, nothing queues, so it does not apply)."
    )
    section.raw = {"idle": idle, "saturated": busy}
    section.headline.append(
        f"Stages: with {LONG} long streams holding every upstream slot, 20 new requests waited "
        f"{busy['leader_wait_mean'] * 1e6:.1f} µs on average for a leader slot (idle: "
        f"{idle['leader_wait_mean'] * 1e6:.1f} µs), were all prepared within "
        f"{(busy['prepared'] or float('nan')) * 1000:.0f} ms, and cache hits took "
        f"{busy['hit_p50'] * 1000:.2f} ms p50 (idle: {idle['hit_p50'] * 1000:.2f} ms)."
    )
    section.targets.append(
        Target(
            "6",
            "preparation does not wait for streams (saturated leader wait < 50 ms)",
            f"{busy['leader_wait_mean'] * 1e6:.1f} µs mean",
            busy["leader_wait_mean"] < 0.05,
        )
    )
    trace = busy["trace"]
    if trace:
        ts = [p["t"] for p in trace]
        marks = {"20 new requests sent": 0.0}
        if busy["prepared"] is not None:
            marks["all 20 prepared"] = busy["prepared"]
        section.plots.append(
            plots.timeline(
                ctx.out_dir / "stages_timeline.png",
                "Scenario 6 (saturated): stage occupancy from /status",
                {
                    "leader in use + queued": (ts, [p["leader_busy"] for p in trace]),
                    "upstream in use": (ts, [p["upstream_in_use"] for p in trace]),
                    "upstream queued": (ts, [p["upstream_queued"] for p in trace]),
                },
                marks,
                "seconds since the 20 new requests were sent",
                "requests",
            )
        )
    return section
