"""Cross-replica coalescing: real sidecar processes, one real Redis, the fake upstream.

Three replicas share one Redis and one fake upstream for the whole module
(starting a process costs seconds on a busy machine); a test that kills or
pauses an owner starts that owner as a fresh replica of its own, with a 1 s
lease. Every test holds the fake's answers with its gate while requests
gather, uses prompts of its own, and asserts what callers rely on: upstream
calls counted by the fake, the bytes each caller got, how fast a broken
stream ends, and every replica back to idle afterwards.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from proxy.cluster import entries
from proxy.cluster.names import FlightNames
from proxy.keys import ANONYMOUS_TENANT, request_key
from proxy.testing.fake_upstream import FakeSettings, FakeUpstream
from tests.proxy_process import ProxyProcess, sample
from tests.redis_server import RedisServer
from tests.replicas import (
    Answer,
    all_idle,
    ask,
    burst,
    calls_for,
    chat,
    cluster_policy,
    ends_whole,
    ends_with_error,
    plain_text,
    readers,
    replicas,
    streamed_text,
    until,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(90)]

# The shared replicas: a lease long enough that a loaded machine never lets
# one lapse by accident. Owners a test kills or pauses get a short one.
SHARED = {"lease": "4s", "timeout": "2s"}
VICTIM = {"lease": "1s", "timeout": "500ms"}
VICTIM_LEASE = 1.0
PREFIX = "llm-sidecar:"


@dataclass
class Cluster:
    redis: RedisServer
    fake: FakeUpstream
    procs: list[ProxyProcess]
    client: Redis

    def victim_policy(self) -> dict[str, Any]:
        return cluster_policy(self.fake, self.redis.url, **VICTIM)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    redis = RedisServer()
    fake = FakeUpstream()
    await fake.start()
    client = Redis.from_url(redis.url)
    try:
        policy = cluster_policy(fake, redis.url, **SHARED)
        async with replicas(tmp_path_factory.mktemp("shared"), policy, 3) as procs:
            yield Cluster(redis, fake, procs, client)
    finally:
        fake.release.set()
        await fake.close()
        await client.aclose()
        redis.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def cluster(shared: Cluster) -> AsyncIterator[Cluster]:
    fake = shared.fake
    fake.reset()
    fake.settings = FakeSettings()
    fake.hold_after = None
    fake.release = asyncio.Event()
    fake.reached_hold = asyncio.Event()
    try:
        yield shared
    finally:
        fake.release.set()
        await all_idle(shared.procs)
        # Every lease released: no flight of this test outlives it.
        assert [key async for key in shared.client.scan_iter(f"{PREFIX}*:claim")] == []


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


def _names(prompt: str) -> tuple[str, str]:
    """The lease key and the log-name prefix of a chat prompt sent without a credential."""
    body = chat(prompt, True)
    key = request_key(
        ANONYMOUS_TENANT,
        "fake",
        "POST",
        "/v1/chat/completions",
        body,
        ("stream", "stream_options", "user"),
    )
    names = FlightNames(PREFIX, key)
    return names.lease, names.log("")


def _stream_of(status: dict[str, Any], role: str) -> dict[str, Any] | None:
    return next((s for s in status["streams"] if s["role"] == role), None)


async def _counter(proc: ProxyProcess, name: str, **labels: str) -> float:
    return sample(await proc.metrics(), name, **labels)


async def _timed(coro: Any) -> tuple[Answer, float]:
    answer = await coro
    return answer, asyncio.get_running_loop().time()


async def test_burst_over_three_replicas_makes_one_call_per_prompt(cluster: Cluster) -> None:
    # 300 requests over 30 prompts: exactly 30 upstream calls.
    await burst(cluster.procs, cluster.fake, "burst", prompts=30, requests=300)


async def test_late_joiner_on_another_replica_gets_the_whole_answer(cluster: Cluster) -> None:
    fake, (owner, late, _) = cluster.fake, cluster.procs
    fake.settings = FakeSettings(tokens=20)
    fake.hold_after = 11  # half-way
    body = chat("late joiner", True)
    async with _session() as session:
        first = asyncio.create_task(ask(session, owner, body))
        async with asyncio.timeout(10):
            await fake.reached_hold.wait()
        logged = _stream_of(await owner.status(), "owner")
        assert logged is not None and logged["events"] == 11
        joiners = [
            asyncio.create_task(ask(session, late, body)),
            asyncio.create_task(ask(session, late, chat("late joiner", False))),
        ]
        # The mirror replayed everything logged so far to both of them.
        await late.until_status(
            lambda s: (
                (m := _stream_of(s, "mirror")) is not None
                and m["readers"] == 2
                and m["events"] == 11
            )
        )
        fake.release.set()
        async with asyncio.timeout(10):
            (_, _, lead_body), (status, headers, joined), (_, _, whole) = await asyncio.gather(
                first, *joiners
            )
    assert calls_for(fake, "late joiner") == 1
    assert status == 200 and headers["x-llm-sidecar"] == "follow"
    assert joined == lead_body and ends_whole(joined)
    assert plain_text(whole) == streamed_text(lead_body)


async def test_plain_answers_and_upstream_errors_carry_across(cluster: Cluster) -> None:
    fake, (owner, remote, _) = cluster.fake, cluster.procs
    fake.hold_after = 0  # a plain answer waits before its head
    embed = {"model": "m", "input": "carried across"}
    async with _session() as session:

        async def embedding(proc: ProxyProcess) -> Answer:
            async with session.post(f"{proc.api}/embeddings", json=embed) as resp:
                return resp.status, resp.headers.copy(), await resp.read()

        first = asyncio.create_task(embedding(owner))
        async with asyncio.timeout(10):
            await fake.reached_hold.wait()
        others = [asyncio.create_task(embedding(remote)) for _ in range(3)]
        await until(lambda: _has_readers(remote, "mirror", 3))
        fake.release.set()
        async with asyncio.timeout(10):
            plain = await asyncio.gather(first, *others)
        assert fake.total_calls == 1
        assert {status for status, _, _ in plain} == {200}
        assert len({body for _, _, body in plain}) == 1

        # A plain chat call (its leader asked stream: false): streaming readers
        # on another replica get it re-chunked, as they would on the owner.
        fake.release = asyncio.Event()
        fake.reached_hold = asyncio.Event()
        first = asyncio.create_task(ask(session, owner, chat("plain chat", False)))
        async with asyncio.timeout(10):
            await fake.reached_hold.wait()
        others = [
            asyncio.create_task(ask(session, remote, chat("plain chat", stream)))
            for stream in (True, False)
        ]
        await until(lambda: _has_readers(remote, "mirror", 2))
        fake.release.set()
        async with asyncio.timeout(10):
            (_, _, whole), (status, _, rechunked), (_, _, also) = await asyncio.gather(
                first, *others
            )
        assert calls_for(fake, "plain chat") == 1
        assert status == 200 and whole == also
        assert ends_whole(rechunked) and streamed_text(rechunked) == plain_text(whole)

        # An upstream error before the head reaches every replica's readers as it is.
        fake.settings = FakeSettings(error_status=429)
        fake.release = asyncio.Event()
        fake.reached_hold = asyncio.Event()
        first = asyncio.create_task(ask(session, owner, chat("refused", True)))
        async with asyncio.timeout(10):
            await fake.reached_hold.wait()
        others = [
            asyncio.create_task(ask(session, remote, chat("refused", stream)))
            for stream in (True, False)
        ]
        await until(lambda: _has_readers(remote, "mirror", 2))
        fake.release.set()
        async with asyncio.timeout(10):
            refused = await asyncio.gather(first, *others)
    assert calls_for(fake, "refused") == 1
    assert {status for status, _, _ in refused} == {429}
    assert len({body for _, _, body in refused}) == 1
    assert {headers["Retry-After"] for _, headers, _ in refused} == {"1"}


async def _has_readers(proc: ProxyProcess, role: str, count: int) -> bool:
    stream = _stream_of(await proc.status(), role)
    return stream is not None and stream["readers"] == count


async def test_owner_killed_mid_stream_ends_remote_readers_within_the_lease(
    cluster: Cluster, tmp_path: Path
) -> None:
    fake, remote = cluster.fake, cluster.procs[0]
    fake.hold_after = 3
    prompt = "owner killed mid-stream"
    loop = asyncio.get_running_loop()
    async with replicas(tmp_path, cluster.victim_policy(), 1) as (owner,), _session() as session:
        asyncio.create_task(ask(session, owner, chat(prompt, True)))  # noqa: RUF006
        async with asyncio.timeout(10):
            await fake.reached_hold.wait()
        assert _stream_of(await owner.status(), "owner") is not None
        followers = [
            asyncio.create_task(_timed(ask(session, remote, chat(prompt, stream))))
            for stream in (True, True, False)
        ]
        await remote.until_status(
            lambda s: (
                (m := _stream_of(s, "mirror")) is not None
                and m["readers"] == 3
                and m["events"] == 3
            )
        )
        killed_at = loop.time()
        owner.signal(signal.SIGKILL)
        async with asyncio.timeout(VICTIM_LEASE + 5):
            ended = await asyncio.gather(*followers)
    delays = [round(at - killed_at, 3) for _, at in ended]
    print(f"\nremote readers ended {delays} s after the kill")
    for (status, _, body), at in ended:
        assert at - killed_at <= VICTIM_LEASE + 1.0
        assert status in (200, 502), body
    (_, _, streamed), _ = ended[0]
    assert ends_with_error(streamed) and streamed_text(streamed) != ""
    (status, _, error), _ = ended[2]
    assert status == 502 and "error" in orjson.loads(error)
    # The key is free again: the next request is one new upstream call.
    fake.hold_after = None
    fake.release.set()
    async with _session() as session, asyncio.timeout(10):
        status, _, body = await ask(session, remote, chat(prompt, True))
    assert status == 200 and ends_whole(body)
    assert calls_for(fake, prompt) == 2


async def test_owner_killed_before_the_head_a_remote_follower_takes_over(
    cluster: Cluster, tmp_path: Path
) -> None:
    fake, remote = cluster.fake, cluster.procs[1]
    prompt = "owner killed before its head"
    took_over = await _counter(remote, "llm_sidecar_cluster_mirror_ends_total", how="took_over")
    async with replicas(tmp_path, cluster.victim_policy(), 1) as (owner,), _session() as session:
        # Only the owner's own call is slow to answer: headers are not in the key.
        slow = {"x-fake-header-delay": "30"}
        asyncio.create_task(ask(session, owner, chat(prompt, True), **slow))  # noqa: RUF006
        await until(_async(lambda: calls_for(fake, prompt) == 1))
        assert _stream_of(await owner.status(), "owner") is not None
        followers = [
            asyncio.create_task(ask(session, remote, chat(prompt, stream)))
            for stream in (True, True, False)
        ]
        await until(lambda: _has_readers(remote, "mirror", 3))
        owner.signal(signal.SIGKILL)
        async with asyncio.timeout(VICTIM_LEASE + 10):
            answers = await asyncio.gather(*followers)
    assert [status for status, _, _ in answers] == [200, 200, 200]
    (_, _, one), (_, _, two), (_, _, whole) = answers
    assert one == two and ends_whole(one)
    assert plain_text(whole) == streamed_text(one)
    assert calls_for(fake, prompt) == 2
    after = await _counter(remote, "llm_sidecar_cluster_mirror_ends_total", how="took_over")
    assert after == took_over + 1


def _async(check: Any) -> Any:
    async def predicate() -> bool:
        return bool(check())

    return predicate


async def test_racing_claims_never_make_two_calls_while_a_lease_lives(cluster: Cluster) -> None:
    fake, (left, right, _) = cluster.fake, cluster.procs
    pairs = 200
    fake.hold_after = 0  # every lease stays live until both callers of its key are in
    claims = [
        await _counter(proc, "llm_sidecar_cluster_claims_total", outcome=outcome)
        for proc in (left, right)
        for outcome in ("won", "lost")
    ]
    async with _session() as session:
        tasks = []
        for index in range(pairs):
            body = chat(f"race {index}", index % 2 == 0)
            # Both replicas get the key at the same instant.
            tasks += [
                asyncio.create_task(ask(session, left, body)),
                asyncio.create_task(ask(session, right, body)),
            ]

        async def gathered() -> bool:
            return fake.in_flight == pairs and await readers((left, right)) == 2 * pairs

        await until(gathered, timeout=40)
        fake.release.set()
        async with asyncio.timeout(40):
            answers = await asyncio.gather(*tasks)
    assert {status for status, _, _ in answers} == {200}
    assert Counter(calls_for(fake, f"race {i}") for i in range(pairs)) == {1: pairs}
    after = [
        await _counter(proc, "llm_sidecar_cluster_claims_total", outcome=outcome)
        for proc in (left, right)
        for outcome in ("won", "lost")
    ]
    won = after[0] - claims[0] + after[2] - claims[2]
    lost = after[1] - claims[1] + after[3] - claims[3]
    assert (won, lost) == (pairs, pairs)


async def test_paused_owner_is_fenced_and_never_writes_into_the_next_owners_log(
    cluster: Cluster, tmp_path: Path
) -> None:
    fake, client = cluster.fake, cluster.client
    _, successor, watcher = cluster.procs
    fake.hold_after = 2
    prompt = "paused owner"
    lease_key, log_prefix = _names(prompt)
    async with replicas(tmp_path, cluster.victim_policy(), 1) as (paused,), _session() as session:
        first = asyncio.create_task(ask(session, paused, chat(prompt, True)))
        async with asyncio.timeout(10):
            await fake.reached_hold.wait()
        paused_token = await _holder(client, lease_key)
        paused_log = log_prefix + paused_token
        # A mirror on a third replica has read all the paused owner wrote.
        watching = asyncio.create_task(ask(session, watcher, chat(prompt, True)))
        await watcher.until_status(
            lambda s: (m := _stream_of(s, "mirror")) is not None and m["events"] == 2
        )
        written = await client.xlen(paused_log)
        paused.signal(signal.SIGSTOP)
        try:
            await until(_redis_gone(client, lease_key), timeout=VICTIM_LEASE + 5)
            # Past its lease, the key is free: the next request elsewhere owns it.
            fake.reached_hold.clear()
            # Asking for usage too, its caller gets every event the log holds.
            with_usage = {**chat(prompt, True), "stream_options": {"include_usage": True}}
            second = asyncio.create_task(ask(session, successor, with_usage))
            async with asyncio.timeout(10):
                await fake.reached_hold.wait()
            successor_token = await _holder(client, lease_key)
            assert successor_token != paused_token
        finally:
            paused.signal(signal.SIGCONT)
        # Resumed, the paused owner learns it lost the lease before writing anything.
        await paused.until_metrics(
            lambda m: sample(m, "llm_sidecar_cluster_fenced_total") == 1, timeout=10
        )
        fake.release.set()
        async with asyncio.timeout(10):
            (_, _, paused_body), (_, _, successor_body), (_, _, watched) = await asyncio.gather(
                first, second, watching
            )
        await all_idle([paused])
    assert ends_whole(paused_body)  # its own callers were served all along
    assert ends_whole(successor_body)
    assert ends_with_error(watched)  # its mirror saw the lease lapse with no end
    assert await client.xlen(paused_log) == written  # no late append got through
    # The successor's log is its own answer, entry for entry, and nothing else.
    recorded: Any = await client.xrange(log_prefix + successor_token)
    log = [entries.decode(fields) for _, fields in recorded]
    assert isinstance(log[0], entries.HeadEntry)
    assert isinstance(log[-1], entries.DoneEntry) and log[-1].complete
    events = [entry for entry in log[1:-1] if isinstance(entry, entries.EventsEntry)]
    assert len(events) == len(log) - 2
    assert b"".join(entry.raw for entry in events) == successor_body
    assert calls_for(fake, prompt) == 2


async def _holder(client: Redis, lease_key: str) -> str:
    value = await client.get(lease_key)
    assert isinstance(value, bytes), value
    return value.decode()


def _redis_gone(client: Redis, key: str) -> Any:
    async def gone() -> bool:
        return not await client.exists(key)

    return gone


async def test_redis_cost_of_one_shared_stream(cluster: Cluster) -> None:
    """Commands Redis runs for one stream whose events arrive one read at a time:
    one owner, one mirroring replica with two callers (INFO commandstats)."""
    fake, client = cluster.fake, cluster.client
    owner, remote, _ = cluster.procs
    fake.settings = FakeSettings(token_delay=0.01)
    async with _session() as session:
        # Scripts loaded and connections open before counting.
        await ask(session, owner, chat("cost warm-up", True))
        await ask(session, remote, chat("cost warm-up", True))
        await all_idle(cluster.procs)
        await client.config_resetstat()
        fake.hold_after = 0
        first = asyncio.create_task(ask(session, owner, chat("cost", True)))
        async with asyncio.timeout(10):
            await fake.reached_hold.wait()
        others = [asyncio.create_task(ask(session, remote, chat("cost", True))) for _ in range(2)]
        await until(lambda: _has_readers(remote, "mirror", 2))
        fake.release.set()
        async with asyncio.timeout(10):
            answers = await asyncio.gather(first, *others)
        await all_idle(cluster.procs)
    assert len({body for _, _, body in answers}) == 1
    stats = await client.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    sent = {name: calls.get(name, 0) for name in ("evalsha", "xread")}
    inside = ("set", "get", "incr", "xadd", "xlen", "pexpire", "del", "xrange")
    scripted = {name: calls.get(name, 0) for name in inside}
    events = answers[0][2].count(b"\n\n") + 1  # the usage chunk, withheld from these callers
    print(f"\nRedis, one {events}-event stream, 1 owner + 1 mirror: {sent}; in scripts {scripted}")
    # Owner: a claim, one append per upstream read (the head and the end may
    # ride along), renewals (none in a short stream), a release. Mirror: a
    # claim, one read per batch of entries, a poll per quiet block.
    assert sent["evalsha"] <= 1 + (events + 2) + 1 + 1 + 2
    assert sent["xread"] <= events + 2 + 2
    assert scripted["xadd"] <= events + 2
    assert set(calls) <= {"evalsha", "xread", "config|resetstat", *scripted}
