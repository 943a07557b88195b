"""Conformance: every upstream dialect looks, through the proxy, exactly as it does direct.

For each dialect the fake upstream speaks (and each SSE line ending), each
endpoint (chat, text completions, the Responses API) and each kind of answer
(plain, n=2, a tool call, parallel tool calls; stream, stream with usage,
non-stream), the real OpenAI SDK makes the same call direct and through the
proxy, and the two parsed objects must be equal, ids and timestamps aside.
The proxy's answer is taken three ways: as the leader of the upstream call,
as a follower attached to a leader of the other mode, and as a cache hit of
an answer a caller of the other mode left.

"Equal" is as the SDK reads it: a null field and an absent one are the same,
and a dialect's `foldable` drops the values its stream has no way to say
(vLLM's `tool_calls: []`, Ollama's per-call `index`); README lists them.

One fake and one proxy serve the whole module, so each case costs a handful
of loopback calls. Cases that still differ, until the pump learns what
issue 11's phase 2 teaches it, are strict xfails whose reason names the gap.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest
import pytest_asyncio
import yaml
from aiohttp import web

from proxy.app import build_app, start_site
from proxy.policy import parse_policy
from proxy.runtime import RUNTIME, Runtime
from proxy.testing.dialects import DIALECT
from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import base_policy, merge, until

pytestmark = pytest.mark.asyncio(loop_scope="module")

# (dialect, line ending): every dialect as it frames by default, and the
# other line endings on two of them.
VARIANTS = [(name, "lf") for name in DIALECT] + [
    ("openai", "cr"),
    ("openai", "crlf"),
    ("vllm", "cr"),
]
MODES = ("whole", "stream", "usage")  # usage: a stream with stream_options.include_usage
PATHS = ("lead", "follow", "hit")
# A follower or a cache hit of the other mode.
OTHER = {"whole": "stream", "stream": "whole", "usage": "whole"}


def _function(name: str, argument: str) -> dict[str, Any]:
    parameters = {"type": "object", "properties": {argument: {"type": "string"}}}
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


TOOLS = [_function("get_weather", "location")]
TWO_TOOLS = [*TOOLS, _function("get_time", "city")]
# endpoint -> body kind -> (extra body fields, modes)
KINDS: dict[str, dict[str, tuple[dict[str, Any], tuple[str, ...]]]] = {
    "chat": {
        "plain": ({}, MODES),
        "n2": ({"n": 2}, ("whole", "stream")),
        "tools": ({"tools": TOOLS}, ("whole", "stream")),
        "parallel_tools": (
            {"tools": TWO_TOOLS, "parallel_tool_calls": True},
            ("whole", "stream"),
        ),
    },
    "completions": {
        "plain": ({}, MODES),
        "n2": ({"n": 2}, ("whole", "stream")),
    },
    "responses": {"plain": ({}, ("whole", "stream"))},
}


@dataclass(frozen=True)
class Case:
    dialect: str
    ending: str
    endpoint: str
    kind: str
    mode: str
    path: str

    @property
    def id(self) -> str:
        variant = self.dialect if self.ending == "lf" else f"{self.dialect}+{self.ending}"
        return f"{variant}-{self.endpoint}-{self.kind}-{self.mode}-{self.path}"

    def body(self) -> dict[str, Any]:
        # The case id in the prompt: no two cases share a key, a cache entry or an answer.
        extra, _ = KINDS[self.endpoint][self.kind]
        if self.endpoint == "chat":
            ask = f"{self.id}: what is the weather in Paris?"
            return {"model": "fake-model", "messages": [{"role": "user", "content": ask}], **extra}
        if self.endpoint == "completions":
            return {"model": "fake-model", "prompt": f"{self.id}: say hello", **extra}
        return {"model": "fake-model", "input": f"{self.id}: say hello", **extra}


def known_gap(case: Case) -> str | None:
    """Why this case still differs today, naming the item that fixes it; None: it must pass."""
    return None


def _cases() -> list[Any]:
    cases = []
    for dialect, ending in VARIANTS:
        for endpoint, kinds in KINDS.items():
            for kind, (_, modes) in kinds.items():
                for mode in modes:
                    for path in PATHS:
                        case = Case(dialect, ending, endpoint, kind, mode, path)
                        gap = known_gap(case)
                        marks = [pytest.mark.xfail(strict=True, reason=gap)] if gap else []
                        cases.append(pytest.param(case, id=case.id, marks=marks))
    return cases


@dataclass
class Env:
    fake: FakeUpstream
    runtime: Runtime
    proxy_url: str
    clients: dict[tuple[str, str, bool], openai.AsyncOpenAI] = field(default_factory=dict)

    def client(self, case: Case, proxied: bool) -> openai.AsyncOpenAI:
        key = (case.dialect, case.ending, proxied)
        client = self.clients.get(key)
        if client is None:
            client = self.clients[key] = openai.AsyncOpenAI(
                base_url=self.proxy_url if proxied else self.fake.base_url,
                api_key="sk-conformance",
                max_retries=0,
                default_headers={"x-fake-dialect": case.dialect, "x-fake-line-ending": case.ending},
                default_query={"api-version": "2024-10-21"} if case.dialect == "azure" else None,
            )
        return client


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env() -> AsyncIterator[Env]:
    fake = FakeUpstream()
    await fake.start()
    cached = {"match": {"path": "/v1/*"}, "upstream": "fake", "cache": {"ttl": "1h"}}
    policy = merge(base_policy(fake.base_url), {"routes": [cached]})
    app = build_app(parse_policy(yaml.safe_dump(policy), "conformance.yaml"))
    runner: web.AppRunner | None = None
    try:
        runner, site = await start_site(app, "127.0.0.1", 0)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        env = Env(fake, app[RUNTIME], f"http://127.0.0.1:{port}/v1")
        yield env
        for client in env.clients.values():
            await client.close()
    finally:
        fake.release.set()
        if runner is not None:
            await runner.cleanup()
        await fake.close()


Answer = tuple[Any, str]  # the parsed object (or list of chunks/events), x-llm-sidecar


async def _call(client: openai.AsyncOpenAI, case: Case, mode: str) -> Answer:
    kwargs = case.body()
    if mode != "whole":
        kwargs["stream"] = True
    if mode == "usage":
        kwargs["stream_options"] = {"include_usage": True}
    endpoints: dict[str, Any] = {
        "chat": client.chat.completions,
        "completions": client.completions,
        "responses": client.responses,
    }
    raw = await endpoints[case.endpoint].with_raw_response.create(**kwargs)
    parsed = raw.parse()
    served = raw.headers.get("x-llm-sidecar", "direct")
    if mode == "whole":
        return parsed.model_dump(), served
    return [item.model_dump() async for item in parsed], served


_VOLATILE = frozenset({"created", "created_at", "completed_at"})
_ANSWER_ID = re.compile(r"(chatcmpl-|cmpl-|resp_|msg_)\d+")  # the fake's per-call ids


def _normal(value: Any) -> Any:
    """Ids and timestamps aside, null and absent alike."""
    if isinstance(value, dict):
        return {
            k: "<volatile>"
            if k in _VOLATILE or (isinstance(v, str) and _ANSWER_ID.fullmatch(v))
            else _normal(v)
            for k, v in value.items()
            if v is not None
        }
    if isinstance(value, list):
        return [_normal(v) for v in value]
    return value


def _comparable(case: Case, mode: str, answer: Any) -> Any:
    dialect = DIALECT[case.dialect]
    if mode == "whole" and case.endpoint != "responses":
        answer = dialect.foldable(answer)
    if mode == "stream" and case.endpoint == "chat":
        answer = dialect.unasked_usage_chunks(answer)
    return _normal(answer)


async def _held(env: Env, first: Callable[[], Any], then: Callable[[], Any]) -> Answer:
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
        outcomes: list[Answer | BaseException] = await asyncio.gather(
            leader, follower, return_exceptions=True
        )
    for outcome in reversed(outcomes):  # the follower's own failure first
        if isinstance(outcome, BaseException):
            raise outcome
    answer = outcomes[1]
    assert not isinstance(answer, BaseException)
    return answer


async def _through_the_proxy(env: Env, case: Case) -> Answer:
    proxied = env.client(case, proxied=True)
    if case.path == "lead":
        return await _call(proxied, case, case.mode)
    if case.path == "follow":
        return await _held(
            env,
            lambda: _call(proxied, case, OTHER[case.mode]),
            lambda: _call(proxied, case, case.mode),
        )
    await _call(proxied, case, OTHER[case.mode])
    async with asyncio.timeout(10):
        await env.runtime.cache.flush()  # type: ignore[attr-defined]
    return await _call(proxied, case, case.mode)


@pytest.mark.parametrize("case", _cases())
async def test_through_the_proxy_as_direct(env: Env, case: Case) -> None:
    direct, _ = await _call(env.client(case, proxied=False), case, case.mode)
    try:
        got, served = await _through_the_proxy(env, case)
    except openai.OpenAIError as exc:
        # Reported without the SDK's deep traceback, which CPython 3.11.7's
        # ast.parse cannot always format ("AST constructor recursion depth mismatch").
        pytest.fail(f"through the proxy the SDK raised {type(exc).__name__}: {exc}", pytrace=False)
    assert served == case.path
    assert _comparable(case, case.mode, got) == _comparable(case, case.mode, direct)
