"""The cache record codec and the two backends, each on its own (no lane).

Redis tests run against a real redis-server (the `redis_server` fixture).
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from proxy.cache import codec
from proxy.cache.base import Cache, CachedAnswer, NullCache
from proxy.cache.memory import MemoryBackend, answer_size
from proxy.cache.redis import RedisBackend
from tests.redis_server import RedisServer

SSE = CachedAnswer(
    status=200,
    content_type="text/event-stream; charset=utf-8",
    is_sse=True,
    events=(
        b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n',
        b'data: {"choices":[],"usage":{"total_tokens":3}}\n\n',
        b"data: [DONE]\n\n",
    ),
    usage_event=1,
    body=b'{"choices":[{"message":{"content":"hi"}}]}',
    stored_at=1_700_000_000.25,
)
JSON = CachedAnswer(
    status=200,
    content_type="application/json",
    is_sse=False,
    events=(),
    usage_event=None,
    body=b'{"data":[{"embedding":"AAAA"}]}',
    stored_at=1_700_000_001.0,
)


def answer(n: int, size: int = 100) -> CachedAnswer:
    return CachedAnswer(
        status=200,
        content_type="application/json",
        is_sse=False,
        events=(),
        usage_event=None,
        body=bytes([n % 251]) * size,
        stored_at=float(n),
    )


# -- codec ---------------------------------------------------------------

answers = st.builds(
    lambda status, ctype, sse, events, usage, body, at: CachedAnswer(
        status=status,
        content_type=ctype,
        is_sse=sse,
        events=tuple(events),
        usage_event=(usage % len(events)) if usage is not None and events else None,
        body=body,
        stored_at=at,
    ),
    st.integers(100, 599),
    st.text(max_size=40),
    st.booleans(),
    st.lists(st.binary(max_size=40), max_size=8),
    st.none() | st.integers(0, 100),
    st.none() | st.binary(max_size=60),
    st.floats(allow_nan=False),
)


@settings(max_examples=300, deadline=None)
@given(answers)
def test_codec_roundtrip(value: CachedAnswer) -> None:
    assert codec.decode(codec.encode(value)) == value


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_codec_never_raises_on_foreign_bytes(record: bytes) -> None:
    assert codec.decode(record) is None
    # Even with our magic and version in front, garbage is refused.
    assert codec.decode(codec.MAGIC + bytes((codec.VERSION,)) + record) is None


def test_codec_refuses_every_truncation_and_every_flipped_byte() -> None:
    record = codec.encode(SSE)
    for end in range(len(record)):
        assert codec.decode(record[:end]) is None, end
    for at in range(len(record)):
        damaged = bytearray(record)
        damaged[at] ^= 0x5A
        assert codec.decode(bytes(damaged)) is None, at
    assert codec.decode(record + b"\x00") is None


def test_codec_reads_version_1_records_whose_meaning_did_not_change() -> None:
    for answer in (SSE, JSON):
        record = bytearray(codec.encode(answer))
        record[len(codec.MAGIC)] = 1
        crc_at = len(codec.MAGIC) + 1 + codec._HEADER.size
        crc = zlib.crc32(record[crc_at + 4 :], zlib.crc32(record[:crc_at]))
        record[crc_at : crc_at + 4] = crc.to_bytes(4, "big")
        assert codec.decode(bytes(record)) == answer


def test_codec_refuses_other_versions_and_foreign_json() -> None:
    record = codec.encode(JSON)
    other = bytearray(record)
    other[len(codec.MAGIC)] = codec.VERSION + 1
    assert codec.decode(bytes(other)) is None
    assert codec.decode(b'{"status": 200, "body": "hi"}') is None


# -- memory --------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_memory_miss_then_hit() -> None:
    backend = MemoryBackend(1 << 20)
    assert backend.get_now("k") is None
    assert backend.set_now("k", SSE, 60)
    assert backend.get_now("k") is SSE  # the very object: no copy on the hot path
    assert backend.get_now("other") is None


def test_memory_stays_within_max_bytes_under_a_flood() -> None:
    limit = 64 * 1024
    backend = MemoryBackend(limit)
    for n in range(20_000):
        backend.set_now(f"key-{n}", answer(n, size=50 + n % 700), 60)
        assert backend.bytes_used <= limit
    assert backend.bytes_used == sum(
        answer_size(f"key-{n}", answer(n, size=50 + n % 700))
        for n in range(20_000 - len(backend), 20_000)
    )
    assert backend.get_now("key-19999") is not None
    assert backend.get_now("key-0") is None


def test_memory_evicts_least_recently_used() -> None:
    one = answer_size("a", answer(1))
    backend = MemoryBackend(3 * one)
    for key in ("a", "b", "c"):
        backend.set_now(key, answer(1), 60)
    assert backend.get_now("a") is not None  # now "b" is the least recently used
    backend.set_now("d", answer(1), 60)
    assert backend.get_now("b") is None
    assert all(backend.get_now(key) is not None for key in ("a", "c", "d"))


def test_memory_refuses_an_entry_larger_than_the_cache() -> None:
    backend = MemoryBackend(1000)
    backend.set_now("small", answer(1), 60)
    assert not backend.set_now("huge", answer(2, size=5000), 60)
    assert backend.get_now("huge") is None
    assert backend.get_now("small") is not None  # nothing evicted for nothing


def test_memory_replacing_a_key_keeps_the_byte_count_exact() -> None:
    backend = MemoryBackend(1 << 20)
    backend.set_now("k", answer(1, size=100), 60)
    backend.set_now("k", answer(2, size=300), 60)
    assert len(backend) == 1
    assert backend.bytes_used == answer_size("k", answer(2, size=300))


def test_memory_honours_ttl() -> None:
    clock = FakeClock()
    backend = MemoryBackend(1 << 20, clock=clock)
    backend.set_now("k", JSON, 10)
    clock.now += 9.9
    assert backend.get_now("k") is JSON
    clock.now += 0.1
    assert backend.get_now("k") is None
    assert backend.bytes_used == 0
    assert not backend.set_now("zero", JSON, 0)


# -- redis ---------------------------------------------------------------

PREFIX = "test-sidecar:"


@pytest.fixture
async def redis_backend(redis_server: RedisServer) -> AsyncIterator[RedisBackend]:
    backend = RedisBackend(redis_server.url, password=None, timeout=1.0, key_prefix=PREFIX)
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


async def test_redis_miss_then_hit(redis_backend: RedisBackend, raw: Redis) -> None:
    async with asyncio.timeout(5):
        assert await redis_backend.get("k") is None
        await redis_backend.set("k", SSE, 60)
        assert await redis_backend.get("k") == SSE
        await redis_backend.set("j", JSON, 60)
        assert await redis_backend.get("j") == JSON
        # One key per answer under the prefix, the value a codec record, a PX expiry.
        record = await raw.get(PREFIX + "k")
        assert record == codec.encode(SSE)
        assert 0 < await raw.pttl(PREFIX + "k") <= 60_000
        assert sorted(await raw.keys("*")) == [f"{PREFIX}j".encode(), f"{PREFIX}k".encode()]


async def test_redis_ttl_expires(redis_backend: RedisBackend) -> None:
    async with asyncio.timeout(5):
        await redis_backend.set("short", JSON, 0.05)
        await redis_backend.set("long", JSON, 60)
        while await redis_backend.get("short") is not None:
            await asyncio.sleep(0.01)
        assert await redis_backend.get("long") == JSON


async def test_redis_corrupt_or_foreign_record(redis_backend: RedisBackend, raw: Redis) -> None:
    async with asyncio.timeout(5):
        await raw.set(PREFIX + "foreign", b'{"not": "ours"}')
        await raw.set(PREFIX + "truncated", codec.encode(SSE)[:-1])
        assert await redis_backend.get("foreign") is codec.CORRUPT
        assert await redis_backend.get("truncated") is codec.CORRUPT
        await redis_backend.delete("foreign")
        assert await raw.exists(PREFIX + "foreign") == 0


async def test_redis_backend_construction_does_not_connect(redis_server: RedisServer) -> None:
    redis_server.kill()
    backend = RedisBackend(redis_server.url, password=None, timeout=0.5, key_prefix=PREFIX)
    try:
        async with asyncio.timeout(5):
            with pytest.raises(Exception):  # noqa: B017 - any error: the lane contains it
                await backend.get("k")
            redis_server.restart()
            assert await backend.get("k") is None  # the broken connection was not kept
    finally:
        await backend.close()


async def test_a_cache_without_writes_flushes_at_once() -> None:
    # `flush` is part of the seam: callers wait on any cache without asking its type.
    cache: Cache = NullCache()
    assert cache.store("k", JSON, 60.0) is None
    async with asyncio.timeout(1):
        await cache.flush()
