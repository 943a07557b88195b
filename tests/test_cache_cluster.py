"""The cache on a real 3-master Redis Cluster (`cache.mode: cluster`).

Every test runs against the session's cluster (tests/redis_cluster.py),
healthy and empty at its start: entries spread over the masters by their
hash tag, a hit after a write through the proxy, a dead or hung node costs
misses and never a request, and every name kept for one request key lands
in one slot.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from proxy.cache.breaker import CircuitBreaker
from proxy.cache.factory import build_cache
from proxy.cache.lane import CacheLane
from proxy.cache.redis import RedisBackend
from proxy.redis_names import redis_name
from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import StartProxy, post, until, wait_idle
from tests.redis_cluster import RedisClusterNodes
from tests.test_cache_lane import ANSWER, FakeClock, policy_of, timed_lookup

PREFIX = "llm-sidecar:"


def _key(n: int) -> str:
    """A request key as the pipeline makes them: a SHA-256 hex digest."""
    return hashlib.sha256(f"request {n}".encode()).hexdigest()


def _backend(cluster: RedisClusterNodes, timeout: float = 1.0) -> RedisBackend:
    return RedisBackend(
        cluster.url, password=None, timeout=timeout, key_prefix=PREFIX, mode="cluster"
    )


async def _node_keys(cluster: RedisClusterNodes, index: int) -> list[bytes]:
    node = Redis(port=cluster.nodes[index].port)
    try:
        names = await node.keys("*")
    finally:
        await node.aclose()
    assert all(isinstance(name, bytes) for name in names)
    return sorted(name for name in names if isinstance(name, bytes))


def _policy(cluster: RedisClusterNodes, **cache: Any) -> dict[str, Any]:
    return {
        "cache": {"backend": "redis", "mode": "cluster", "url": cluster.url, **cache},
        "routes": [{"match": {"path": "/v1/*"}, "upstream": "fake", "cache": {"ttl": "1h"}}],
    }


def _content(body: bytes) -> str:
    text: str = orjson.loads(body)["choices"][0]["message"]["content"]
    return text


def _chat(n: int) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": f"prompt {n}"}]}


@pytest.fixture
async def backend(redis_cluster: RedisClusterNodes) -> AsyncIterator[RedisBackend]:
    made = _backend(redis_cluster)
    try:
        yield made
    finally:
        await made.close()


async def test_entries_spread_over_all_three_masters(
    redis_cluster: RedisClusterNodes, backend: RedisBackend
) -> None:
    keys = [_key(n) for n in range(60)]
    async with asyncio.timeout(10):
        for key in keys:
            await backend.set(key, ANSWER, 60)
        for key in keys:
            assert await backend.get(key) == ANSWER
        held = [await _node_keys(redis_cluster, i) for i in range(3)]
    # Every master holds some, each exactly the names of the slots it serves.
    assert all(held), [len(names) for names in held]
    assert sum(len(names) for names in held) == len(keys)
    for index, names in enumerate(held):
        assert all(
            name.startswith(PREFIX.encode() + b"{") and name.endswith(b"}") for name in names
        )
        assert set(redis_cluster.nodes_of(*(name.decode() for name in names))) == {index}


async def test_proxy_hit_after_write_on_a_cluster(
    fake: FakeUpstream, start_proxy: StartProxy, redis_cluster: RedisClusterNodes
) -> None:
    proxy = await start_proxy(_policy(redis_cluster))
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-a", max_retries=0)
    try:
        async with asyncio.timeout(20):
            first = await client.chat.completions.with_raw_response.create(**_chat(0))
            await proxy.runtime.cache.flush()
            second = await client.chat.completions.with_raw_response.create(**_chat(0))
    finally:
        await client.close()
    assert first.headers["x-llm-sidecar"] == "lead"
    assert second.headers["x-llm-sidecar"] == "hit"
    assert second.parse().choices[0].message == first.parse().choices[0].message
    assert fake.total_calls == 1
    names = [name for i in range(3) for name in await _node_keys(redis_cluster, i)]
    assert len(names) == 1 and names[0].startswith(PREFIX.encode() + b"{")
    await wait_idle(proxy.runtime)


async def test_the_local_tier_fetches_the_tagged_entry_then_answers_repeats_alone(
    redis_cluster: RedisClusterNodes,
) -> None:
    """Another sidecar's answer is read under its hash-tagged name (GET and
    PTTL in one pipeline to its slot's master), then kept in-process."""
    key = _key(1)
    writer = _backend(redis_cluster)
    try:
        async with asyncio.timeout(10):
            await writer.set(key, ANSWER, 60)
    finally:
        await writer.close()
    # The first call of a cluster client also fetches the slot map: 2 s, not 200 ms.
    cache = {"backend": "redis", "mode": "cluster", "url": redis_cluster.url, "timeout": "2s"}
    lane = build_cache(policy_of({**cache, "key_prefix": PREFIX}), {})
    try:
        async with asyncio.timeout(10):
            assert await lane.lookup(key) == ANSWER
            assert await lane.lookup(key) == ANSWER
        stats = lane.stats()
        assert (stats.hits, stats.local_hits, stats.misses, stats.errors) == (2, 1, 0, 0)
    finally:
        await lane.close()


