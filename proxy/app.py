"""The aiohttp application: routes, resources and their lifetimes.

`build_app` wires a `Runtime` onto a new app; resources open and close in
`cleanup_ctx`, in reverse order. `serve` runs it on uvloop until a signal.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator

import uvloop
from aiohttp import web

from proxy.cache.factory import build_cache
from proxy.observe import OBSERVER, Observer
from proxy.pipeline import handle_api
from proxy.policy import LoadedPolicy
from proxy.routing import compile_policy
from proxy.runtime import RUNTIME, HookSession, Runtime, StageSet
from proxy.status import metrics_endpoint, status_endpoint

log = logging.getLogger("llm_sidecar")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    if rt.draining:
        return web.json_response({"status": "draining"}, status=503)
    return web.json_response({"status": "ready", "policy": rt.snapshot.version})


def build_app(loaded: LoadedPolicy) -> web.Application:
    hooks = HookSession()
    snapshot = compile_policy(loaded, hooks)
    rt = Runtime(
        snapshot=snapshot,
        stages=StageSet.from_policy(loaded.policy.stages),
        hooks=hooks,
        # Builds without connecting: a Redis that is down costs misses, not start-up.
        cache=build_cache(loaded.policy, os.environ, source=loaded.source),
    )
    # Bodies are read (and limited) by intake itself, not by aiohttp.
    app = web.Application(client_max_size=loaded.policy.limits.max_body_bytes + 1)
    app[RUNTIME] = rt
    rt.metrics.watch(rt)
    observer = app[OBSERVER] = Observer(rt)
    api = observer.wrap(handle_api)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/status", status_endpoint)
    app.router.add_route("*", "/v1/{tail:.*}", api)
    app.router.add_route("*", "/v1", api)
    app.cleanup_ctx.append(_resources)
    return app


async def _resources(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    yield
    pumps = list(rt.pumps)
    for task in pumps:
        task.cancel("llm-sidecar is stopping")
    await asyncio.gather(*pumps, return_exceptions=True)
    await rt.cache.close()
    await rt.hooks.close()
    await rt.pool.close()


async def start_site(
    app: web.Application, host: str, port: int
) -> tuple[web.AppRunner, web.TCPSite]:
    # handler_cancellation: a caller that disconnects cancels its handler,
    # which is how a reader leaves a stream while it waits.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    await site.start()
    return runner, site


async def _serve(loaded: LoadedPolicy, host: str, port: int) -> None:
    app = build_app(loaded)
    runner, _ = await start_site(app, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("serving on http://%s:%d policy=%s", host, port, loaded.version)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def serve(loaded: LoadedPolicy, host: str | None = None, port: int | None = None) -> None:
    listen = loaded.policy.listen
    uvloop.run(_serve(loaded, host or listen.host, port if port is not None else listen.port))
