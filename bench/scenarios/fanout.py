"""Scenario 4: fan-out of one 200-event stream to 1 … 1,000 readers through llm-sidecar.

Every reader asks for the same prompt (new for each reader count), so one
leads and the rest follow one upstream call. The fake waits `TTFT` before
the first event and 5 ms between events; the readers all attach during
that wait (checked on /status), so the whole stream is fanned out live.
The upstream's own duration is measured in the same run by one reader
straight to the fake with the same request. Times run from the moment the
first request is sent; "streaming part" subtracts the TTFT from both sides.
A fresh llm-sidecar serves each reader count, so its peak RSS (VmHWM) and
CPU time belong to that count alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from typing import Any

from bench import plots
from bench.common import Context, Section, Target, metric_samples, num, percentile, served_counts
from bench.procs import Server
from bench.servers import Lab, sidecar_policy
from bench.sse_client import StreamTiming, chat_body, fake_headers, read_stream, session

EVENTS = 200
TOKENS = EVENTS - 3
TOKEN_DELAY = 0.005
TTFT = 1.0


def _client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _watch_attach(lab: Lab, proxy: Server, readers: int, until: float) -> float | None:
    """Seconds (perf_counter) at which /status first shows every reader attached."""
    while time.perf_counter() < until:
        with contextlib.suppress(Exception):
            status = await lab.get_json(f"{proxy.url}/status")
            if sum(s.get("readers", 0) for s in status.get("streams", [])) >= readers:
                return time.perf_counter()
        await asyncio.sleep(0.02)
    return None


async def _one_count(
    ctx: Context, lab: Lab, fake: Server, readers: int, upstream: float
) -> dict[str, Any]:
    proxy = await lab.sidecar(sidecar_policy(fake.port), name=f"llm-sidecar-fanout{readers}")
    try:
        rss_idle = proxy.rss_mib()
        await lab.fake_reset(fake)
        before = served_counts(await metric_samples(lab, proxy))
        cpu_before, client_before = proxy.cpu_seconds(), _client_cpu()
        body = chat_body(f"fanout {ctx.nonce} {readers}", stream=True)
        headers = fake_headers(TOKENS, TOKEN_DELAY, TTFT)
        url = f"{proxy.url}/v1/chat/completions"
        async with session(timeout=120) as client:
            t0 = time.perf_counter()
            tasks = [
                asyncio.create_task(read_stream(client, url, body, headers)) for _ in range(readers)
            ]
            watch = asyncio.create_task(_watch_attach(lab, proxy, readers, t0 + TTFT + 5))
            async with asyncio.timeout(120):
                timings: list[StreamTiming] = await asyncio.gather(*tasks)
                attached = await watch
        cpu = proxy.cpu_seconds() - cpu_before
        client_cpu = _client_cpu() - client_before
        after = served_counts(await metric_samples(lab, proxy))
        stats = await lab.fake_stats(fake)
        ok = [t for t in timings if t.ok and t.events == EVENTS]
        finish = [t.last_at - t0 for t in ok]
        last = max(finish) if len(ok) == readers else float("nan")
        result = {
            "readers": readers,
            "ok": len(ok),
            "errors": sorted({f"{t.status} {t.error}".strip() for t in timings if not t.ok})[:5],
            "last": last,
            "p50_finish": percentile(finish, 50),
            "ratio": last / upstream,
            "ratio_stream": (last - TTFT) / (upstream - TTFT),
            "attach": None if attached is None else attached - t0,
            "upstream_calls": stats["total"],
            "served": {k: int(after.get(k, 0) - before.get(k, 0)) for k in after},
            "proxy_cpu": cpu,
            "client_cpu": client_cpu,
            "rss_idle": rss_idle,
            "rss_peak": proxy.peak_rss_mib(),
        }
        return result
    finally:
        lab.stop(proxy)


async def run(ctx: Context) -> Section:
    counts: tuple[int, ...] = ctx.pick((1, 10, 100, 1000), (1, 1000))
    section = Section(
        key="fanout",
        title="4. Fan-out: one 200-event stream to many readers",
        method=__doc__.split("\n\n", 1)[1].replace("\n", " ").strip()
        + f" TTFT {TTFT:.1f} s, token delay {TOKEN_DELAY * 1000:.0f} ms.",
        columns=[
            "readers",
            "ok",
            "last reader done s",
            "x upstream",
            "x upstream (streaming part)",
            "all attached at s",
            "upstream calls",
            "proxy CPU s",
            "client CPU s",
            "proxy RSS idle → peak MiB",
        ],
    )
    results: list[dict[str, Any]] = []
    async with ctx.lab() as lab:
        fake = await lab.fake()
        async with session() as client:
            direct = await read_stream(
                client,
                f"{fake.url}/v1/chat/completions",
                chat_body(f"fanout {ctx.nonce} direct", stream=True),
                fake_headers(TOKENS, TOKEN_DELAY, TTFT),
            )
        if not direct.ok:
            raise RuntimeError(
                f"the direct reference stream failed: {direct.status} {direct.error}"
            )
        upstream = direct.total
        for readers in counts:
            results.append(await _one_count(ctx, lab, fake, readers, upstream))
    section.raw = {"upstream": upstream, "results": results}
    for r in results:
        attach = "n/a" if r["attach"] is None else f"{r['attach']:.2f}"
        section.rows.append(
            [
                f"{r['readers']:,}",
                f"{r['ok']:,}",
                num(r["last"], 3),
                f"{r['ratio']:.2f}",
                f"{r['ratio_stream']:.2f}",
                attach,
                str(r["upstream_calls"]),
                num(r["proxy_cpu"], 2),
                num(r["client_cpu"], 2),
                f"{r['rss_idle']:.0f} → {r['rss_peak']:.0f}",
            ]
        )
        if r["errors"]:
            section.notes.append(f"{r['readers']} readers: failures: {'; '.join(r['errors'])}")
        if r["attach"] is None or r["attach"] > TTFT:
            section.notes.append(
                f"{r['readers']} readers: not all attached before the first event "
                "(late ones were replayed the log first)."
            )
    section.notes.insert(
        0,
        f"Upstream's own duration (one direct reader): {upstream:.3f} s, of which "
        f"{TTFT:.1f} s TTFT and {upstream - TTFT:.3f} s streaming.",
    )
    section.notes.append(
        "Served counts per reader count: "
        + "; ".join(
            f"{r['readers']}: " + ", ".join(f"{k} {v}" for k, v in r["served"].items() if v)
            for r in results
        )
    )
    section.notes.append(
        "Client CPU is the bench process (the asyncio readers, on their own core); when it "
        "nears the wall time the client, not the proxy, is what the figure measures."
    )
    biggest = results[-1]
    section.targets.append(
        Target(
            "4",
            f"{biggest['readers']:,} readers finish within 1.5x the upstream's own duration",
            f"{biggest['ratio']:.2f}x overall, {biggest['ratio_stream']:.2f}x for the "
            "streaming part",
            biggest["ratio_stream"] <= 1.5 if biggest["ok"] == biggest["readers"] else False,
        )
    )
    section.headline.append(
        f"Fan-out of one 200-event stream: {biggest['readers']:,} readers done in "
        f"{biggest['last']:.2f} s vs the upstream's {upstream:.2f} s ({biggest['ratio']:.2f}x; "
        f"{biggest['ratio_stream']:.2f}x after the {TTFT:.0f} s TTFT), "
        f"{biggest['upstream_calls']} upstream call, proxy {biggest['proxy_cpu']:.2f} CPU-s, "
        f"peak RSS {biggest['rss_peak']:.0f} MiB."
    )
    xs = [float(r["readers"]) for r in results]
    section.plots.append(
        plots.lines(
            ctx.out_dir / "fanout.png",
            "Scenario 4: time until the last reader is done / upstream's own duration",
            xs,
            {
                "overall": [r["ratio"] for r in results],
                "streaming part (TTFT subtracted)": [r["ratio_stream"] for r in results],
            },
            "readers",
            "x upstream duration",
            logx=True,
            hline=1.5,
            hline_label="target 1.5x",
        )
    )
    section.plots.append(
        plots.bars(
            ctx.out_dir / "fanout_resources.png",
            "Scenario 4: proxy CPU-seconds and peak RSS per reader count",
            [f"{r['readers']:,}" for r in results],
            {
                "proxy CPU s": [r["proxy_cpu"] for r in results],
                "client CPU s": [r["client_cpu"] for r in results],
                "peak RSS / 100 MiB": [r["rss_peak"] / 100 for r in results],
            },
            "seconds / 100 MiB",
        )
    )
    return section
