"""The cache seen through the proxy: hits skip every stage, faults are misses.

Runs against both backends: the in-process one and a real redis-server
started by the fixture on a free port.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import aiohttp
import openai
import pytest

from proxy.cache.base import CachedAnswer
from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import Hook, RunningProxy, StartProxy, post, until, wait_idle
from tests.redis_server import RedisServer
from tests.stage_recorder import record_stages

CHAT = {"model": "m", "messages": [{"role": "user", "content": "cache me"}]}
ANSWER = b'{"id":"landed","object":"chat.completion","choices":[]}'


def _policy(
    backend: str,
    redis: RedisServer | None = None,
    only_deterministic: bool = False,
    local_tier: bool = True,
) -> dict[str, Any]:
    cache: dict[str, Any] = {
        "backend": backend,
        "timeout": "200ms",
        "breaker": {"failures": 2, "reset_after": "200ms"},
    }
    if redis is not None:
        cache["url"] = f"redis://127.0.0.1:{redis.port}/0"
    if not local_tier:
        # Tests of what Redis itself does: no in-process copy answering instead.
        cache["local_tier"] = None
    return {
        "cache": cache,
        "routes": [
            {
                "match": {"path": "/v1/*"},
                "upstream": "fake",
                "cache": {"ttl": "1h", "only_deterministic": only_deterministic},
            }
        ],
    }


@pytest.fixture(params=["memory", "redis"])
async def cached_proxy(request: pytest.FixtureRequest, start_proxy: StartProxy) -> RunningProxy:
    if request.param == "memory":
        return await start_proxy(_policy("memory"))
    redis: RedisServer = request.getfixturevalue("redis_server")
    return await start_proxy(_policy("redis", redis))


async def _stored(proxy: RunningProxy) -> None:
    """Writes happen off the readers' path; wait for them to land."""
    async with asyncio.timeout(5):
        await proxy.runtime.cache.flush()


async def test_miss_then_hit_for_stream_and_non_stream(
    fake: FakeUpstream, cached_proxy: RunningProxy
) -> None:
    client = openai.AsyncOpenAI(base_url=cached_proxy.base_url, api_key="sk-a", max_retries=0)
    try:
        first = await client.chat.completions.create(**CHAT)
        await _stored(cached_proxy)
        raw = await client.chat.completions.with_raw_response.create(**CHAT)
        second = raw.parse()
        assert raw.headers["x-llm-sidecar"] == "hit" and int(raw.headers["age"]) >= 0
        chunks = [c async for c in await client.chat.completions.create(**CHAT, stream=True)]
        usage = [
            c
            async for c in await client.chat.completions.create(
                **CHAT, stream=True, stream_options={"include_usage": True}
            )
        ]
    finally:
        await client.close()
    assert fake.total_calls == 1
    assert second.model_dump() == first.model_dump()
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == first.choices[0].message.content
    assert all(c.usage is None for c in chunks)
    assert usage[-1].usage is not None and usage[-1].usage.total_tokens == first.usage.total_tokens
    await wait_idle(cached_proxy.runtime)


async def test_embeddings_hit(fake: FakeUpstream, cached_proxy: RunningProxy) -> None:
    client = openai.AsyncOpenAI(base_url=cached_proxy.base_url, api_key="sk-a", max_retries=0)
    try:
        a = await client.embeddings.create(model="e", input="same text")
        await _stored(cached_proxy)
        b = await client.embeddings.create(model="e", input="same text")
    finally:
        await client.close()
    assert a.model_dump() == b.model_dump() and fake.total_calls == 1


@pytest.mark.parametrize("fault", ["drop", "500", "429"])
async def test_partial_and_error_answers_are_never_cached(
    fake: FakeUpstream, start_proxy: StartProxy, fault: str
) -> None:
    proxy = await start_proxy(_policy("memory"))
    if fault == "drop":
        fake.settings = replace(fake.settings, drop_after=3)
    else:
        fake.settings = replace(fake.settings, error_status=int(fault))
    url = f"{proxy.base_url}/chat/completions"
    async with aiohttp.ClientSession() as session:
        for stream in (True, False):
            await post(session, url, {**CHAT, "stream": stream})
        await _stored(proxy)
        fake.settings = replace(fake.settings, drop_after=None, error_status=None)
        status, headers, _ = await post(session, url, CHAT)
    assert status == 200 and headers["x-llm-sidecar"] == "lead"
    stats = proxy.runtime.cache.stats()
    assert stats is not None and stats.store_ok == 1
    await wait_idle(proxy.runtime)


