"""The cache fast lane: misses instead of failures, bounds, breaker, lifetime.

Redis faults are real: a redis-server killed and restarted, or put to sleep
with DEBUG SLEEP. Lane bounds use a gated in-test backend (not a Redis mock)
so that the test decides when a backend call ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml
from redis.asyncio import Redis

from proxy.cache.base import CachedAnswer
from proxy.cache.breaker import CircuitBreaker
from proxy.cache.factory import build_cache
from proxy.cache.lane import CacheLane
from proxy.cache.memory import MemoryBackend
from proxy.cache.redis import RedisBackend
from proxy.policy import Policy, PolicyError, parse_policy
from tests.redis_server import RedisServer

PREFIX = "lane:"
ANSWER = CachedAnswer(
    status=200,
    content_type="application/json",
    is_sse=False,
    events=(),
    usage_event=None,
    body=b'{"choices":[{"message":{"content":"hi"}}]}',
    stored_at=1_700_000_000.0,
)
# Generous bounds for "returns within about `timeout`": the figure users rely
# on, not the exact one, so a loaded machine does not flake.
FAST = 1.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class GatedBackend:
    """A backend whose calls wait until the test opens the gate."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.entered = 0
        self.data: dict[str, CachedAnswer] = {}
        self.closed = False

    async def get(self, key: str) -> CachedAnswer | None:
        self.entered += 1
        await self.gate.wait()
        return self.data.get(key)

    async def set(self, key: str, answer: CachedAnswer, ttl: float) -> None:
        self.entered += 1
        await self.gate.wait()
        self.data[key] = answer

    async def delete(self, key: str) -> None:
        self.data.pop(key, None)

    async def close(self) -> None:
        self.closed = True


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def timed_lookup(lane: CacheLane, key: str) -> CachedAnswer | None:
    start = time.monotonic()
    async with asyncio.timeout(5):
        answer = await lane.lookup(key)
    assert time.monotonic() - start < FAST
    return answer


def redis_lane(
    server: RedisServer,
    *,
    timeout: float = 0.5,
    breaker: CircuitBreaker | None = None,
    workers: int = 4,
) -> CacheLane:
    backend = RedisBackend(server.url, password=None, timeout=timeout, key_prefix=PREFIX)
    return CacheLane(
        backend, workers, 16, timeout, breaker or CircuitBreaker(3, 0.2), max_writes=16
    )


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


def policy_of(cache: dict[str, Any], stages: dict[str, Any] | None = None) -> Policy:
    data = {
        "upstreams": {"u": {"base_url": "http://127.0.0.1:9/v1"}},
        "routes": [{"match": {"path": "/v1/*"}, "upstream": "u"}],
        "cache": cache,
        "stages": {"cache": stages or {"workers": 2, "max_queue": 8}},
    }
    return parse_policy(yaml.safe_dump(data), "test.yaml").policy


# -- roundtrips ----------------------------------------------------------


async def test_memory_lane_miss_then_hit() -> None:
    lane = build_cache(policy_of({"backend": "memory", "max_bytes": "1MiB"}), {})
    assert isinstance(lane.backend, MemoryBackend)
    try:
        assert await lane.lookup("k") is None
        lane.store("k", ANSWER, 60)
        assert await lane.lookup("k") is ANSWER
        stats = lane.stats()
        assert (stats.hits, stats.misses, stats.store_ok) == (1, 1, 1)
        assert not lane._workers  # inline: no worker was ever started
    finally:
        await lane.close()


async def test_redis_lane_miss_then_hit(redis_server: RedisServer) -> None:
    lane = build_cache(
        policy_of({"backend": "redis", "url": redis_server.url, "key_prefix": PREFIX}), {}
    )
    try:
        assert await timed_lookup(lane, "k") is None
        lane.store("k", ANSWER, 60)
        async with asyncio.timeout(5):
            await lane.flush()
        assert await timed_lookup(lane, "k") == ANSWER
        stats = lane.stats()
        assert (stats.hits, stats.misses, stats.store_ok, stats.errors) == (1, 1, 1, 0)
        assert (stats.in_lane, stats.writes_pending) == (0, 0)
    finally:
        await lane.close()


