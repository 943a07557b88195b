"""The baseline hop: a bare aiohttp relay (one pooled ClientSession, uvloop), nothing else.

Usage: python -m bench.bare_relay UPSTREAM_ORIGIN PORT. It streams every
answer through as it arrives, so it relays SSE as well as JSON.
"""

import asyncio
import sys

import aiohttp
import uvloop
from aiohttp import web

HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}
SESSION = web.AppKey("session", aiohttp.ClientSession)
ORIGIN = web.AppKey("origin", str)


async def relay(request: web.Request) -> web.StreamResponse:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    url = request.app[ORIGIN] + request.path_qs
    body = await request.read()
    async with request.app[SESSION].request(
        request.method, url, headers=headers, data=body
    ) as upstream:
        out = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP}
        response = web.StreamResponse(status=upstream.status, headers=out)
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def main(origin: str, port: int) -> None:
    app = web.Application()
    app[ORIGIN] = origin
    app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    app.router.add_route("*", "/{tail:.*}", relay)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], int(sys.argv[2])))
