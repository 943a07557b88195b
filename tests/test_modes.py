"""The caller's own mode and bytes upstream; readers of the other mode still share the call.

A `stream: false` leader makes a plain call with its own bytes, a `stream: true`
leader a streamed one (with usage). A reader of the other mode, live or from
the cache, gets the answer converted at the edge, equal (ids and timestamps
aside) to what the same call returns direct. Live tests gate the fake
upstream so both readers are attached before it answers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from proxy.rechunk import CHAT_PATH, rechunk
from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import RunningProxy, StartProxy, wait_idle, wait_readers
from tests.redis_server import RedisServer

BIG = 2**70  # wider than 64 bits: parsed and re-serialised it would become a float
MESSAGES = [{"role": "user", "content": "share this call"}]
BODIES: dict[str, dict[str, Any]] = {
    "chat": {"model": "m", "messages": MESSAGES},
    "completions": {"model": "m", "prompt": "share this call"},
    "responses": {"model": "m", "input": "share this call"},
    "embeddings": {"model": "e", "input": ["share", "this"], "encoding_format": "float"},
}
PATHS = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "responses": "/responses",
    "embeddings": "/embeddings",
}
STREAMING = ("chat", "completions", "responses")
VOLATILE = frozenset({"id", "created", "created_at", "item_id"})


def _stable(value: Any) -> Any:
    """`value` without ids and timestamps, at any depth."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _dump(obj: Any) -> Any:
    return _stable(obj.model_dump(mode="json"))


# -- one call of each kind with the real SDK, reduced to the answer a user relies on ----------


async def _plain(client: openai.AsyncOpenAI, name: str) -> Any:
    body = BODIES[name]
    if name == "chat":
        return _dump(await client.chat.completions.create(**body))
    if name == "completions":
        return _dump(await client.completions.create(**body))
    return _dump(await client.responses.create(**body))


async def _streamed(client: openai.AsyncOpenAI, name: str, usage: bool = False) -> Any:
    """A streamed answer folded the way the SDK folds it; chunking aside, it is the answer."""
    body = BODIES[name]
    options: Any = {"stream_options": {"include_usage": True}} if usage else {}
    if name == "chat":
        state: ChatCompletionStreamState[None] = ChatCompletionStreamState()
        async for chunk in await client.chat.completions.create(**body, stream=True, **options):
            state.handle_chunk(chunk)
        return _dump(state.current_completion_snapshot)
    if name == "completions":
        texts: dict[int, str] = {}
        finish: dict[int, str | None] = {}
        last_usage = None
        meta = set()
        async for part in await client.completions.create(**body, stream=True, **options):
            meta.add((part.model, part.object, part.system_fingerprint))
            last_usage = part.usage or last_usage
            for choice in part.choices:
                texts[choice.index] = texts.get(choice.index, "") + choice.text
                finish[choice.index] = choice.finish_reason or finish.get(choice.index)
        usage_out = None if last_usage is None else last_usage.model_dump()
        return {"meta": sorted(meta), "texts": texts, "finish": finish, "usage": usage_out}
    events = [e async for e in await client.responses.create(**body, stream=True)]
    kinds = [e.type for i, e in enumerate(events) if i == 0 or e.type != events[i - 1].type]
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(len(events)))
    terminal = events[-1]
    assert terminal.type == "response.completed"
    return {"kinds": kinds, "response": _dump(terminal.response)}


async def _answer(client: openai.AsyncOpenAI, name: str, stream: bool, usage: bool = False) -> Any:
    return await (_streamed(client, name, usage) if stream else _plain(client, name))


@pytest.fixture
async def clients(
    fake: FakeUpstream, proxy: RunningProxy
) -> AsyncIterator[tuple[openai.AsyncOpenAI, openai.AsyncOpenAI]]:
    async with (
        openai.AsyncOpenAI(base_url=fake.base_url, api_key="sk-t", max_retries=0) as direct,
        openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-t", max_retries=0) as proxied,
    ):
        yield direct, proxied