async def test_corrupt_record_is_a_miss_and_is_deleted(
    redis_server: RedisServer, raw: Redis
) -> None:
    lane = redis_lane(redis_server)
    try:
        await raw.set(PREFIX + "bad", b"\x00not a record")
        assert await timed_lookup(lane, "bad") is None
        async with asyncio.timeout(5):
            await lane.flush()
            assert await raw.exists(PREFIX + "bad") == 0
        stats = lane.stats()
        assert (stats.corrupt, stats.misses, stats.errors) == (1, 1, 0)
        assert stats.breaker_state == "closed"
    finally:
        await lane.close()


# -- redis faults --------------------------------------------------------


async def test_redis_down_at_start_up_then_back(redis_server: RedisServer) -> None:
    redis_server.kill()
    lane = build_cache(
        policy_of({"backend": "redis", "url": redis_server.url, "key_prefix": PREFIX}), {}
    )
    try:
        assert await timed_lookup(lane, "k") is None
        assert lane.stats().errors == 1
        redis_server.restart()
        lane.store("k", ANSWER, 60)
        async with asyncio.timeout(5):
            await lane.flush()
        assert await timed_lookup(lane, "k") == ANSWER
    finally:
        await lane.close()


async def test_redis_killed_mid_run_breaker_opens_then_closes(redis_server: RedisServer) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(2, 5.0, clock=clock)
    lane = redis_lane(redis_server, breaker=breaker)
    try:
        lane.store("k", ANSWER, 60)
        async with asyncio.timeout(5):
            await lane.flush()
        assert await timed_lookup(lane, "k") == ANSWER

        redis_server.kill()
        assert await timed_lookup(lane, "k") is None
        assert breaker.state == "closed"
        assert await timed_lookup(lane, "k") is None
        stats = lane.stats()
        assert (stats.errors, stats.breaker_opened, stats.breaker_state) == (2, 1, "open")

        # Open: the backend is not called at all, writes are not attempted.
        for _ in range(5):
            assert await timed_lookup(lane, "k") is None
        lane.store("k", ANSWER, 60)
        stats = lane.stats()
        assert (stats.errors, stats.breaker_skipped, stats.store_dropped) == (2, 5, 1)

        # Still dead when the probe goes: it fails and the breaker reopens.
        clock.now += 5.0
        assert await timed_lookup(lane, "k") is None
        stats = lane.stats()
        assert (stats.errors, stats.breaker_opened, stats.breaker_state) == (3, 2, "open")

        redis_server.restart()  # empty: the old entry died with the process
        clock.now += 5.0
        assert await timed_lookup(lane, "k") is None  # the probe: a clean miss
        assert lane.stats().breaker_state == "closed"
        lane.store("k", ANSWER, 60)
        async with asyncio.timeout(5):
            await lane.flush()
        assert await timed_lookup(lane, "k") == ANSWER
        stats = lane.stats()
        assert (stats.hits, stats.errors, stats.breaker_opened) == (2, 3, 2)
    finally:
        await lane.close()


async def test_hung_redis_costs_at_most_the_timeout(redis_server: RedisServer) -> None:
    clock = FakeClock()
    lane = redis_lane(redis_server, timeout=0.2, breaker=CircuitBreaker(1, 1.0, clock=clock))
    admin = Redis.from_url(redis_server.url)
    sleeper: asyncio.Task[Any] | None = None
    try:
        lane.store("a", ANSWER, 60)
        async with asyncio.timeout(5):
            await lane.flush()
        assert await timed_lookup(lane, "a") == ANSWER

        sleep = admin.execute_command("DEBUG", "SLEEP", "2")
        sleeper = asyncio.create_task(sleep)
        # The server handles DEBUG SLEEP as soon as it reads it; until it does a
        # lookup may still be answered. Every lookup must be fast either way.
        async with asyncio.timeout(1.5):
            while lane.stats().timeouts == 0:
                assert await timed_lookup(lane, "a") in (None, ANSWER)
        # The caller stops waiting at the deadline; the worker records the
        # fault on the breaker just after.
        await wait_for(lambda: lane.breaker.state == "open")
        stats = lane.stats()
        assert (stats.timeouts, stats.breaker_opened, stats.errors) == (1, 1, 0)
        # Open: no call reaches the sleeping server, and answers are instant.
        start = time.monotonic()
        assert await lane.lookup("a") is None
        assert time.monotonic() - start < 0.1
        assert lane.stats().breaker_skipped >= 1

        async with asyncio.timeout(5):
            await sleeper
        clock.now += 1.0
        # The timed-out connection (with GET a's reply still due) was thrown
        # away: a reused one would answer this GET b with a's record.
        assert await timed_lookup(lane, "b") is None
        assert lane.stats().breaker_state == "closed"
        assert await timed_lookup(lane, "a") == ANSWER
    finally:
        if sleeper is not None:
            sleeper.cancel()
            await asyncio.gather(sleeper, return_exceptions=True)
        await admin.aclose()
        await lane.close()


