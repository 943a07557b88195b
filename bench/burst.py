"""Scenario 5's burst, which scenario 7 sends again over three replicas.

1,000 stream requests, request i sent at i ms, for prompt i mod 50; each
answer is a ~1 s stream (100 events, 10 ms apart). `send` paces them and
`summarise` turns their timings into the figures both scenarios report.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp

from bench.common import percentile
from bench.sse_client import StreamTiming, chat_body, fake_headers, read_stream, session

REQUESTS = 1000
PROMPTS = 50
SPREAD = 1.0  # seconds over which the requests are sent
EVENTS = 100
TOKEN_DELAY = 0.010


async def warm(urls: Sequence[str], prompt: str) -> None:
    """One throwaway stream per server, so pools and imports are not measured."""
    async with session() as client:
        for index, url in enumerate(urls):
            await read_stream(
                client,
                f"{url}/v1/chat/completions",
                chat_body(f"{prompt} {index}", stream=True),
                fake_headers(8),
            )


async def send(
    read: Callable[[aiohttp.ClientSession, int], Awaitable[StreamTiming]],
) -> list[StreamTiming]:
    """`read(client, i)` for every request i, each started at its own moment."""

    async def one(client: aiohttp.ClientSession, index: int, at: float) -> StreamTiming:
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        return await read(client, index)

    async with session(timeout=120) as client:
        t0 = time.perf_counter() + 0.05
        tasks = [one(client, i, t0 + i * SPREAD / REQUESTS) for i in range(REQUESTS)]
        async with asyncio.timeout(120):
            return await asyncio.gather(*tasks)


def summarise(timings: Sequence[StreamTiming]) -> dict[str, Any]:
    """Whole answers, failures and latencies of one burst (seconds)."""
    ok = [t for t in timings if t.ok and t.events == EVENTS]
    totals = [t.total for t in ok]
    return {
        "ok": len(ok),
        "errors": sorted({f"{t.status} {t.error}".strip() for t in timings if not t.ok})[:5],
        "p50": percentile(totals, 50),
        "p99": percentile(totals, 99),
        "ttfe_p50": percentile([t.ttfe for t in ok], 50),
        "ttfe_p99": percentile([t.ttfe for t in ok], 99),
        "send_spread": max(t.sent for t in timings) - min(t.sent for t in timings),
    }