async def _post_raw(url: str, raw: bytes) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=raw, headers={"Content-Type": "application/json"}) as response,
    ):
        return response.status, await response.read()


# -- what reaches the upstream ------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BODIES))
async def test_a_plain_call_reaches_the_upstream_as_the_callers_own_bytes(
    fake: FakeUpstream, proxy: RunningProxy, name: str
) -> None:
    # Python's json keeps the integer exact; its spacing is not orjson's either.
    raw = json.dumps({**BODIES[name], "seed": BIG, "stream": False}).encode()
    status, answer = await _post_raw(proxy.base_url + PATHS[name], raw)
    assert status == 200, answer
    assert [r.body for r in fake.requests] == [raw]
    assert orjson.loads(answer)["object"] in (
        "chat.completion",
        "text_completion",
        "response",
        "list",
    )


@pytest.mark.parametrize("name", STREAMING)
async def test_a_streamed_call_reaches_the_upstream_as_a_stream_with_usage(
    fake: FakeUpstream, proxy: RunningProxy, name: str
) -> None:
    raw = json.dumps({**BODIES[name], "seed": BIG, "stream": True}).encode()
    status, answer = await _post_raw(proxy.base_url + PATHS[name], raw)
    assert status == 200 and answer.startswith((b"data: ", b"event: ")), answer
    (sent,) = [r.body for r in fake.requests]
    if name == "responses":  # no usage chunk to ask for: the caller's bytes as they are
        assert sent == raw
    else:
        assert json.loads(sent) == {
            **BODIES[name],
            "seed": BIG,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        assert b"%d" % BIG in sent
        assert b'"usage":{' not in answer  # the caller did not ask for the usage chunk


@pytest.mark.parametrize(("max_tokens", "clamped"), [(5, False), (500, True)])
async def test_only_a_prepare_step_that_changes_the_body_changes_the_bytes(
    fake: FakeUpstream, start_proxy: StartProxy, max_tokens: int, clamped: bool
) -> None:
    route: dict[str, Any] = {"match": {"path": "/v1/*"}, "upstream": "fake"}
    route["prepare"] = [{"step": "clamp_max_tokens", "max": 50}]
    proxy = await start_proxy({"routes": [route]})
    raw = json.dumps({**BODIES["chat"], "seed": BIG, "max_tokens": max_tokens}).encode()
    status, _ = await _post_raw(proxy.base_url + PATHS["chat"], raw)
    (sent,) = [r.body for r in fake.requests]
    assert status == 200 and (sent == raw) is not clamped
    assert json.loads(sent)["max_tokens"] == min(max_tokens, 50)


@pytest.mark.parametrize("refuse", ["stream", "stream_options"])
@pytest.mark.parametrize("name", STREAMING)
async def test_an_upstream_that_cannot_stream_serves_plain_callers_as_direct(
    fake: FakeUpstream,
    clients: tuple[openai.AsyncOpenAI, openai.AsyncOpenAI],
    name: str,
    refuse: str,
) -> None:
    fake.settings = replace(fake.settings, refuse=refuse)
    direct, proxied = clients
    assert await _plain(proxied, name) == await _plain(direct, name)
    if refuse == "stream":
        # Streaming callers get the upstream's refusal, as they would direct.
        with pytest.raises(openai.BadRequestError) as through:
            await _streamed(proxied, name)
        with pytest.raises(openai.BadRequestError) as straight:
            await _streamed(direct, name)
        assert through.value.body == straight.value.body


# -- readers of the other mode ------------------------------------------------------------------


@pytest.mark.parametrize("leader_streams", [False, True], ids=["plain-leader", "stream-leader"])
@pytest.mark.parametrize("name", STREAMING)
async def test_a_reader_of_the_other_mode_shares_a_live_call(
    fake: FakeUpstream,
    proxy: RunningProxy,
    clients: tuple[openai.AsyncOpenAI, openai.AsyncOpenAI],
    name: str,
    leader_streams: bool,
) -> None:
    direct, proxied = clients
    fake.hold_after = 0  # the upstream answers when the test says
    lead = asyncio.create_task(_answer(proxied, name, leader_streams))
    async with asyncio.timeout(10):
        await fake.reached_hold.wait()  # the leader's call is upstream, in its mode
    follow = asyncio.create_task(_answer(proxied, name, not leader_streams))
    await wait_readers(proxy, 2)
    fake.release.set()
    async with asyncio.timeout(10):
        led, followed = await asyncio.gather(lead, follow)
    assert fake.total_calls == 1
    (sent,) = fake.requests
    assert (orjson.loads(sent.body).get("stream") is True) is leader_streams
    fake.hold_after = None
    assert led == await _answer(direct, name, leader_streams)
    assert followed == await _answer(direct, name, not leader_streams)
    await wait_idle(proxy.runtime)


@pytest.mark.parametrize("name", ["chat", "completions"])
async def test_streaming_readers_of_a_plain_call_get_usage_only_if_they_asked(
    fake: FakeUpstream,
    proxy: RunningProxy,
    clients: tuple[openai.AsyncOpenAI, openai.AsyncOpenAI],
    name: str,
) -> None:
    direct, proxied = clients
    fake.hold_after = 0
    lead = asyncio.create_task(_plain(proxied, name))
    async with asyncio.timeout(10):
        await fake.reached_hold.wait()
    readers = [asyncio.create_task(_streamed(proxied, name, usage)) for usage in (True, False)]
    await wait_readers(proxy, 3)
    fake.release.set()
    async with asyncio.timeout(10):
        plain, with_usage, without = await asyncio.gather(lead, *readers)
    assert fake.total_calls == 1
    fake.hold_after = None
    assert with_usage == await _streamed(direct, name, usage=True)
    assert without == await _streamed(direct, name, usage=False)
    assert with_usage["usage"] == plain["usage"] and without["usage"] is None


def _cache_policy(backend: str, redis: RedisServer | None) -> dict[str, Any]:
    cache: dict[str, Any] = {"backend": backend}
    if redis is not None:
        cache["url"] = f"redis://127.0.0.1:{redis.port}/0"
    route = {"match": {"path": "/v1/*"}, "upstream": "fake", "cache": {"ttl": "1h"}}
    return {"cache": cache, "routes": [route]}


@pytest.mark.parametrize("backend", ["memory", "redis"])
@pytest.mark.parametrize("filled_by_stream", [False, True], ids=["plain-fill", "stream-fill"])
@pytest.mark.parametrize("name", STREAMING)
async def test_a_cached_answer_serves_the_other_mode(
    request: pytest.FixtureRequest,
    fake: FakeUpstream,
    start_proxy: StartProxy,
    name: str,
    filled_by_stream: bool,
    backend: str,
) -> None:
    redis = request.getfixturevalue("redis_server") if backend == "redis" else None
    proxy = await start_proxy(_cache_policy(backend, redis))
    async with (
        openai.AsyncOpenAI(base_url=fake.base_url, api_key="sk-t", max_retries=0) as direct,
        openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-t", max_retries=0) as proxied,
    ):
        filled = await _answer(proxied, name, filled_by_stream)
        async with asyncio.timeout(5):
            await proxy.runtime.cache.flush()
        hit = await _answer(proxied, name, not filled_by_stream)
        again = await _answer(proxied, name, filled_by_stream)
        stats = proxy.runtime.cache.stats()
        assert fake.total_calls == 1 and stats is not None and stats.hits == 2
        assert filled == again == await _answer(direct, name, filled_by_stream)
        assert hit == await _answer(direct, name, not filled_by_stream)
    await wait_idle(proxy.runtime)


async def _frames_until(response: aiohttp.ClientResponse, count: int) -> list[bytes]:
    """The first `count` SSE frames (events or comments) of a response, as they arrive."""
    return [await response.content.readuntil(b"\n\n") for _ in range(count)]


async def test_a_streaming_reader_of_a_plain_call_is_kept_alive_until_the_answer(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy({"stream": {"keepalive_interval": "50ms"}})
    fake.hold_after = 0
    url = proxy.base_url + PATHS["chat"]
    async with aiohttp.ClientSession() as session:
        lead = asyncio.create_task(session.post(url, json=BODIES["chat"]))
        async with asyncio.timeout(10):
            await fake.reached_hold.wait()
        async with (
            asyncio.timeout(10),
            session.post(url, json={**BODIES["chat"], "stream": True}) as follower,
        ):
            # Its stream starts while the upstream is still working on the answer.
            assert follower.status == 200
            assert follower.headers["Content-Type"].startswith("text/event-stream")
            assert await _frames_until(follower, 2) == [b": keepalive\n\n"] * 2
            fake.release.set()
            rest = await follower.read()
        async with await lead as leader:
            answer = orjson.loads(await leader.read())
    events = [e for e in rest.split(b"\n\n") if e and not e.startswith(b":")]
    converted = rechunk(CHAT_PATH, answer)
    assert converted is not None and converted.usage_event is not None
    expected = [e for i, e in enumerate(converted.events) if i != converted.usage_event]
    assert [e + b"\n\n" for e in events] == expected  # the leader's answer, re-chunked
    assert fake.total_calls == 1
    await wait_idle(proxy.runtime)


async def test_an_upstream_error_reaches_a_kept_alive_reader_as_an_error_event(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy({"stream": {"keepalive_interval": "50ms"}})
    fake.settings = replace(fake.settings, error_status=429)
    fake.hold_after = 0
    async with (
        openai.AsyncOpenAI(base_url=fake.base_url, api_key="sk-t", max_retries=0) as direct,
        openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-t", max_retries=0) as proxied,
    ):
        lead = asyncio.create_task(_plain(proxied, "chat"))
        async with asyncio.timeout(10):
            await fake.reached_hold.wait()
            # Returns once its stream has started: before the upstream answered.
            stream = await proxied.chat.completions.create(**BODIES["chat"], stream=True)
        fake.release.set()
        with pytest.raises(openai.APIError) as followed:
            async for _ in stream:
                pass
        with pytest.raises(openai.RateLimitError) as led:
            await lead
        fake.hold_after = None
        with pytest.raises(openai.RateLimitError) as straight:
            await _plain(direct, "chat")
    # The leader gets the upstream's status and body; the reader, whose 200 was
    # already sent, the upstream's error as the event the SDK raises on.
    assert led.value.body == followed.value.body == straight.value.body
    assert fake.total_calls == 2
    await wait_idle(proxy.runtime)


async def test_a_plain_answer_past_the_log_cap_is_not_joined_after_it_ends(
    fake: FakeUpstream, start_proxy: StartProxy, redis_server: RedisServer
) -> None:
    import redis.asyncio as aioredis

    # A plain call's body is its log: past stream.max_log_bytes, a repeat that
    # comes while the answer is being written makes its own call, as it would
    # for a streamed answer. Redis writes are held back (reads go through) so
    # the ended stream stays in the table until the repeat has chosen.
    policy = _cache_policy("redis", redis_server)
    policy["cache"]["timeout"] = "10s"
    # The in-process tier would answer the repeat at once: this is about the table.
    policy["cache"]["local_tier"] = None
    policy["stream"] = {"max_log_bytes": "1KiB"}
    proxy = await start_proxy(policy)
    fake.settings = replace(fake.settings, token_padding=256)
    url = proxy.base_url + PATHS["chat"]
    admin = aioredis.Redis(port=redis_server.port)
    try:
        await admin.execute_command("CLIENT", "PAUSE", "10000", "WRITE")
        async with aiohttp.ClientSession() as session, asyncio.timeout(10):
            async with session.post(url, json=BODIES["chat"]) as first:
                assert first.status == 200 and first.headers["x-llm-sidecar"] == "lead"
                assert len(await first.read()) > 1024
            async with session.post(url, json=BODIES["chat"]) as second:
                assert second.status == 200 and second.headers["x-llm-sidecar"] == "lead"
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await admin.aclose()
    assert fake.total_calls == 2
    await wait_idle(proxy.runtime)