async def test_redis_password_from_the_environment(redis_server: RedisServer, raw: Redis) -> None:
    await raw.config_set("requirepass", "s3cret")
    cache = {"backend": "redis", "url": redis_server.url, "password_env": "LLM_TEST_REDIS_PW"}
    with pytest.raises(PolicyError, match="LLM_TEST_REDIS_PW is not set"):
        build_cache(policy_of(cache), {})
    lane = build_cache(policy_of(cache), {"LLM_TEST_REDIS_PW": "s3cret"})
    try:
        assert await timed_lookup(lane, "k") is None
        assert lane.stats().errors == 0
    finally:
        await lane.close()


def test_malformed_redis_url_is_a_policy_error() -> None:
    with pytest.raises(PolicyError, match=r"cache\.url"):
        build_cache(policy_of({"backend": "redis", "url": "http://127.0.0.1:6379"}), {})


# -- lane bounds (gated backend) -----------------------------------------


async def test_full_lane_is_an_immediate_miss() -> None:
    backend = GatedBackend()
    backend.data["k"] = ANSWER
    lane = CacheLane(backend, 1, 1, 5.0, CircuitBreaker(3, 1.0))
    try:
        first = asyncio.create_task(lane.lookup("k"))  # in the worker
        second = asyncio.create_task(lane.lookup("k"))  # queued
        await wait_for(lambda: backend.entered == 1 and lane.stats().in_lane == 2)
        start = time.monotonic()
        async with asyncio.timeout(1):
            assert await lane.lookup("k") is None
        assert time.monotonic() - start < 0.1
        assert lane.stats().lane_full == 1
        backend.gate.set()
        async with asyncio.timeout(5):
            assert await first == ANSWER
            assert await second == ANSWER
        stats = lane.stats()
        assert (stats.hits, stats.misses, stats.lane_full, stats.in_lane) == (2, 1, 1, 0)
    finally:
        await lane.close()


async def test_queue_wait_counts_against_the_deadline() -> None:
    backend = GatedBackend()
    lane = CacheLane(backend, 1, 4, 0.2, CircuitBreaker(3, 1.0))
    try:
        stuck = asyncio.create_task(lane.lookup("a"))
        await wait_for(lambda: backend.entered == 1)
        # Queued behind a call that does not end: answered at its own deadline.
        assert await timed_lookup(lane, "b") is None
        async with asyncio.timeout(5):
            assert await stuck is None
        await wait_for(lambda: lane.stats().in_lane == 0)
        assert lane.stats().timeouts == 2
    finally:
        await lane.close()


async def test_job_whose_caller_gave_up_never_reaches_the_backend() -> None:
    backend = GatedBackend()
    lane = CacheLane(backend, 1, 4, 5.0, CircuitBreaker(3, 1.0))
    try:
        slow = asyncio.create_task(lane.lookup("a"))
        await wait_for(lambda: backend.entered == 1)
        lane.timeout = 0.1  # as after a reload: this job's deadline comes first
        assert await timed_lookup(lane, "b") is None
        backend.gate.set()
        async with asyncio.timeout(5):
            assert await slow is None
        await wait_for(lambda: lane.stats().in_lane == 0)
        assert backend.entered == 1
        assert lane.stats().timeouts == 1
    finally:
        await lane.close()