async def test_cache_control_and_determinism(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(_policy("memory"))
    url = f"{proxy.base_url}/chat/completions"
    async with aiohttp.ClientSession() as session:
        served = []
        for directive in ("no-store", "no-cache", "", "no-cache", ""):
            headers = {"Cache-Control": directive} if directive else {}
            _, out, _ = await post(session, url, CHAT, **headers)
            served.append(out["x-llm-sidecar"])
            await _stored(proxy)
    # no-store: neither read nor written; no-cache: not read, but written.
    assert served == ["lead", "lead", "hit", "lead", "hit"]
    assert fake.total_calls == 3

    only = await start_proxy(_policy("memory", only_deterministic=True))
    url = f"{only.base_url}/chat/completions"
    async with aiohttp.ClientSession() as session:
        for body in (CHAT, {**CHAT, "temperature": 0}, {**CHAT, "seed": 7}):
            first = (await post(session, url, body))[1]["x-llm-sidecar"]
            await _stored(only)
            second = (await post(session, url, body))[1]["x-llm-sidecar"]
            assert first == "lead"
            assert second == ("lead" if body is CHAT else "hit")


async def test_tenants_never_see_each_others_entries(
    fake: FakeUpstream, cached_proxy: RunningProxy
) -> None:
    url = f"{cached_proxy.base_url}/chat/completions"
    async with aiohttp.ClientSession() as session:
        a1 = await post(session, url, CHAT, Authorization="Bearer sk-alice")
        await _stored(cached_proxy)
        b1 = await post(session, url, CHAT, Authorization="Bearer sk-bob")
        await _stored(cached_proxy)
        a2 = await post(session, url, CHAT, Authorization="Bearer sk-alice")
    assert [r[1]["x-llm-sidecar"] for r in (a1, b1, a2)] == ["lead", "lead", "hit"]
    assert fake.total_calls == 2


async def test_credentials_never_reach_redis(
    fake: FakeUpstream, start_proxy: StartProxy, redis_server: RedisServer
) -> None:
    import redis.asyncio as aioredis

    proxy = await start_proxy(_policy("redis", redis_server))
    async with aiohttp.ClientSession() as session:
        await post(
            session,
            f"{proxy.base_url}/chat/completions",
            CHAT,
            Authorization="Bearer sk-canary-1234567890",
        )
        await _stored(proxy)
    client = aioredis.Redis(port=redis_server.port)
    try:
        keys = await client.keys("*")
        assert keys
        for key in keys:
            value = await client.get(key)
            assert b"sk-canary" not in key and b"sk-canary" not in (value or b"")
    finally:
        await client.aclose()


async def test_hits_do_not_queue_behind_busy_stages(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(
        {
            **_policy("memory"),
            "stages": {
                "leader": {"max_concurrency": 2, "max_queue": 100, "queue_timeout": "30s"},
                "upstream": {"max_concurrency": 2, "max_queue": 100, "queue_timeout": "30s"},
            },
        }
    )
    url = f"{proxy.base_url}/chat/completions"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await post(session, url, CHAT)  # the entry the hits will read
        await _stored(proxy)
        fake.hold_after = 0  # every new upstream call now hangs until released
        slow = [
            asyncio.create_task(
                post(
                    session,
                    url,
                    {
                        **CHAT,
                        "messages": [{"role": "user", "content": f"slow {i}"}],
                        "stream": True,
                    },
                )
            )
            for i in range(6)
        ]
        async with asyncio.timeout(10):
            while (
                proxy.runtime.stages.upstream.stats().in_use < 2
                or proxy.runtime.stages.leader.stats().queued
                + proxy.runtime.stages.upstream.stats().queued
                < 2
            ):
                await asyncio.sleep(0.01)
        recorder = record_stages(proxy.runtime)
        async with asyncio.timeout(30):
            hits = await asyncio.gather(*(post(session, url, CHAT) for _ in range(1000)))
        assert all(status == 200 and h["x-llm-sidecar"] == "hit" for status, h, _ in hits)
        assert recorder.events == []  # no hit touched a stage
        fake.release.set()
        await asyncio.gather(*slow)
    await wait_idle(proxy.runtime)


def _prompt(text: str) -> dict[str, Any]:
    return {**CHAT, "messages": [{"role": "user", "content": text}], "stream": True}


async def test_redis_outage_fails_no_request(
    fake: FakeUpstream, start_proxy: StartProxy, redis_server: RedisServer
) -> None:
    proxy = await start_proxy(_policy("redis", redis_server, local_tier=False))
    cache: Any = proxy.runtime.cache
    url = f"{proxy.base_url}/chat/completions"
    async with aiohttp.ClientSession() as session:
        assert (await post(session, url, CHAT))[0] == 200
        await _stored(proxy)
        assert (await post(session, url, CHAT))[1]["x-llm-sidecar"] == "hit"
        redis_server.kill()
        statuses = [(await post(session, url, CHAT))[0] for _ in range(6)]
        assert statuses == [200] * 6
        assert cache.stats().breaker_opened >= 1
        redis_server.restart()
        served = ""
        async with asyncio.timeout(10):
            while served != "hit":
                # The restarted Redis is empty: the first success re-stores the entry.
                status, headers, _ = await post(session, url, CHAT)
                assert status == 200
                served = headers["x-llm-sidecar"]
                await _stored(proxy)
                await asyncio.sleep(0.05)
        assert cache.stats().breaker_state == "closed"
    await wait_idle(proxy.runtime)


async def test_hung_redis_costs_at_most_the_timeout(
    fake: FakeUpstream, start_proxy: StartProxy, redis_server: RedisServer
) -> None:
    import redis.asyncio as aioredis

    proxy = await start_proxy(_policy("redis", redis_server))
    url = f"{proxy.base_url}/chat/completions"
    admin = aioredis.Redis(port=redis_server.port)
    try:
        async with aiohttp.ClientSession() as session:
            await post(session, url, CHAT)  # warm the pools
            started = time.monotonic()
            await post(session, url, {**CHAT, "seed": 1})
            baseline = time.monotonic() - started
            sleeper = asyncio.create_task(admin.execute_command("DEBUG", "SLEEP", "1.5"))
            await asyncio.sleep(0.05)
            started = time.monotonic()
            status, headers, _ = await post(session, url, {**CHAT, "seed": 2})
            during = time.monotonic() - started
            await sleeper
    finally:
        await admin.aclose()
    assert status == 200 and headers["x-llm-sidecar"] == "lead"
    # The lookup timed out (200 ms) and the request went on as a miss.
    assert during < baseline + 0.2 + 0.5
    stats = proxy.runtime.cache.stats()
    assert stats is not None and stats.timeouts >= 1


async def test_no_second_call_while_the_answer_is_being_written(
    fake: FakeUpstream, start_proxy: StartProxy, redis_server: RedisServer
) -> None:
    import redis.asyncio as aioredis

    # Redis writes land after the readers are answered. Hold them back with
    # CLIENT PAUSE (reads still go through): a finished stream must stay
    # joinable until its write lands, so a repeat never calls the upstream.
    policy = _policy("redis", redis_server, local_tier=False)
    policy["cache"]["timeout"] = "2s"
    proxy = await start_proxy(policy)
    url = f"{proxy.base_url}/chat/completions"
    admin = aioredis.Redis(port=redis_server.port)
    served = []
    try:
        async with aiohttp.ClientSession() as session:
            for n in range(3):
                body = {**CHAT, "messages": [{"role": "user", "content": f"gap {n}"}]}
                await admin.execute_command("CLIENT", "PAUSE", "400", "WRITE")
                first = await post(session, url, body)
                second = await post(session, url, body)
                assert first[0] == second[0] == 200 and first[2] == second[2]
                served.append(second[1]["x-llm-sidecar"])
                await proxy.runtime.cache.flush()
    finally:
        await admin.aclose()
    assert fake.total_calls == 3
    assert served == ["follow"] * 3
    await wait_idle(proxy.runtime)


async def test_redis_down_at_start_up_costs_nothing_but_misses(
    fake: FakeUpstream, start_proxy: StartProxy, redis_server: RedisServer
) -> None:
    redis_server.kill()  # nothing listens on its port now
    proxy = await start_proxy(_policy("redis", redis_server, local_tier=False))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{proxy.port}/readyz") as ready:
            assert ready.status == 200
        results = [
            await post(session, f"{proxy.base_url}/chat/completions", CHAT) for _ in range(3)
        ]
    assert [r[0] for r in results] == [200, 200, 200]
    assert [r[1]["x-llm-sidecar"] for r in results] == ["lead"] * 3
    await wait_idle(proxy.runtime)


async def test_a_fresh_miss_looks_the_cache_up_once(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(_policy("memory"))
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await post(session, f"{proxy.base_url}/chat/completions", CHAT)
    assert status == 200 and headers["x-llm-sidecar"] == "lead"
    stats = proxy.runtime.cache.stats()
    # The leader took its slot without queueing: nothing could have landed since the miss.
    assert stats is not None and (stats.hits, stats.misses) == (0, 1)
    await wait_idle(proxy.runtime)


async def test_a_leader_that_queued_finds_an_answer_that_landed_meanwhile(
    fake: FakeUpstream, start_proxy: StartProxy, hook: Hook
) -> None:
    policy = _policy("memory")
    policy["routes"][0]["prepare"] = [{"step": "http_hook", "url": hook.url}]
    policy["stages"] = {"leader": {"max_concurrency": 1, "max_queue": 10, "queue_timeout": "10s"}}
    proxy = await start_proxy(policy)
    rt = proxy.runtime
    url = f"{proxy.base_url}/chat/completions"
    hook.gate = asyncio.Event()  # the first leader holds the only leader slot in its hook
    other = {**CHAT, "messages": [{"role": "user", "content": "another prompt"}]}
    async with aiohttp.ClientSession() as session:
        first = asyncio.create_task(post(session, url, other))
        await until(lambda: hook.calls == 1)
        busy = {s.key for s in rt.table}
        queued = asyncio.create_task(post(session, url, CHAT))
        await until(lambda: rt.stages.leader.stats().queued == 1)
        (key,) = {s.key for s in rt.table} - busy
        landed = CachedAnswer(200, "application/json", False, (), None, ANSWER, time.time())
        rt.cache.store(key, landed, 3600)
        hook.gate.set()
        (status, headers, body), _ = await asyncio.gather(queued, first)
    assert status == 200 and body == ANSWER and headers["x-llm-sidecar"] == "lead"
    assert fake.calls_for(CHAT) == 0 and hook.calls == 1
    await wait_idle(rt)
