"""Waiting on a caller's socket, always bounded.

Writes to a caller never wait on its socket without limit: a reply goes out
in pieces of about `stream.write_high_water`, and once that much waits for
a caller its socket must drain within `stream.write_timeout`, or that caller
alone is cut (`ReaderStalled`) and its buffer freed; its request is logged
499 and counted as dropped (`proxy.server.note_dropped`). No stage slot is ever
held across such a wait (DESIGN, Bounds).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.http_writer import StreamWriter

from proxy.policy import StreamSettings
from proxy.server import note_dropped
from proxy.trail import trail_of

# The `reason` label of `llm_sidecar_readers_dropped_total` for a stalled reader.
WRITE_TIMEOUT = "write_timeout"


class ReaderStalled(ConnectionResetError):
    """A caller stopped reading: its socket did not drain within `write_timeout`."""


@contextlib.asynccontextmanager
async def write_deadline(
    transport: asyncio.WriteTransport | None, seconds: float
) -> AsyncIterator[None]:
    """Bound a wait on a caller's socket; past `seconds` the caller is cut.

    `abort`, not `close`: close would keep the buffer to flush it to a
    socket that takes nothing. Only this caller is dropped.
    """
    deadline = asyncio.timeout(seconds)
    try:
        async with deadline:
            yield
    except TimeoutError:
        if not deadline.expired():
            raise
        if transport is not None:
            note_dropped(transport, WRITE_TIMEOUT)
            transport.abort()
        raise ReaderStalled(f"the client's socket did not drain in {seconds:g}s") from None


async def drain_within(writer: StreamWriter, seconds: float) -> None:
    """Wait until the caller's socket is below its low-water mark, or cut it."""
    async with write_deadline(writer.transport, seconds):
        await writer.drain()


async def send_whole(
    request: web.Request, response: web.StreamResponse, settings: StreamSettings
) -> web.StreamResponse:
    """Send a whole-body reply over `write_high_water` in pieces, each wait
    on the caller's socket bounded by `write_timeout`.

    aiohttp would hand the transport the whole body at once and wait on it
    with no bound, so a caller that stops reading would keep a copy of the
    body and its handler forever. Smaller bodies never wait on the socket:
    aiohttp sends those.
    """
    body = response.body if isinstance(response, web.Response) else None
    high_water = settings.write_high_water
    if response.prepared or not isinstance(body, bytes) or len(body) <= high_water:
        return response
    out = web.StreamResponse(status=response.status, reason=response.reason)
    out.headers.extend(response.headers)
    out.content_length = len(body)
    writer = await out.prepare(request)
    assert isinstance(writer, StreamWriter)
    transport = writer.transport
    if transport is None:
        return out  # the caller already left
    transport.set_write_buffer_limits(high=high_water)
    trail = trail_of(request)
    if trail is not None:
        trail.first_byte_at = time.perf_counter()
    view = memoryview(body)
    try:
        for offset in range(0, len(body), high_water):
            await writer.write(view[offset : offset + high_water], drain=False)
            if transport.get_write_buffer_size() > high_water:
                await drain_within(writer, settings.write_timeout)
        await out.write_eof()
    except ConnectionResetError:
        return out  # the caller left or stopped reading; only this reply ends
    if trail is not None:
        trail.bytes_out = len(body)
    return out