async def test_writes_past_the_bound_are_dropped() -> None:
    backend = GatedBackend()
    lane = CacheLane(backend, 1, 0, 5.0, CircuitBreaker(3, 1.0), max_writes=2)
    try:
        for n in range(5):
            lane.store(f"k{n}", ANSWER, 60)
        stats = lane.stats()
        assert (stats.writes_pending, stats.store_dropped) == (2, 3)
        backend.gate.set()
        async with asyncio.timeout(5):
            await lane.flush()
        assert sorted(backend.data) == ["k0", "k1"]
        assert lane.stats().store_ok == 2
    finally:
        await lane.close()


async def test_cancelled_caller_leaves_nothing_queued() -> None:
    backend = GatedBackend()
    lane = CacheLane(backend, 1, 4, 5.0, CircuitBreaker(3, 1.0))
    try:
        first = asyncio.create_task(lane.lookup("a"))
        second = asyncio.create_task(lane.lookup("b"))
        await wait_for(lambda: backend.entered == 1 and lane.stats().in_lane == 2)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        backend.gate.set()
        async with asyncio.timeout(5):
            assert await first is None
        await wait_for(lambda: lane.stats().in_lane == 0)
        assert backend.entered == 1  # the cancelled job was skipped
    finally:
        await lane.close()


async def test_close_leaves_no_task_behind() -> None:
    before = asyncio.all_tasks()
    backend = GatedBackend()
    lane = CacheLane(backend, 2, 4, 0.5, CircuitBreaker(3, 1.0), max_writes=4)
    lookups = [asyncio.create_task(lane.lookup(f"k{n}")) for n in range(4)]
    lane.store("w", ANSWER, 60)
    await wait_for(lambda: backend.entered == 3)  # two lookups and the write are in
    start = time.monotonic()
    async with asyncio.timeout(10):
        await lane.close()
        # Waiting callers get a miss, not an exception and not a hang.
        assert await asyncio.gather(*lookups) == [None] * 4
    # The write had one `timeout` to finish; it was stuck, so it was cancelled.
    assert time.monotonic() - start < 0.5 + FAST
    assert backend.closed
    assert asyncio.all_tasks() - before == set()
    stats = lane.stats()
    assert (stats.in_lane, stats.writes_pending) == (0, 0)
    # A closed lane is inert.
    assert await lane.lookup("k0") is None
    lane.store("x", ANSWER, 60)
    assert lane.stats().writes_pending == 0


async def test_close_waits_for_writes_that_finish_in_time(redis_server: RedisServer) -> None:
    before = asyncio.all_tasks()
    lane = redis_lane(redis_server)
    lane.store("k", ANSWER, 60)
    assert await timed_lookup(lane, "nothing") is None  # starts the workers
    async with asyncio.timeout(5):
        await lane.close()
    assert lane.stats().store_ok == 1
    assert asyncio.all_tasks() - before == set()
    check = RedisBackend(redis_server.url, password=None, timeout=1.0, key_prefix=PREFIX)
    try:
        assert await check.get("k") == ANSWER
    finally:
        await check.close()


# -- breaker -------------------------------------------------------------


def test_breaker_cycle() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(3, 2.0, clock=clock)
    for _ in range(2):
        permit = breaker.allow()
        assert permit == "call"
        breaker.record(permit, False)
    assert breaker.state == "closed"
    ok = breaker.allow()
    assert ok == "call"
    breaker.record(ok, True)  # a success resets the run of failures
    for _ in range(3):
        permit = breaker.allow()
        assert permit == "call"
        breaker.record(permit, False)
    assert (breaker.state, breaker.opened) == ("open", 1)
    assert breaker.refusing() and breaker.allow() is None

    clock.now += 2.0
    assert not breaker.refusing()
    probe = breaker.allow()
    assert (probe, breaker.state) == ("probe", "half_open")
    assert probe is not None
    assert breaker.refusing() and breaker.allow() is None  # one probe at a time
    breaker.record(probe, False)
    assert (breaker.state, breaker.opened) == ("open", 2)

    clock.now += 2.0
    probe = breaker.allow()
    assert probe == "probe"
    breaker.record(probe, True)
    assert breaker.state == "closed"
    assert breaker.allow() == "call"


