"""Relayed bodies stream both ways: uploads go up as they arrive, SSE comes down as it comes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import orjson
from aiohttp import web

from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import StartProxy, wait_idle


async def _upstream(first_chunk_seen: asyncio.Event, bodies: list[bytes]) -> web.AppRunner:
    async def upload(request: web.Request) -> web.Response:
        received = await request.content.readany()
        first_chunk_seen.set()
        async for chunk in request.content.iter_any():
            received += chunk
        bodies.append(received)
        return web.json_response({"object": "file", "bytes": len(received)})

    app = web.Application()
    app.router.add_post("/v1/files", upload)
    runner = web.AppRunner(app)
    await runner.setup()
    return runner


async def test_upload_streams_through_before_the_caller_finishes(start_proxy: StartProxy) -> None:
    first_chunk_seen = asyncio.Event()
    bodies: list[bytes] = []
    runner = await _upstream(first_chunk_seen, bodies)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        proxy = await start_proxy(
            {"upstreams": {"fake": {"base_url": f"http://127.0.0.1:{port}/v1"}}}
        )

        async def body() -> AsyncIterator[bytes]:
            yield b"a" * 1000
            # Only sent once the upstream has the first part: a relay that
            # buffered the whole body would never get here.
            async with asyncio.timeout(5):
                await first_chunk_seen.wait()
            yield b"b" * 1000

        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{proxy.base_url}/files", data=body()) as response,
        ):
            assert response.status == 200
            assert orjson.loads(await response.read())["bytes"] == 2000
        assert bodies == [b"a" * 1000 + b"b" * 1000]

        limited = await start_proxy(
            {
                "limits": {"max_body_bytes": "1KiB"},
                "upstreams": {"fake": {"base_url": f"http://127.0.0.1:{port}/v1"}},
            }
        )

        async def too_big() -> AsyncIterator[bytes]:
            for _ in range(8):
                yield b"c" * 512

        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{limited.base_url}/files", data=too_big()) as response,
        ):
            assert response.status == 413
            assert orjson.loads(await response.read())["error"]["code"] == "request_too_large"
        assert len(bodies) == 1  # the cut upload never completed upstream
        await wait_idle(proxy.runtime)
        await wait_idle(limited.runtime)
    finally:
        await runner.cleanup()


async def test_relayed_sse_passes_events_through_as_they_come(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(
        {"routes": [{"match": {"path": "/v1/*"}, "upstream": "fake", "coalesce": False}]}
    )
    fake.hold_after = 3  # the upstream stops after 3 events until released
    body = {"model": "m", "messages": [{"role": "user", "content": "relay"}], "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{proxy.base_url}/chat/completions", json=body) as response,
    ):
        assert response.headers["x-llm-sidecar"] == "bypass"
        seen = b""
        async with asyncio.timeout(5):
            while seen.count(b"\n\n") < 3:
                seen += await response.content.readany()
        fake.release.set()  # only now does the rest exist
        rest = await response.read()
    assert (seen + rest).endswith(b"data: [DONE]\n\n")
    await wait_idle(proxy.runtime)