async def test_killed_node_costs_misses_never_failures(
    fake: FakeUpstream, start_proxy: StartProxy, redis_cluster: RedisClusterNodes
) -> None:
    prompts = 30
    # Without the local tier, which would answer every repeat from this
    # sidecar's own memory: what is measured is a read that reaches the cluster.
    proxy = await start_proxy(_policy(redis_cluster, local_tier=None))
    url = f"{proxy.base_url}/chat/completions"
    async with aiohttp.ClientSession() as session, asyncio.timeout(60):
        before = [await post(session, url, _chat(n)) for n in range(prompts)]
        await proxy.runtime.cache.flush()
        held = [len(await _node_keys(redis_cluster, i)) for i in range(3)]
        assert sum(held) == prompts
        dead = max(range(3), key=lambda i: held[i])
        redis_cluster.kill(dead)
        calls = fake.total_calls
        after = [await post(session, url, _chat(n)) for n in range(prompts)]
        await proxy.runtime.cache.flush()
    assert [status for status, _, _ in after] == [200] * prompts
    # The same answers (the fake's text is deterministic), none of them an error.
    assert [_content(body) for _, _, body in after] == [_content(body) for _, _, body in before]
    served = [headers["x-llm-sidecar"] for _, headers, _ in after]
    assert set(served) <= {"hit", "lead"}
    # Every entry on the dead node was a miss, and each miss one upstream call.
    assert served.count("lead") >= held[dead]
    assert fake.total_calls - calls == served.count("lead")
    stats = proxy.runtime.cache.stats()
    assert stats is not None and stats.errors + stats.timeouts >= 1
    await wait_idle(proxy.runtime)


async def test_a_burst_of_first_calls_all_succeed(redis_cluster: RedisClusterNodes) -> None:
    """A fresh client's first calls (a sidecar's first requests) arrive in a
    burst: they must be routed by the slot map, not sent to random masters,
    whose MOVED replies once made redis-py close every connection and fail
    calls that had nothing wrong with them."""
    keys = [_key(n) for n in range(32)]
    for _ in range(3):
        backend = _backend(redis_cluster, timeout=5.0)
        try:
            async with asyncio.timeout(20):
                await asyncio.gather(*(backend.set(key, ANSWER, 60) for key in keys))
                assert await asyncio.gather(*map(backend.get, keys)) == [ANSWER] * len(keys)
        finally:
            await backend.close()


async def test_hung_node_costs_the_timeout_then_the_breaker_opens(
    redis_cluster: RedisClusterNodes,
) -> None:
    """As for a single Redis: each lookup waits at most `timeout`, `failures`
    faults in a row open the breaker (then nothing is tried, on any node),
    and once the node answers again a probe closes it and entries hit."""
    clock = FakeClock()
    timeout = 0.2
    lane = CacheLane(
        _backend(redis_cluster, timeout),
        workers=4,
        max_queue=16,
        timeout=timeout,
        breaker=CircuitBreaker(2, 5.0, clock=clock),
    )
    backend: Any = lane.backend
    keys = [_key(n) for n in range(12)]
    owners = dict(zip(keys, redis_cluster.nodes_of(*map(backend.entry_name, keys)), strict=True))
    hung = owners[keys[0]]
    healthy = next(key for key in keys if owners[key] != hung)
    try:
        async with asyncio.timeout(5):
            for key in keys:
                await backend.set(key, ANSWER, 60)
        assert await timed_lookup(lane, healthy) == ANSWER

        redis_cluster.nodes[hung].pause()
        for _ in range(2):
            assert await timed_lookup(lane, keys[0]) is None
            # The caller stops waiting at the deadline; the worker records
            # the fault on the breaker just after.
            await until(lambda: lane.stats().in_lane == 0)
        assert lane.breaker.state == "open"
        stats = lane.stats()
        assert stats.errors + stats.timeouts == 2 and stats.breaker_opened == 1
        # Open: a key on a healthy node is not even tried.
        started = time.monotonic()
        assert await lane.lookup(healthy) is None
        assert time.monotonic() - started < 0.1
        assert lane.stats().breaker_skipped == 1

        redis_cluster.nodes[hung].resume()
        # A probe per reset_after: the first one after the node woke up
        # (fetching the slot map again, then GET) closes the breaker.
        async with asyncio.timeout(10):
            while lane.stats().breaker_state != "closed":
                clock.now += 5.0
                await timed_lookup(lane, keys[0])
                await until(lambda: lane.stats().in_lane == 0)
        assert await timed_lookup(lane, keys[0]) == ANSWER
        assert await timed_lookup(lane, healthy) == ANSWER
    finally:
        redis_cluster.nodes[hung].resume()
        await lane.close()


