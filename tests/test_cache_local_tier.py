"""The in-process tier in front of Redis: repeats without a round trip, never stale.

Against a real redis-server; round trips are counted with `INFO commandstats`
(every command Redis executed, by name), so "no round trip" is asserted on
Redis's own books, not inferred from timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import aiohttp
import pytest
from redis.asyncio import Redis

from proxy.cache.breaker import CircuitBreaker
from proxy.cache.factory import build_cache
from proxy.cache.lane import CacheLane
from proxy.cache.memory import MemoryBackend
from proxy.cache.redis import RedisBackend
from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import StartProxy, post, wait_idle
from tests.redis_server import RedisServer
from tests.test_cache_lane import ANSWER, PREFIX, FakeClock, policy_of, redis_lane

OTHER = replace(ANSWER, body=b'{"choices":[{"message":{"content":"newer"}}]}')


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


async def commands(raw: Redis) -> int:
    """Commands Redis has executed so far, our own INFO calls left out."""
    stats = await raw.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k != "cmdstat_info")


async def reads(raw: Redis) -> int:
    """GET and PTTL calls so far (a new connection also sends CLIENT SETINFO)."""
    stats = await raw.info("commandstats")
    return sum(stats.get(k, {}).get("calls", 0) for k in ("cmdstat_get", "cmdstat_pttl"))


def tiered_lane(server: RedisServer, clock: FakeClock | None = None) -> CacheLane:
    backend = RedisBackend(server.url, password=None, timeout=2.0, key_prefix=PREFIX)
    local = MemoryBackend(1 << 20, clock=clock) if clock is not None else MemoryBackend(1 << 20)
    return CacheLane(backend, 2, 8, 2.0, CircuitBreaker(3, 1.0), max_writes=8, local=local)


async def stored_elsewhere(server: RedisServer, key: str, ttl: float) -> None:
    """Another replica (no local tier) writes `key`."""
    writer = redis_lane(server, timeout=2.0)
    try:
        writer.store(key, ANSWER, ttl)
        async with asyncio.timeout(5):
            await writer.flush()
    finally:
        await writer.close()


async def test_a_repeat_hit_makes_no_redis_round_trip(
    redis_server: RedisServer, raw: Redis
) -> None:
    await stored_elsewhere(redis_server, "k", 60)
    lane = build_cache(
        policy_of({"backend": "redis", "url": redis_server.url, "key_prefix": PREFIX}), {}
    )
    try:
        before = await reads(raw)
        assert await lane.lookup("k") == ANSWER  # from Redis: GET and PTTL, one round trip
        assert await reads(raw) - before == 2
        fetched = await commands(raw)
        for _ in range(3):
            assert await lane.lookup("k") == ANSWER
        assert await commands(raw) == fetched
        stats = lane.stats()
        assert (stats.hits, stats.local_hits, stats.misses) == (4, 3, 0)
        assert stats.hit_ratio == 1.0
        assert 0 < stats.local_bytes <= 1 << 20
    finally:
        await lane.close()


async def test_the_local_copy_never_outlives_the_redis_entry(
    redis_server: RedisServer, raw: Redis
) -> None:
    clock = FakeClock()
    await stored_elsewhere(redis_server, "k", 60)
    await raw.pexpire(PREFIX + "k", 5000)  # Redis keeps it 5 s more: so may we, no longer
    lane = tiered_lane(redis_server, clock)
    try:
        assert await lane.lookup("k") == ANSWER
        counted = await reads(raw)
        clock.now += 4.5
        assert await lane.lookup("k") == ANSWER
        assert await reads(raw) == counted  # still the local copy
        clock.now += 0.5  # 5 s after the fetch: the copy has expired
        assert await lane.lookup("k") == ANSWER  # Redis (real time barely moved) still has it
        assert await reads(raw) == counted + 2
        await raw.delete(PREFIX + "k")
        clock.now += 60
        assert await lane.lookup("k") is None
        assert lane.stats().local_hits == 1
    finally:
        await lane.close()


async def test_a_store_replaces_the_local_copy_at_once(
    redis_server: RedisServer, raw: Redis
) -> None:
    lane = tiered_lane(redis_server)
    try:
        lane.store("k", ANSWER, 60)
        async with asyncio.timeout(5):
            await lane.flush()
        lane.store("k", OTHER, 60)  # what a `no-cache` caller's fresh answer does
        # Before the new Redis write could land (the local path never yields).
        assert await lane.lookup("k") == OTHER
        async with asyncio.timeout(5):
            await lane.flush()
        before = await commands(raw)
        assert await lane.lookup("k") == OTHER
        assert await commands(raw) == before
        reader = RedisBackend(redis_server.url, password=None, timeout=2.0, key_prefix=PREFIX)
        try:
            assert await reader.get("k") == OTHER  # Redis has the fresh answer too
        finally:
            await reader.close()
    finally:
        await lane.close()


async def test_the_tier_is_on_by_default_for_redis_and_can_be_turned_off(
    redis_server: RedisServer, raw: Redis
) -> None:
    config = {"backend": "redis", "url": redis_server.url, "key_prefix": PREFIX}
    assert build_cache(policy_of({"backend": "memory"}), {})._local is None
    lane = build_cache(policy_of({**config, "local_tier": None}), {})
    try:
        lane.store("k", ANSWER, 60)
        async with asyncio.timeout(5):
            await lane.flush()
        before = await reads(raw)
        assert await lane.lookup("k") == ANSWER
        assert await lane.lookup("k") == ANSWER
        assert await reads(raw) - before == 2  # one GET per lookup
        assert lane.stats().local_hits == 0
    finally:
        await lane.close()


async def test_through_the_proxy_no_cache_refreshes_and_repeats_stay_local(
    fake: FakeUpstream, start_proxy: StartProxy, redis_server: RedisServer, raw: Redis
) -> None:
    proxy = await start_proxy(
        {
            "cache": {"backend": "redis", "url": redis_server.url},
            "routes": [{"match": {"path": "/v1/*"}, "upstream": "fake", "cache": {"ttl": "1h"}}],
        }
    )
    url = f"{proxy.base_url}/chat/completions"
    chat = {"model": "m", "messages": [{"role": "user", "content": "tiered"}]}
    lane = proxy.runtime.cache
    assert isinstance(lane, CacheLane)
    async with aiohttp.ClientSession() as session:
        first = await post(session, url, chat)
        await lane.flush()
        fresh = await post(session, url, chat, **{"Cache-Control": "no-cache"})
        await lane.flush()
        before = await commands(raw)
        repeat = await post(session, url, chat)
        after = await commands(raw)
    assert [r[1]["x-llm-sidecar"] for r in (first, fresh, repeat)] == ["lead", "lead", "hit"]
    assert fake.total_calls == 2
    assert first[2] != fresh[2]  # the fake numbers its answers: a new call, a new id
    assert repeat[2] == fresh[2]  # the no-cache answer replaced the first everywhere
    assert after == before
    await wait_idle(proxy.runtime)


async def test_a_local_copy_lives_no_longer_than_max_ttl(
    redis_server: RedisServer, raw: Redis
) -> None:
    clock = FakeClock()
    await stored_elsewhere(redis_server, "k", 3600)
    backend = RedisBackend(redis_server.url, password=None, timeout=2.0, key_prefix=PREFIX)
    local = MemoryBackend(1 << 20, clock=clock)
    lane = CacheLane(
        backend, 2, 8, 2.0, CircuitBreaker(3, 1.0), max_writes=8, local=local, local_max_ttl=10
    )
    try:
        assert await lane.lookup("k") == ANSWER
        await raw.flushdb()  # another sidecar's operator empties Redis
        clock.now += 9.5
        assert await lane.lookup("k") == ANSWER  # the copy, though the entry is gone
        clock.now += 0.5  # max_ttl after the fetch, far short of the entry's TTL
        assert await lane.lookup("k") is None
    finally:
        await lane.close()
