"""An upstream that answers 101 Switching Protocols: the caller gets an
OpenAI-style 502, on relayed and coalesced routes. (aiohttp itself skips
other 1xx heads and waits for the final one, bounded by first_byte_timeout.)"""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from tests.conftest import StartProxy, wait_idle

ANSWERS = {
    "101": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
}


@pytest.mark.parametrize("answer", sorted(ANSWERS))
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("POST", "/chat/completions", {"model": "m", "messages": []}), ("GET", "/models", None)],
)
async def test_an_informational_answer_is_a_502(
    start_proxy: StartProxy, answer: str, method: str, path: str, body: object
) -> None:
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(ANSWERS[answer])
        await writer.drain()
        await reader.read()  # hold the connection until the proxy drops it
        writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = await start_proxy(
            {"upstreams": {"fake": {"base_url": f"http://127.0.0.1:{port}/v1"}}}
        )
        async with (
            aiohttp.ClientSession() as session,
            asyncio.timeout(10),
            session.request(method, proxy.base_url + path, json=body) as response,
        ):
            status, data = response.status, await response.read()
            served = response.headers.get("x-llm-sidecar")
        assert (status, served) == (502, "error")
        assert orjson.loads(data)["error"]["code"] == "upstream_unavailable"
        await wait_idle(proxy.runtime)
    finally:
        server.close()