async def test_every_name_of_one_request_key_shares_its_slot(
    redis_cluster: RedisClusterNodes, backend: RedisBackend
) -> None:
    keys = [_key(n) for n in range(20)]
    for key in keys:
        names = [
            key,
            backend.entry_name(key),
            redis_name(PREFIX, key, "claim"),
            redis_name(PREFIX, key, "events", "4f2a9c"),
        ]
        assert len(set(redis_cluster.slots_of(*names))) == 1, names
    # The tag is the request key, not the prefix: keys spread over the masters.
    assert set(redis_cluster.nodes_of(*map(backend.entry_name, keys))) == {0, 1, 2}


async def test_one_script_writes_an_entry_a_claim_and_a_stream_on_a_cluster(
    redis_cluster: RedisClusterNodes,
) -> None:
    """What cross-replica coalescing does in one step (claim with SET NX PX,
    append with XADD) runs on a cluster for one key's names; two keys' names
    in one script are refused by Redis itself (CROSSSLOT)."""
    script = """
    redis.call('SET', KEYS[1], ARGV[1], 'PX', 60000)
    local claimed = redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', 5000)
    redis.call('XADD', KEYS[3], '*', 'head', ARGV[1])
    return claimed and 1 or 0
    """
    key, other = _key(1), _key(2)
    client = RedisCluster.from_url(redis_cluster.url)
    try:
        async with asyncio.timeout(10):
            names = [redis_name(PREFIX, key, *parts) for parts in ((), ("claim",), ("events", "t"))]
            assert await client.eval(script, 3, *names, "v", "token") == 1
            assert await client.eval(script, 3, *names, "v", "token") == 0  # claim held
            assert await client.xlen(names[2]) == 2
            crossed = [names[0], redis_name(PREFIX, other, "claim"), names[2]]
            [owner] = redis_cluster.nodes_of(names[0])
            node = Redis(port=redis_cluster.nodes[owner].port)
            try:
                with pytest.raises(ResponseError, match="same slot"):
                    await node.eval(script, 3, *crossed, "v", "token")
            finally:
                await node.aclose()
    finally:
        await client.aclose()


async def test_cluster_password_from_the_environment(redis_cluster: RedisClusterNodes) -> None:
    """The policy's password_env reaches every node's connection (each node
    authenticates its own clients); without it every lookup is a miss, counted."""
    cache = {
        "backend": "redis",
        "mode": "cluster",
        "url": redis_cluster.url,
        "password_env": "LLM_TEST_CLUSTER_PW",
        # The first call of a cluster client also fetches the slot map and
        # the command table; this test is about credentials, not that time.
        "timeout": "2s",
    }
    for index in range(3):
        with redis_cluster.client(index) as node:
            node.config_set("requirepass", "s3cret")
    try:
        lane = build_cache(policy_of(cache), {"LLM_TEST_CLUSTER_PW": "s3cret"})
        wrong = build_cache(policy_of(cache), {"LLM_TEST_CLUSTER_PW": "wrong"})
        try:
            keys = [_key(n) for n in range(8)]  # within the lane's write bound (10)
            for key in keys:
                lane.store(key, ANSWER, 60)
            async with asyncio.timeout(5):
                await lane.flush()
            assert lane.stats().store_ok == len(keys)
            for key in keys:
                assert await timed_lookup(lane, key) == ANSWER
            assert await timed_lookup(wrong, keys[0]) is None
            assert wrong.stats().errors == 1
        finally:
            await lane.close()
            await wrong.close()
    finally:
        for index in range(3):
            port = redis_cluster.nodes[index].port
            with SyncRedis(port=port, password="s3cret", socket_timeout=5) as node:
                node.config_set("requirepass", "")
