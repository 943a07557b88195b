"""aiohttp's writer as fan-out uses it: fail loudly if its shape changes.

Fan-out frames each event once and writes the bytes straight to every
reader's transport (proxy/reply.py, SSEOut). That relies on what aiohttp
does not promise: `prepare()` returns a `StreamWriter`, `send_headers()`
puts the status line and headers on the wire at once, and our own chunk
frames then pass untouched until `write_eof()` adds the last chunk. A
change there would silently interleave or double-frame bytes; these tests
turn it into a failure. pyproject.toml pins aiohttp below the next series.
"""

from __future__ import annotations

import asyncio
import inspect

from aiohttp import web
from aiohttp.http_writer import StreamWriter

from proxy.sse import chunk_frame

EVENT = b'data: {"a": 1}\n\n'


def test_stream_writer_has_the_shape_fan_out_uses() -> None:
    assert callable(getattr(StreamWriter, "send_headers", None))
    assert list(inspect.signature(StreamWriter.send_headers).parameters) == ["self"]
    assert isinstance(inspect.getattr_static(StreamWriter, "transport"), property)


async def test_frames_written_to_the_transport_after_send_headers_reach_the_wire_as_is() -> None:
    prepared: list[object] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        response.enable_chunked_encoding()
        writer = await response.prepare(request)
        prepared.append(writer)
        assert isinstance(writer, StreamWriter)
        writer.send_headers()
        transport = writer.transport
        assert transport is not None
        transport.write(chunk_frame(EVENT))
        transport.write(chunk_frame(EVENT))
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        server = site._server
        assert isinstance(server, asyncio.Server)
        port = server.sockets[0].getsockname()[1]
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            raw = await reader.read()
            writer.close()
            await writer.wait_closed()
    finally:
        await runner.cleanup()
    assert len(prepared) == 1
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding: chunked" in head.lower()
    assert body == chunk_frame(EVENT) * 2 + b"0\r\n\r\n"
