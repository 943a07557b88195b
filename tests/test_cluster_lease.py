"""The cross-replica primitives against a real redis-server, in process.

The lease (claim, renew, release: only the token holder may act), the
fenced append script, the log's byte cap, the entry codec, and the
policy checks. The end-to-end behaviour is in tests/test_cross_replica.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from multidict import CIMultiDict
from redis.asyncio import Redis

from proxy.cluster import entries
from proxy.cluster.link import RedisLink, Settings, cluster_problems
from proxy.cluster.log import APPEND, LogWriter
from proxy.errors import QueueFull, UpstreamBroken
from proxy.policy import PolicyError, parse_policy
from proxy.reload import apply_policy
from proxy.stream import Head, LogEvent
from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import StartProxy, post, wait_idle
from tests.redis_server import RedisServer

REPO = Path(__file__).resolve().parent.parent


def _settings(url: str, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "url": url,
        "password": None,
        "cluster_mode": False,
        "key_prefix": "t:",
        "lease": 1.0,
        "stream_ttl": 30.0,
        "max_stream_bytes": 1 << 20,
        "timeout": 0.5,
        "breaker_failures": 3,
        "breaker_reset": 5.0,
    }
    return Settings(**{**values, **changes})


@pytest.fixture
async def links(redis_server: RedisServer) -> AsyncIterator[tuple[RedisLink, RedisLink, Redis]]:
    """Two replicas' links (two clients) and a client of the test's own."""
    one, two = RedisLink(_settings(redis_server.url)), RedisLink(_settings(redis_server.url))
    client = Redis.from_url(redis_server.url)
    try:
        yield one, two, client
    finally:
        await one.close()
        await two.close()
        await client.aclose()


async def test_two_claims_racing_200_times_have_one_winner(
    links: tuple[RedisLink, RedisLink, Redis],
) -> None:
    one, two, _ = links
    for index in range(200):
        names = one.names(f"race-{index}")
        first, second = await asyncio.gather(one.claim(names, False), two.claim(names, False))
        assert first is not None and second is not None
        assert first.won != second.won
        # The loser learns the winner's token: the name of the log it will read.
        assert first.token == second.token


async def test_renew_and_release_act_only_for_the_token_holder(
    links: tuple[RedisLink, RedisLink, Redis],
) -> None:
    one, two, client = links
    names = one.names("held")
    claim = await one.claim(names, False)
    assert claim is not None and claim.won and claim.token is not None
    stranger = "0123456789abcdef"
    assert await two.leases.renew(names, stranger) is None
    assert not await two.leases.release(names, stranger)
    assert await client.get(names.lease) == claim.token.encode()
    assert await one.leases.renew(names, claim.token) == 0  # no replica mirrors it
    lost = await two.claim(names, False)
    assert lost is not None and not lost.won
    assert await one.leases.renew(names, claim.token) == 1  # one does now
    assert 900 < await client.pttl(names.lease) <= 1000
    assert await one.leases.release(names, claim.token)
    assert not await client.exists(names.lease)


async def _written(writer: LogWriter, pump: asyncio.Task[None]) -> None:
    async with asyncio.timeout(5):
        await writer.run(pump)


async def test_a_fenced_writer_appends_nothing(links: tuple[RedisLink, RedisLink, Redis]) -> None:
    one, two, client = links
    names = one.names("fenced")
    stale = await one.claim(names, False)
    assert stale is not None and stale.token is not None
    await client.delete(names.lease)  # its lease lapsed...
    fresh = await two.claim(names, False)  # ...and another replica owns the key now
    assert fresh is not None and fresh.won
    writer = LogWriter(one, names, stale.token)
    writer.opened(Head(200, CIMultiDict({"Content-Type": "text/event-stream"}), is_sse=True))
    writer.appended([LogEvent(b"data: {}\n\n")])
    writer.ended(True, None)
    pump = asyncio.create_task(asyncio.sleep(0))
    await _written(writer, pump)
    assert one.fenced == 1
    assert await client.xlen(names.log(stale.token)) == 0
    assert await client.get(names.lease) == (fresh.token or "").encode()  # untouched


async def test_a_log_past_its_byte_cap_ends_with_a_failure_and_frees_the_key(
    redis_server: RedisServer,
) -> None:
    link = RedisLink(_settings(redis_server.url, max_stream_bytes=64))
    client = Redis.from_url(redis_server.url)
    try:
        names = link.names("big")
        claim = await link.claim(names, False)
        assert claim is not None and claim.token is not None
        writer = LogWriter(link, names, claim.token)
        writer.opened(Head(200, CIMultiDict(), is_sse=True))
        writer.appended([LogEvent(b"data: " + b"x" * 100 + b"\n\n")])
        writer.appended([LogEvent(b"data: more\n\n")])  # past the cut: dropped
        pump = asyncio.create_task(asyncio.sleep(3600))  # the local stream goes on
        try:
            await _written(writer, pump)
        finally:
            pump.cancel()
        recorded: Any = await client.xrange(names.log(claim.token))
        log = [entries.decode(fields) for _, fields in recorded]
        assert [type(e) for e in log] == [entries.HeadEntry, entries.FailedEntry]
        assert link.overflows == 1
        assert not await client.exists(names.lease)  # new requests elsewhere call again
        assert 0 < await client.pttl(names.log(claim.token)) <= 30_000
    finally:
        await link.close()
        await client.aclose()


def test_entries_round_trip_byte_for_byte() -> None:
    headers = CIMultiDict([("Content-Type", "application/json"), ("X-Two", "a"), ("X-Two", "b")])
    sent = headers.copy()
    sent.add("Set-Cookie", "__cf_bm=secret; path=/")  # never kept in Redis
    plain = Head(200, sent, is_sse=False, body=b'{"ok": true}\n')
    told = entries.decode(dict([entries.head(plain)]))
    assert isinstance(told, entries.HeadEntry)
    assert (told.head.status, told.head.is_sse, told.head.body) == (200, False, plain.body)
    assert list(told.head.headers.items()) == list(headers.items())
    assert b"secret" not in entries.head(plain)[1]
    raw = [b"data: 1\n\n", b"data: 2\r\n\r\n"]
    assert entries.decode(dict([entries.events(raw)])) == entries.EventsEntry(b"".join(raw))
    sse = entries.decode(dict([entries.head(Head(200, CIMultiDict(), is_sse=True))]))
    assert isinstance(sse, entries.HeadEntry) and sse.head.is_sse and sse.head.body is None
    # An error told on another replica is the owner's, byte for byte.
    for error in (QueueFull("upstream", retry_after=2.0), UpstreamBroken("cut")):
        failed = entries.decode(dict([entries.failed(error)]))
        assert isinstance(failed, entries.FailedEntry) and not isinstance(failed.error, Head)
        assert failed.error.sse_event() == error.sse_event()
        assert failed.error.body() == error.body()
        assert failed.error.status == error.status
        assert failed.error.headers() == error.headers()
        done = entries.decode(dict([entries.done(False, error)]))
        assert isinstance(done, entries.DoneEntry) and done.error is not None
        assert done.error.sse_event() == error.sse_event()
    refused = Head(429, CIMultiDict({"Retry-After": "1"}), is_sse=False, body=b"{}")
    told = entries.decode(dict([entries.failed(refused)]))
    assert isinstance(told, entries.FailedEntry) and isinstance(told.error, Head)
    assert told.error.status == 429 and told.error.headers["Retry-After"] == "1"
    with pytest.raises(entries.EntryError):
        entries.decode({b"z": b""})
    with pytest.raises(entries.EntryError):
        entries.decode({b"h": b"not json"})


def _policy(**cluster: Any) -> str:
    return yaml.safe_dump(
        {
            "upstreams": {"a": {"base_url": "http://x/v1"}},
            "routes": [{"match": {"path": "/v1/*"}, "upstream": "a"}],
            "cluster": {"coalesce_across_replicas": True, **cluster},
        }
    )


@pytest.mark.parametrize(
    ("cluster", "environ", "problem"),
    [
        ({"url": "redis://r/0", "password_env": "PW"}, {}, "cluster.password_env: environment"),
        ({"url": "redis://r/3", "mode": "cluster"}, {}, "cluster.url: a Redis Cluster has only"),
        ({"url": "redis://r/0", "lease": "1s", "timeout": "600ms"}, {}, "cluster.timeout: must be"),
    ],
)
def test_policy_problems_name_the_path(
    cluster: dict[str, Any], environ: dict[str, str], problem: str
) -> None:
    policy = parse_policy(_policy(**cluster), "p.yaml").policy
    found = [f"{path}: {reason}" for path, reason in cluster_problems(policy, environ)]
    assert len(found) == 1 and found[0].startswith(problem), found


def test_the_cache_redis_is_the_default_and_off_needs_nothing() -> None:
    text = _policy() + "cache: {backend: redis, url: 'redis://c/0', password_env: CPW}\n"
    policy = parse_policy(text, "p.yaml").policy
    assert [path for path, _ in cluster_problems(policy, {})] == ["cache.password_env"]
    assert cluster_problems(policy, {"CPW": "x"}) == []
    off = parse_policy(_policy(coalesce_across_replicas=False), "p.yaml").policy
    assert cluster_problems(off, {}) == []
    with pytest.raises(PolicyError):
        parse_policy(_policy(lease="soon"), "p.yaml")


async def test_the_example_policy_coalesces_across_two_replicas(
    start_proxy: StartProxy, fake: FakeUpstream, redis_server: RedisServer
) -> None:
    """policies/examples/cross-replica.yaml, pointed at the fake and a real Redis."""
    example = yaml.safe_load((REPO / "policies/examples/cross-replica.yaml").read_text())
    example["cache"].pop("password_env", None)
    example["cache"]["url"] = redis_server.url
    for upstream in example["upstreams"].values():
        upstream["base_url"] = f"http://127.0.0.1:{fake.port}/v1"
    left, right = await start_proxy(example, raw=True), await start_proxy(example, raw=True)
    fake.hold_after = 0
    body = {"model": "m", "messages": [{"role": "user", "content": "example"}]}
    async with aiohttp.ClientSession() as session:
        first = asyncio.create_task(post(session, f"{left.base_url}/chat/completions", body))
        async with asyncio.timeout(10):
            await fake.reached_hold.wait()
        second = asyncio.create_task(post(session, f"{right.base_url}/chat/completions", body))
        async with asyncio.timeout(10):
            while not any(s.role == "mirror" and s.readers for s in right.runtime.table):
                await asyncio.sleep(0.01)
        fake.release.set()
        async with asyncio.timeout(10):
            (status, _, one), (_, headers, two) = await asyncio.gather(first, second)
    assert status == 200 and one == two and headers["x-llm-sidecar"] == "follow"
    assert fake.total_calls == 1
    await wait_idle(left.runtime)
    await wait_idle(right.runtime)


async def test_a_reload_turns_it_on_and_off_and_keeps_an_unchanged_link(
    start_proxy: StartProxy, fake: FakeUpstream, redis_server: RedisServer
) -> None:
    proxy = await start_proxy()
    rt = proxy.runtime
    base = rt.snapshot.loaded.policy.model_dump(mode="json", exclude_unset=True)

    def loaded(**cluster: Any) -> Any:
        return parse_policy(yaml.safe_dump({**base, "cluster": cluster}), "reloaded.yaml")

    on = {"coalesce_across_replicas": True, "url": redis_server.url}
    apply_policy(rt, loaded(**on))
    link = rt.cluster
    assert link is not None and link.settings.url == redis_server.url
    apply_policy(rt, loaded(**on, stream_ttl="1m"))  # changed: a new link, the old one retires
    assert rt.cluster is not None and rt.cluster is not link
    link = rt.cluster
    apply_policy(rt, loaded(**on, stream_ttl="1m"))
    assert rt.cluster is link  # unchanged: flights keep their link
    apply_policy(rt, loaded())
    assert rt.cluster is None
    async with asyncio.timeout(5):
        await asyncio.gather(*rt.retiring)


async def test_an_append_tried_again_after_a_lost_reply_writes_each_entry_once(
    links: tuple[RedisLink, RedisLink, Redis],
) -> None:
    one, _, client = links
    names = one.names("retried")
    claim = await one.claim(names, False)
    assert claim is not None and claim.token is not None
    append = one.script(APPEND)
    keys = [names.lease, names.log(claim.token)]
    first = [
        *entries.head(Head(200, CIMultiDict(), is_sse=True)),
        *entries.events([b"data: 1\n\n"]),
    ]
    assert await append(keys=keys, args=[claim.token, 30_000, 0, *first]) == 1
    # The reply was lost: the writer sends the batch again, with what followed.
    more = [*first, *entries.events([b"data: 2\n\n"])]
    assert await append(keys=keys, args=[claim.token, 30_000, 0, *more]) == 1
    assert await append(keys=keys, args=[claim.token, 30_000, 0, *more]) == 1
    recorded: Any = await client.xrange(names.log(claim.token))
    kinds = [next(iter(fields)) for _, fields in recorded]
    assert kinds == [entries.HEAD, entries.EVENTS, entries.EVENTS]
    # A writer whose count does not match the log is refused.
    assert await append(keys=keys, args=[claim.token, 30_000, 5, *first]) == -1
    assert await client.xlen(names.log(claim.token)) == 3


async def test_a_flight_that_waited_on_redis_looks_the_cache_up_again(
    start_proxy: StartProxy, fake: FakeUpstream, redis_server: RedisServer
) -> None:
    """The cache answers a flight whose claim took a while: no second upstream call.

    Found by bench scenario 7: under load, a replica's cache miss and its
    claim were far apart, and the owner before it finished, wrote the cache
    and released in between; the claim won and called the upstream again.
    Here the claim is slowed on purpose: the cross-replica Redis is paused.
    """
    coordination = RedisServer()
    try:
        policy = {
            "routes": [{"match": {"path": "/v1/*"}, "upstream": "fake", "cache": {"ttl": "1h"}}],
            "cache": {"backend": "redis", "url": redis_server.url},
            "cluster": {
                "coalesce_across_replicas": True,
                "url": coordination.url,
                "lease": "4s",
                "timeout": "2s",
            },
        }
        left, right = await start_proxy(policy), await start_proxy(policy)
        fake.hold_after = 0
        body = {"model": "m", "messages": [{"role": "user", "content": "waited"}]}
        async with aiohttp.ClientSession() as session:
            first = asyncio.create_task(post(session, f"{left.base_url}/chat/completions", body))
            async with asyncio.timeout(10):
                await fake.reached_hold.wait()
            coordination.pause()  # the next claim waits for its timeout
            try:
                second = asyncio.create_task(
                    post(session, f"{right.base_url}/chat/completions", body)
                )
                async with asyncio.timeout(10):  # its cache lookup missed: it is claiming
                    while not len(right.runtime.table):
                        await asyncio.sleep(0.01)
                fake.release.set()
                async with asyncio.timeout(10):
                    status, _, one = await first
                    await wait_idle(left.runtime)  # its answer is in the cache
                    _, _, two = await second
            finally:
                coordination.resume()
        assert status == 200 and one == two
        assert fake.total_calls == 1
        assert right.runtime.cluster is not None
        assert right.runtime.cluster.claims["fault"] == 1  # it went alone, from the cache
        await wait_idle(right.runtime)
    finally:
        coordination.stop()
