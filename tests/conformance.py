"""The conformance harness: one fake, one proxy, and the real SDK on both sides.

`env` starts the fake upstream and a caching proxy in front of it (its `/v1`
paths, and Azure's `/openai` paths to the same fake); `Env.client` is the
SDK a case uses, direct or through the proxy (`AsyncAzureOpenAI` for the
azure dialect, so its deployment paths, `api-version` and `api-key` are
the ones exercised). `call` makes one SDK call and returns what the SDK
parsed, or what it raised, with the path the proxy says served it; `held`
runs two calls on one upstream call, the second attached while the first
holds it. `normal` puts ids and timestamps aside.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest_asyncio
import yaml
from aiohttp import web

from proxy.app import build_app, start_site
from proxy.policy import parse_policy
from proxy.runtime import RUNTIME, Runtime
from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import base_policy, merge, until

API_VERSION = "2024-10-21"
ENDPOINTS = ("chat", "completions", "responses")


@dataclass
class Env:
    fake: FakeUpstream
    runtime: Runtime
    proxy_root: str  # http://127.0.0.1:PORT, without /v1
    clients: dict[tuple[str, str, bool], openai.AsyncOpenAI] = field(default_factory=dict)

    def client(self, dialect: str, ending: str, proxied: bool) -> openai.AsyncOpenAI:
        key = (dialect, ending, proxied)
        client = self.clients.get(key)
        if client is None:
            root = self.proxy_root if proxied else self.fake.base_url.removesuffix("/v1")
            headers = {"x-fake-dialect": dialect, "x-fake-line-ending": ending}
            if dialect == "azure":
                # Azure's own client: /openai/deployments/{model}/..., api-version, api-key.
                client = openai.AsyncAzureOpenAI(
                    azure_endpoint=root,
                    api_version=API_VERSION,
                    api_key="azure-conformance",
                    max_retries=0,
                    default_headers=headers,
                )
            else:
                client = openai.AsyncOpenAI(
                    base_url=root + "/v1",
                    api_key="sk-conformance",
                    max_retries=0,
                    default_headers=headers,
                )
            self.clients[key] = client
        return client

    async def flush(self) -> None:
        async with asyncio.timeout(10):
            await self.runtime.cache.flush()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env() -> AsyncIterator[Env]:
    fake = FakeUpstream()
    await fake.start()
    cache = {"ttl": "1h"}
    policy = merge(
        base_policy(fake.base_url),
        {
            "upstreams": {"azure": {"base_url": fake.base_url.removesuffix("/v1")}},
            "routes": [
                {"match": {"path": "/openai/*"}, "upstream": "azure", "cache": cache},
                {"match": {"path": "/v1/*"}, "upstream": "fake", "cache": cache},
            ],
        },
    )
    app = build_app(parse_policy(yaml.safe_dump(policy), "conformance.yaml"))
    runner: web.AppRunner | None = None
    try:
        runner, site = await start_site(app, "127.0.0.1", 0)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        env = Env(fake, app[RUNTIME], f"http://127.0.0.1:{port}")
        yield env
        for client in env.clients.values():
            await client.close()
    finally:
        fake.release.set()
        if runner is not None:
            await runner.cleanup()
        await fake.close()


@dataclass(frozen=True)
class Raised:
    """What the SDK raised, as a caller sees it: its class, status and body."""

    kind: str
    status: int | None
    body: Any


Answer = tuple[Any, str]  # the parsed object (list of chunks or events, or Raised), served by


async def call(
    client: openai.AsyncOpenAI,
    endpoint: str,
    body: dict[str, Any],
    mode: str,
    headers: dict[str, str] | None = None,
) -> Answer:
    """One SDK call in `mode` (whole, stream, usage: a stream with include_usage)."""
    kwargs = dict(body)
    if mode != "whole":
        kwargs["stream"] = True
    if mode == "usage":
        kwargs["stream_options"] = {"include_usage": True}
    if headers:
        kwargs["extra_headers"] = headers
    resources: dict[str, Any] = {
        "chat": client.chat.completions,
        "completions": client.completions,
        "responses": client.responses,
    }
    create = resources[endpoint].with_raw_response.create
    served = "none"
    items: list[Any] = []
    try:
        raw = await create(**kwargs)
        served = raw.headers.get("x-llm-sidecar", "direct")
        parsed = raw.parse()
        if mode == "whole":
            return _dump(parsed), served
        async for item in parsed:
            items.append(_dump(item))
    except openai.APIStatusError as exc:
        served = exc.response.headers.get("x-llm-sidecar", "direct")
        raised = Raised(type(exc).__name__, exc.status_code, exc.body)
    except (openai.APIError, ValueError) as exc:  # mid-stream, or a body that is not JSON
        said = exc.body if isinstance(exc, openai.APIError) else None
        raised = Raised(type(exc).__name__, None, said)
    else:
        return items, served
    # A stream's failure comes after the items it did yield.
    return (raised if mode == "whole" else [*items, raised]), served


def _dump(parsed: Any) -> Any:
    dump = getattr(parsed, "model_dump", None)
    return dump() if callable(dump) else parsed


async def held(
    env: Env, first: Callable[[], Awaitable[Answer]], then: Callable[[], Awaitable[Answer]]
) -> tuple[Answer, Answer]:
    """Start `first` and hold the upstream after its first event; attach `then`; release."""
    fake = env.fake
    fake.release = asyncio.Event()
    fake.reached_hold.clear()
    fake.hold_after = 1
    leader: asyncio.Future[Answer] = asyncio.ensure_future(first())
    follower: asyncio.Future[Answer] | None = None
    try:
        async with asyncio.timeout(10):
            await fake.reached_hold.wait()
            follower = asyncio.ensure_future(then())
        await until(lambda: sum(stream.readers for stream in env.runtime.table) >= 2)
    finally:
        fake.hold_after = None
        fake.release.set()
    assert follower is not None
    async with asyncio.timeout(10):
        return await leader, await follower


_VOLATILE = frozenset({"created", "created_at", "completed_at"})
_ANSWER_ID = re.compile(r"(chatcmpl-|cmpl-|resp_|msg_)\d+")  # the fake's per-call ids


def normal(value: Any) -> Any:
    """Ids and timestamps aside, null and absent alike."""
    if isinstance(value, dict):
        return {
            k: "<volatile>"
            if k in _VOLATILE or (isinstance(v, str) and _ANSWER_ID.fullmatch(v))
            else normal(v)
            for k, v in value.items()
            if v is not None
        }
    if isinstance(value, list | tuple):
        return [normal(v) for v in value]
    if isinstance(value, Raised):
        return Raised(value.kind, value.status, normal(value.body))
    return value