def test_breaker_ignores_late_outcomes_of_calls_from_before_it_opened() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(1, 2.0, clock=clock)
    early = breaker.allow()
    late = breaker.allow()
    assert early == late == "call"
    breaker.record(early, False)
    assert (breaker.state,) == ("open",)
    breaker.record(late, True)  # not the probe: does not close it
    assert (breaker.state,) == ("open",)
    clock.now += 2.0
    probe = breaker.allow()
    assert probe == "probe"
    breaker.record("call", False)  # a straggler's failure does not end the probe
    assert (breaker.state,) == ("half_open",)
    assert breaker.allow() is None
    breaker.record(probe, True)
    assert breaker.state == "closed"


def _answer_of(size: int) -> CachedAnswer:
    return CachedAnswer(
        status=200,
        content_type="application/json",
        is_sse=False,
        events=(),
        usage_event=None,
        body=b"x" * size,
        stored_at=1_700_000_000.0,
    )


@pytest.mark.parametrize("backend_name", ["memory", "redis"])
async def test_an_answer_over_max_entry_bytes_is_not_written(
    backend_name: str, request: pytest.FixtureRequest
) -> None:
    cache: dict[str, Any] = {"max_entry_bytes": "64KiB", "timeout": "1s"}
    if backend_name == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        cache.update(backend="redis", url=server.url)
    lane = build_cache(policy_of(cache), {})
    try:
        lane.store("big", _answer_of(64 * 1024 + 1), 60)
        lane.store("fits", _answer_of(64 * 1024), 60)
        async with asyncio.timeout(5):
            await lane.flush()
        assert await timed_lookup(lane, "big") is None
        assert await timed_lookup(lane, "fits") == _answer_of(64 * 1024)
        stats = lane.stats()
        assert (stats.store_oversize, stats.store_ok, stats.store_errors) == (1, 1, 0)
    finally:
        await lane.close()


async def test_slow_writes_never_open_the_breaker() -> None:
    # Writes that cannot finish in time (as a huge answer would not) are
    # counted, and their connection dropped, but the backend is not judged
    # sick for them: lookups keep going to it.
    backend = GatedBackend()
    lane = CacheLane(backend, 1, 4, 0.05, CircuitBreaker(3, 60.0), max_writes=8)
    try:
        writes = [lane.store(f"k{n}", ANSWER, 60) for n in range(3)]
        async with asyncio.timeout(5):
            await asyncio.wait([w for w in writes if w is not None])
        stats = lane.stats()
        assert (stats.store_timeouts, stats.store_errors, stats.store_ok) == (3, 3, 0)
        assert lane.breaker.state == "closed" and stats.breaker_opened == 0
        backend.gate.set()
        backend.data["k"] = ANSWER
        assert await timed_lookup(lane, "k") == ANSWER
    finally:
        await lane.close()


async def until_asleep(server: RedisServer) -> None:
    """Until the server stops answering (DEBUG SLEEP has begun)."""
    probe = Redis.from_url(server.url, socket_timeout=0.05)
    try:
        async with asyncio.timeout(5):
            while True:
                try:
                    await probe.ping()
                except Exception:
                    return
    finally:
        await probe.aclose()


async def test_hung_redis_writes_leave_the_breaker_closed(redis_server: RedisServer) -> None:
    lane = redis_lane(redis_server, timeout=0.1, breaker=CircuitBreaker(2, 60.0))
    admin = Redis.from_url(redis_server.url)
    sleeper: asyncio.Task[Any] | None = None
    try:
        sleep = admin.execute_command("DEBUG", "SLEEP", "1")
        sleeper = asyncio.create_task(sleep)
        await until_asleep(redis_server)  # a write before that would just succeed
        for n in range(3):
            lane.store(f"w{n}", ANSWER, 60)
        async with asyncio.timeout(5):
            await lane.flush()
        assert lane.stats().store_errors == lane.stats().store_timeouts >= 1
        assert lane.breaker.state == "closed"
        async with asyncio.timeout(5):
            await sleeper
        lane.store("after", ANSWER, 60)
        async with asyncio.timeout(5):
            await lane.flush()
        assert await timed_lookup(lane, "after") == ANSWER
    finally:
        if sleeper is not None:
            sleeper.cancel()
            await asyncio.gather(sleeper, return_exceptions=True)
        await admin.aclose()
        await lane.close()
