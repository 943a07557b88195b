"""Cross-replica coalescing when Redis fails, and when the feature is off.

Real sidecar processes on a real redis-server that the test kills (or never
lets them reach): no request fails that would have succeeded on one replica,
except the readers of the one stream Redis was carrying when it died, and
every replica's stages are back to zero afterwards. With the feature off,
the proxy never sends Redis a single command.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import StartProxy, post, wait_idle
from tests.proxy_process import ProxyProcess, sample
from tests.redis_server import RedisServer
from tests.replicas import (
    all_idle,
    ask,
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

pytestmark = pytest.mark.timeout(90)


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


async def test_redis_killed_mid_stream_fails_only_the_readers_it_was_carrying(
    tmp_path: Path, fake: FakeUpstream, redis_server: RedisServer
) -> None:
    fake.hold_after = 3
    prompt = "redis dies"
    policy = cluster_policy(fake, redis_server.url, lease="1s", timeout="500ms")
    async with replicas(tmp_path, policy, 3) as procs, _session() as session:
        owner, left, right = procs
        first = asyncio.create_task(ask(session, owner, chat(prompt, True)))
        async with asyncio.timeout(10):
            await fake.reached_hold.wait()
        cut = [
            asyncio.create_task(ask(session, proc, chat(prompt, stream)))
            for proc, stream in ((left, True), (right, True), (left, False))
        ]

        async def mirrored() -> bool:
            statuses = await asyncio.gather(left.status(), right.status())
            return all(
                any(s["role"] == "mirror" and s["events"] == 3 for s in status["streams"])
                for status in statuses
            )

        await until(mirrored)
        redis_server.kill()
        async with asyncio.timeout(10):
            ended = await asyncio.gather(*cut)
        # During the outage: the same prompt and new ones, on every replica.
        during = [
            asyncio.create_task(ask(session, proc, chat(f"{prompt} {i % 4}", i % 2 == 0)))
            for i, proc in enumerate(procs * 4)
        ] + [asyncio.create_task(ask(session, proc, chat(prompt, True))) for proc in procs]
        await until(lambda: _gathered(procs, fake, 1 + len(during)))
        fake.release.set()
        async with asyncio.timeout(20):
            (status, _, body), *served = await asyncio.gather(first, *during)
        await all_idle(procs)
        faults = [await proc.metrics() for proc in procs]
    # The cut stream's readers elsewhere end as a broken stream does...
    (_, _, one), (_, _, two), (plain_status, _, plain) = ended
    assert ends_with_error(one) and ends_with_error(two)
    assert plain_status == 502 and "error" in orjson.loads(plain)
    # ...and nobody else fails: the owner's own reader included.
    assert status == 200 and ends_whole(body)
    assert all(s == 200 for s, _, _ in served), [b for s, _, b in served if s != 200]
    assert all(ends_whole(b) or plain_text(b) for _, _, b in served)
    for samples in faults[1:]:
        assert sample(samples, "llm_sidecar_cluster_mirror_ends_total", how="cut") == 1


async def _gathered(procs: list[ProxyProcess], fake: FakeUpstream, want: int) -> bool:
    # Held answers: the first call; one per new prompt per replica (4 x 3); the
    # cut prompt again on the two replicas whose stream of it was cut.
    return fake.in_flight == 1 + 4 * 3 + 2 and await readers(procs) == want


async def test_a_redis_stall_shorter_than_the_lease_costs_no_reader_anything(
    tmp_path: Path, fake: FakeUpstream, redis_server: RedisServer
) -> None:
    fake.settings = replace(fake.settings, tokens=30, token_delay=0.02)
    fake.hold_after = 5
    prompt = "redis stalls"
    policy = cluster_policy(fake, redis_server.url, lease="3s", timeout="300ms")
    async with replicas(tmp_path, policy, 2) as (owner, remote), _session() as session:
        first = asyncio.create_task(ask(session, owner, chat(prompt, True)))
        async with asyncio.timeout(10):
            await fake.reached_hold.wait()
        others = [
            asyncio.create_task(ask(session, remote, chat(prompt, stream)))
            for stream in (True, False)
        ]
        await remote.until_status(
            lambda s: any(m["role"] == "mirror" and m["events"] == 5 for m in s["streams"])
        )
        # Redis answers nothing for a second while the rest of the answer
        # arrives: appends and reads time out, and are tried again.
        redis_server.pause()
        try:
            fake.release.set()
            await asyncio.sleep(1.0)  # the stall itself, not a wait for anything
        finally:
            redis_server.resume()
        async with asyncio.timeout(10):
            (_, _, owned), (_, _, mirrored), (status, _, whole) = await asyncio.gather(
                first, *others
            )
        await all_idle([owner, remote])
        samples = [await proc.metrics() for proc in (owner, remote)]
    assert ends_whole(owned) and mirrored == owned
    assert status == 200 and plain_text(whole) == streamed_text(owned)
    assert calls_for(fake, prompt) == 1
    assert sample(samples[0], "llm_sidecar_cluster_redis_faults_total", op="append") >= 1
    assert sample(samples[1], "llm_sidecar_cluster_redis_faults_total", op="read") >= 1
    assert sample(samples[1], "llm_sidecar_cluster_mirror_ends_total", how="complete") == 1


async def test_redis_down_from_the_start_fails_nothing(
    tmp_path: Path, fake: FakeUpstream, redis_server: RedisServer
) -> None:
    redis_server.kill()  # its port stays reserved, with nothing listening
    fake.hold_after = 0
    prompts, requests = 6, 60
    policy = cluster_policy(fake, redis_server.url, lease="1s", timeout="500ms")
    async with replicas(tmp_path, policy, 3) as procs, _session() as session:
        plan = [(i % 3, (i // 3) % prompts, i % 2 == 0) for i in range(requests)]
        tasks = [
            asyncio.create_task(ask(session, procs[r], chat(f"no redis {p}", stream)))
            for r, p, stream in plan
        ]

        async def gathered() -> bool:
            return fake.in_flight == prompts * 3 and await readers(procs) == requests

        await until(gathered)
        fake.release.set()
        async with asyncio.timeout(20):
            answers = await asyncio.gather(*tasks)
        await all_idle(procs)
        metrics = [await proc.metrics() for proc in procs]
    assert all(status == 200 for status, _, _ in answers)
    # Each replica still coalesces its own callers: one call per prompt per replica.
    assert all(calls_for(fake, f"no redis {p}") == 3 for p in range(prompts))
    for samples in metrics:
        assert sample(samples, "llm_sidecar_cluster_fallbacks_total") == prompts
        tried = sample(samples, "llm_sidecar_cluster_claims_total", outcome="fault")
        skipped = sample(samples, "llm_sidecar_cluster_claims_total", outcome="skipped")
        assert tried >= 1 and tried + skipped == prompts


async def test_off_by_default_sends_redis_nothing(
    start_proxy: StartProxy, redis_server: RedisServer
) -> None:
    # A cluster block naming a live Redis, but the feature left off.
    proxy = await start_proxy({"cluster": {"url": redis_server.url}})
    rt = proxy.runtime
    assert rt.cluster is None
    client = Redis.from_url(redis_server.url)
    try:
        await client.config_resetstat()
        async with aiohttp.ClientSession() as session:
            for stream in (True, False):
                status, _, _ = await post(
                    session, f"{proxy.base_url}/chat/completions", chat("off", stream)
                )
                assert status == 200
            async with session.get(f"http://127.0.0.1:{proxy.port}/status") as response:
                assert (await response.json())["cluster"] is None
            async with session.get(f"http://127.0.0.1:{proxy.port}/metrics") as response:
                assert "llm_sidecar_cluster" not in await response.text()
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    assert set(stats) == {"cmdstat_config|resetstat"}
    await wait_idle(rt)
