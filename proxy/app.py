"""The aiohttp application: routes, resources and their lifetimes.

`build_app` wires a `Runtime` onto a new app; resources open and close in
`cleanup_ctx`, in reverse order. With an `admin` block in the policy the
operator endpoints (`/healthz`, `/readyz`, `/metrics`, `/status`) leave the
API app for `build_admin_app`, served on their own listener.
`proxy.lifecycle` serves both (signals, reload and drain).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from aiohttp import web

from proxy.cache.factory import build_cache
from proxy.cluster.link import build_link
from proxy.errors import NotFound
from proxy.gauges import watch
from proxy.observe import OBSERVER, Observer
from proxy.paths import API_PREFIXES
from proxy.pipeline import handle_api
from proxy.policy import LoadedPolicy
from proxy.routing import compile_policy
from proxy.runtime import RUNTIME, HookSession, Runtime, StageSet
from proxy.server import GuardedSite
from proxy.status import metrics_endpoint, status_endpoint


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    if rt.draining:
        return web.json_response({"status": "draining"}, status=503)
    return web.json_response({"status": "ready", "policy": rt.snapshot.version})


async def not_found(request: web.Request) -> web.Response:
    """Anything outside the API prefixes and the operator endpoints: an OpenAI-style 404."""
    error = NotFound("llm-sidecar: nothing is served at this path")
    return web.Response(status=error.status, body=error.body(), headers=error.headers())


def build_app(loaded: LoadedPolicy) -> web.Application:
    hooks = HookSession()
    snapshot = compile_policy(loaded, hooks)
    rt = Runtime(
        snapshot=snapshot,
        stages=StageSet.from_policy(loaded.policy.stages),
        hooks=hooks,
        # Builds without connecting: a Redis that is down costs misses, not start-up.
        cache=build_cache(loaded.policy, os.environ, source=loaded.source),
        # Also builds without connecting; None unless cluster.coalesce_across_replicas.
        cluster=build_link(loaded.policy, os.environ, source=loaded.source),
    )
    # Bodies are read (and limited) by intake itself, not by aiohttp.
    app = web.Application(client_max_size=loaded.policy.limits.max_body_bytes + 1)
    app[RUNTIME] = rt
    watch(rt)
    observer = app[OBSERVER] = Observer(rt)
    api = observer.wrap(handle_api)
    if loaded.policy.admin is None:
        _add_operator_routes(app)
    # [\s\S]: a path with an encoded CR or LF must reach intake and its 400,
    # not fall through the router's "." as a bare 404.
    for prefix in API_PREFIXES:  # /v1, and Azure's /openai
        app.router.add_route("*", prefix + r"/{tail:[\s\S]*}", api)
        app.router.add_route("*", prefix, api)
    app.router.add_route("*", r"/{tail:[\s\S]*}", not_found)
    app.cleanup_ctx.append(_resources)
    return app


def _add_operator_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/status", status_endpoint)


def build_admin_app(rt: Runtime) -> web.Application:
    """The operator endpoints alone, for the policy's `admin` listener.

    It shares the API app's runtime and owns no resource: the API app opens
    and closes them.
    """
    admin = web.Application()
    admin[RUNTIME] = rt
    _add_operator_routes(admin)
    admin.router.add_route("*", r"/{tail:[\s\S]*}", not_found)
    return admin


async def _resources(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    yield
    pumps = list(rt.pumps)
    for task in pumps:
        task.cancel("llm-sidecar is stopping")
    await asyncio.gather(*pumps, return_exceptions=True)
    await asyncio.gather(*rt.retiring, return_exceptions=True)
    if rt.cluster is not None:
        await rt.cluster.close()  # after the pumps: their last entries get flushed
    await rt.cache.close()
    await rt.hooks.close()
    await rt.pool.close()


def make_runner(app: web.Application, shutdown_timeout: float = 60.0) -> web.AppRunner:
    # handler_cancellation: a caller that disconnects cancels its handler,
    # which is how a reader leaves a stream while it waits. The access log
    # is the observer's, not aiohttp's.
    return web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout
    )


async def start_site(
    app: web.Application, host: str, port: int, runner: web.AppRunner | None = None
) -> tuple[web.AppRunner, GuardedSite]:
    runner = runner if runner is not None else make_runner(app)
    await runner.setup()
    rt = app[RUNTIME]
    # Connection guards (head and idle timeouts) follow the current policy.
    site = GuardedSite(runner, host, port, lambda: rt.snapshot.loaded.policy.limits)
    await site.start()
    return runner, site
