"""The asyncio load generator for SSE scenarios (aiohttp client, uvloop).

`read_stream` sends one chat completion with `stream: true` and records, on
the client's clock (time.perf_counter), when it was sent, when the response
headers arrived, when the first and the last SSE event were complete, and
optionally the arrival time of every event. Keep-alive comments (lines that
start with ':') are not events.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

SERVED_BY = "x-llm-sidecar"


@dataclass(slots=True)
class StreamTiming:
    sent: float
    status: int = 0
    served: str = ""
    headers_at: float = 0.0
    first_at: float = 0.0
    last_at: float = 0.0
    events: int = 0
    done: bool = False  # saw `data: [DONE]`
    error: str = ""
    arrivals: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and not self.error

    @property
    def ttfe(self) -> float:
        return self.first_at - self.sent

    @property
    def total(self) -> float:
        return self.last_at - self.sent


def chat_body(prompt: str, *, stream: bool) -> bytes:
    body: dict[str, Any] = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": prompt}],
    }
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


def fake_headers(tokens: int, token_delay: float = 0.0, ttft: float = 0.0) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "x-fake-tokens": str(tokens),
        "x-fake-token-delay": repr(token_delay),
        "x-fake-ttft": repr(ttft),
    }


def session(connections: int = 0, timeout: float = 120.0) -> aiohttp.ClientSession:
    """A client session with no pool limit (every concurrent reader its own connection)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, force_close=False),
        timeout=aiohttp.ClientTimeout(total=timeout),
        # Keep-alive frames and 200-event logs need no auto-decompression.
        auto_decompress=False,
    )


async def read_stream(
    client: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    keep_arrivals: bool = False,
) -> StreamTiming:
    """One SSE request, read to the end; never raises for a failed request."""
    timing = StreamTiming(sent=time.perf_counter())
    pending = b""
    try:
        async with client.post(url, data=body, headers=headers) as response:
            timing.headers_at = time.perf_counter()
            timing.status = response.status
            timing.served = response.headers.get(SERVED_BY, "")
            if response.status != 200:
                timing.error = (await response.read())[:200].decode(errors="replace")
                return timing
            async for chunk in response.content.iter_any():
                now = time.perf_counter()
                pending += chunk
                if b"\n\n" not in pending:
                    continue
                *blocks, pending = pending.split(b"\n\n")
                for block in blocks:
                    if not block.startswith(b"data:"):
                        continue  # a comment (keep-alive) or an empty line
                    if timing.events == 0:
                        timing.first_at = now
                    timing.events += 1
                    timing.last_at = now
                    if keep_arrivals:
                        timing.arrivals.append(now)
                    if block == b"data: [DONE]":
                        timing.done = True
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        timing.error = f"{type(exc).__name__}: {exc}"
    return timing


@dataclass(slots=True)
class JsonTiming:
    sent: float
    status: int = 0
    served: str = ""
    done_at: float = 0.0
    error: str = ""

    @property
    def latency(self) -> float:
        return self.done_at - self.sent


async def post_json(
    client: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> JsonTiming:
    """One non-stream request, read to the end; never raises for a failed request."""
    timing = JsonTiming(sent=time.perf_counter())
    try:
        async with client.post(url, data=body, headers=headers) as response:
            await response.read()
            timing.status = response.status
            timing.served = response.headers.get(SERVED_BY, "")
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        timing.error = f"{type(exc).__name__}: {exc}"
    timing.done_at = time.perf_counter()
    return timing
