"""Shared fixtures: a real fake upstream and a real proxy, both on loopback."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from multidict import CIMultiDict

from proxy.app import build_app, start_site
from proxy.policy import parse_policy
from proxy.runtime import RUNTIME, Runtime
from proxy.testing.fake_upstream import FakeUpstream


@dataclass
class RunningProxy:
    app: web.Application
    runner: web.AppRunner
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def runtime(self) -> Runtime:
        return self.app[RUNTIME]


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for name, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(name), dict):
            out[name] = merge(out[name], value)
        else:
            out[name] = value
    return out


def base_policy(upstream_url: str) -> dict[str, Any]:
    return {
        "upstreams": {
            "fake": {"base_url": upstream_url, "first_byte_timeout": "10s", "idle_timeout": "10s"}
        },
        "routes": [{"match": {"path": "/v1/*"}, "upstream": "fake"}],
    }


StartProxy = Callable[..., Awaitable[RunningProxy]]

pytest_plugins = ["tests.conftest_redis"]


async def _running_fake() -> AsyncIterator[FakeUpstream]:
    upstream = FakeUpstream()
    await upstream.start()
    try:
        yield upstream
    finally:
        upstream.release.set()
        await upstream.close()


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async for upstream in _running_fake():
        yield upstream


@pytest.fixture
async def backup() -> AsyncIterator[FakeUpstream]:
    """A second fake upstream, for routes with more than one target."""
    async for upstream in _running_fake():
        yield upstream


@pytest.fixture
async def start_proxy(fake: FakeUpstream) -> AsyncIterator[StartProxy]:
    runners: list[web.AppRunner] = []
    upstream_url = f"http://127.0.0.1:{fake.port}/v1"

    async def start(policy: dict[str, Any] | None = None, *, raw: bool = False) -> RunningProxy:
        data = (
            policy if raw and policy is not None else merge(base_policy(upstream_url), policy or {})
        )
        loaded = parse_policy(yaml.safe_dump(data), "test-policy.yaml")
        app = build_app(loaded)
        runner, site = await start_site(app, "127.0.0.1", 0)
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return RunningProxy(app, runner, port)

    try:
        yield start
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


@pytest.fixture
async def proxy(start_proxy: StartProxy) -> RunningProxy:
    return await start_proxy()


@dataclass
class Hook:
    """A prepare hook (`http_hook` step) the test steers: it echoes the body,
    optionally after a gate and a delay, with changes merged in, or answers
    an error status."""

    url: str = ""
    delay: float = 0.0
    gate: asyncio.Event | None = None
    status: int = 200
    changes: dict[str, Any] = field(default_factory=dict)
    calls: int = 0


@pytest.fixture
async def hook() -> AsyncIterator[Hook]:
    state = Hook()

    async def prepare(request: web.Request) -> web.Response:
        state.calls += 1
        body = await request.json()
        if state.gate is not None:
            await state.gate.wait()
        await asyncio.sleep(state.delay)
        if state.status >= 400:
            error = {"message": "blocked by policy hook", "type": "x", "param": None, "code": None}
            return web.json_response({"error": error}, status=state.status)
        return web.json_response({**body, **state.changes})

    app = web.Application()
    app.router.add_post("/prepare", prepare)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.url = f"http://127.0.0.1:{port}/prepare"
    try:
        yield state
    finally:
        if state.gate is not None:
            state.gate.set()
        await runner.cleanup()


async def post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], **headers: str
) -> tuple[int, CIMultiDict[str], bytes]:
    """POST JSON; the status, the headers and the whole body."""
    async with session.post(url, json=body, headers=headers) as response:
        return response.status, CIMultiDict(response.headers), await response.read()


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll a condition that no event signals, bounded by `timeout`."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def wait_readers(proxy: RunningProxy, readers: int, timeout: float = 10.0) -> None:
    """Until `readers` callers are attached to live streams."""
    await until(lambda: sum(s.readers for s in proxy.runtime.table) >= readers, timeout)


async def wait_idle(rt: Runtime, timeout: float = 5.0) -> None:
    """Every stage back to zero in use and queued, the table and pump set empty."""
    async with asyncio.timeout(timeout):
        while True:
            stats = [limiter.stats() for limiter in rt.stages.all()]
            if (
                all(s.in_use == 0 and s.queued == 0 for s in stats)
                and len(rt.table) == 0
                and not rt.pumps
            ):
                return
            await asyncio.sleep(0.01)
