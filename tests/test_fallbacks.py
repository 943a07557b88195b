"""Fallbacks, balance, ejection and the retry budget across two or three real fake upstreams.

Counts come from the fakes' records; cool-downs run on a clock the test
holds (`rt.retries.clock`), and draws between targets on a seeded RNG.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from yarl import URL

from proxy.policy import parse_policy
from proxy.reload import apply_policy
from proxy.runtime import Runtime
from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import StartProxy, post, until, wait_idle, wait_readers
from tests.test_retries import ATTEMPTS, chat, refused_url, routed, two


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def hold_clock(rt: Runtime) -> Clock:
    clock = Clock()
    rt.retries.clock = clock
    return clock


async def status_of(session: aiohttp.ClientSession, base_url: str) -> dict[str, Any]:
    async with session.get(base_url.removesuffix("/v1") + "/status") as response:
        result: dict[str, Any] = orjson.loads(await response.read())
        return result


async def test_primary_down_fallback_answers_then_primary_is_ejected_until_its_cool_down(
    backup: FakeUpstream, start_proxy: StartProxy
) -> None:
    primary_url = refused_url()
    eject = {"eject_after": 2, "eject_for": "30s"}
    proxy = await start_proxy(two(primary_url, backup.base_url, eject=eject), raw=True)
    rt = proxy.runtime
    clock = hold_clock(rt)
    url = f"{proxy.base_url}/chat/completions"
    primary = FakeUpstream()
    try:
        async with aiohttp.ClientSession() as session:
            for n in range(2):  # connection refused, twice: the second ejects
                status, headers, _ = await post(session, url, chat(f"down {n}"))
                assert (status, headers[ATTEMPTS]) == (200, "2")
            assert backup.total_calls == 2
            view = (await status_of(session, proxy.base_url))["targets"]["primary"]
            assert (view["ejected"], view["consecutive_failures"], view["ejected_for_s"]) == (
                True,
                2,
                30.0,
            )
            registry = rt.metrics.registry
            assert (
                registry.get_sample_value("llm_sidecar_upstream_ejected", {"target": "primary"})
                == 1
            )
            assert (
                registry.get_sample_value(
                    "llm_sidecar_upstream_ejections_total", {"target": "primary"}
                )
                == 1
            )

            # The primary comes back on its port; while ejected it is not tried.
            await primary.start(port=int(primary_url.split(":")[2].split("/")[0]))
            for n in range(3):
                status, headers, _ = await post(session, url, chat(f"ejected {n}"))
                assert (status, headers[ATTEMPTS]) == (200, "1")
            assert (primary.total_calls, backup.total_calls) == (0, 5)

            clock.now += 30.0  # the cool-down ends
            status, headers, _ = await post(session, url, chat("back"))
            assert (status, headers[ATTEMPTS]) == (200, "1")
            assert (primary.total_calls, backup.total_calls) == (1, 5)
            view = (await status_of(session, proxy.base_url))["targets"]["primary"]
            assert (view["ejected"], view["consecutive_failures"]) == (False, 0)
            assert (
                registry.get_sample_value("llm_sidecar_upstream_ejected", {"target": "primary"})
                == 0
            )
    finally:
        await primary.close()
    await wait_idle(rt)


async def test_every_target_ejected_still_tries_the_least_recently_failed(
    fake: FakeUpstream, backup: FakeUpstream, start_proxy: StartProxy
) -> None:
    eject = {"eject_after": 1, "eject_for": "1h"}
    proxy = await start_proxy(two(fake.base_url, backup.base_url, eject=eject), raw=True)
    clock = hold_clock(proxy.runtime)
    fake.settings = replace(fake.settings, error_status=503)
    backup.settings = replace(backup.settings, error_status=503)
    url = f"{proxy.base_url}/chat/completions"
    async with aiohttp.ClientSession() as session:
        status, _, _ = await post(session, url, chat("all bad"))  # primary fails, then backup
        assert status == 503
        assert (fake.total_calls, backup.total_calls) == (1, 1)
        fake.settings = replace(fake.settings, error_status=None)
        backup.settings = replace(backup.settings, error_status=None)
        clock.now += 1.0
        status, headers, _ = await post(session, url, chat("someone must try"))
    # Both ejected: the primary failed first, so it is tried, and answers.
    assert (status, headers[ATTEMPTS]) == (200, "1")
    assert (fake.total_calls, backup.total_calls) == (2, 1)


async def test_fifty_identical_requests_share_one_pump_and_one_retry(
    fake: FakeUpstream, backup: FakeUpstream, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(two(fake.base_url, backup.base_url), raw=True)
    fake.settings = replace(fake.settings, error_status=503)
    fake.hold_after = 0  # the primary's error waits until every caller is attached
    url = f"{proxy.base_url}/chat/completions"
    async with aiohttp.ClientSession() as session:
        tasks = [
            asyncio.create_task(post(session, url, chat("together", stream=i % 2 == 0)))
            for i in range(50)
        ]
        await wait_readers(proxy, 50)
        assert len(proxy.runtime.pumps) == 1
        fake.release.set()
        results = await asyncio.gather(*tasks)
    assert {(status, headers[ATTEMPTS]) for status, headers, _ in results} == {(200, "2")}
    assert len({body for _, headers, body in results if "stream" in headers["Content-Type"]}) == 1
    assert len({body for _, headers, body in results if "json" in headers["Content-Type"]}) == 1
    assert (fake.total_calls, backup.total_calls) == (1, 1)
    await wait_idle(proxy.runtime)


async def test_retry_budget_bounds_retries_onto_a_failing_target(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    """Retries onto a target that already failed spend from the budget: 50 calls
    into a failing upstream get at most 20% of them retried."""
    stages = {"upstream": {"max_concurrency": 100, "max_queue": 100, "queue_timeout": "60s"}}
    retry = {"attempts": 2, "max_retry_wait": "30s", "budget_percent": 20}
    policy = routed(
        {"fake": fake.base_url}, {"upstream": "fake", "retry": retry, "on_abandon": "cancel"}
    )
    policy["upstreams"]["fake"]["eject_after"] = 100  # health stays out of this test
    proxy = await start_proxy({**policy, "stages": stages}, raw=True)
    rt = proxy.runtime
    # Every call fails with a Retry-After the retry waits out holding its token.
    fake.settings = replace(fake.settings, error_status=503, retry_after="25")
    fake.hold_after = 0  # every failure waits until all 50 calls are in flight
    url = f"{proxy.base_url}/embeddings"  # a whole answer: the fake holds it before its head
    async with aiohttp.ClientSession() as session:
        tasks = [
            asyncio.create_task(post(session, url, {"model": "e", "input": f"budget {i}"}))
            for i in range(50)
        ]
        await until(lambda: fake.in_flight == 50)
        fake.release.set()
        # Calls refused a retry answer at once; granted ones wait 25 s on a token.
        await until(lambda: sum(t.done() for t in tasks) + rt.retries.budget.in_flight == 50)
        granted = rt.retries.budget.in_flight
        refused = [t.result() for t in tasks if t.done()]
        for task in tasks:
            task.cancel()  # on_abandon: cancel, so each waiting pump gives its token back
        await asyncio.gather(*tasks, return_exceptions=True)
        await wait_idle(rt)
    # At most 20% of the 50 calls in flight; the floor of 3 is always allowed.
    assert 3 <= granted <= 10, granted
    assert len(refused) == 50 - granted
    for status, headers, _ in refused:
        # The proxy said no to a retry: the caller's SDK must not retry on top.
        assert (status, headers[ATTEMPTS], headers["x-should-retry"]) == (503, "1", "false")
    registry = rt.metrics.registry
    assert registry.get_sample_value(
        "llm_sidecar_upstream_retries_refused_total", {"reason": "budget"}
    ) == (50 - granted)
    assert rt.retries.budget.in_flight == 0
    assert fake.total_calls == 50  # the granted retries never went out


async def test_a_429_storm_falls_back_at_once_and_the_primary_cools_down(
    fake: FakeUpstream, backup: FakeUpstream, start_proxy: StartProxy
) -> None:
    """A fallback onto a healthy target is not a retry the budget refuses, and a
    429 with a long Retry-After takes the primary out of rotation that long."""
    stages = {"upstream": {"max_concurrency": 100, "max_queue": 100, "queue_timeout": "30s"}}
    policy = two(fake.base_url, backup.base_url, retry={"budget_percent": 20})
    proxy = await start_proxy({**policy, "stages": stages}, raw=True)
    rt = proxy.runtime
    clock = hold_clock(rt)
    fake.settings = replace(fake.settings, error_status=429, retry_after="120")
    fake.hold_after = 0  # the 429s wait until all 50 calls reached the primary
    url = f"{proxy.base_url}/embeddings"

    async def wave(session: aiohttp.ClientSession, name: str) -> list[tuple[int, str]]:
        tasks = [
            asyncio.create_task(post(session, url, {"model": "e", "input": f"{name} {i}"}))
            for i in range(50)
        ]
        if name == "storm":
            await until(lambda: fake.in_flight == 50)
            fake.release.set()
        return [(status, headers[ATTEMPTS]) for status, headers, _ in await asyncio.gather(*tasks)]

    async with aiohttp.ClientSession() as session:
        assert await wave(session, "storm") == [(200, "2")] * 50
        assert (fake.total_calls, backup.total_calls) == (50, 50)
        view = (await status_of(session, proxy.base_url))["targets"]["primary"]
        assert (view["ejected"], view["paused_for_s"], view["consecutive_failures"]) == (
            True,
            120.0,
            0,  # a 429 is pacing, not a failure
        )
        # While it cools down, new requests go straight to the fallback.
        assert await wave(session, "after") == [(200, "1")] * 50
        assert (fake.total_calls, backup.total_calls) == (50, 100)
        clock.now += 120.0
        fake.settings = replace(fake.settings, error_status=None)
        status, headers, _ = await post(session, url, {"model": "e", "input": "back"})
    assert (status, headers[ATTEMPTS], fake.total_calls) == (200, "1", 51)
    assert (
        rt.metrics.registry.get_sample_value(
            "llm_sidecar_upstream_retries_refused_total", {"reason": "budget"}
        )
        is None
    )
    await wait_idle(rt)


async def test_every_target_ejected_makes_one_attempt(
    fake: FakeUpstream, backup: FakeUpstream, start_proxy: StartProxy
) -> None:
    eject = {"eject_after": 1, "eject_for": "1h"}
    policy = two(fake.base_url, backup.base_url, eject=eject, retry={"attempts": 4})
    proxy = await start_proxy(policy, raw=True)
    clock = hold_clock(proxy.runtime)
    fake.settings = replace(fake.settings, error_status=503)
    backup.settings = replace(backup.settings, error_status=503)
    url = f"{proxy.base_url}/chat/completions"
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await post(session, url, chat("eject both"))
        assert (status, headers[ATTEMPTS], headers["x-should-retry"]) == (503, "2", "false")
        assert (fake.total_calls, backup.total_calls) == (1, 1)  # both ejected now
        for n in range(3):
            clock.now += 1.0
            status, headers, _ = await post(session, url, chat(f"still down {n}"))
            # One try, at the least recently failed, then the failure stands.
            assert (status, headers[ATTEMPTS], headers["x-should-retry"]) == (503, "1", "false")
    # The primary failed first, then the backup, then they alternate.
    assert (fake.total_calls, backup.total_calls) == (3, 2)
    assert (
        proxy.runtime.metrics.registry.get_sample_value(
            "llm_sidecar_upstream_retries_refused_total", {"reason": "ejected"}
        )
        == 4
    )
    await wait_idle(proxy.runtime)


async def test_going_back_to_a_target_that_failed_waits_a_backoff(
    fake: FakeUpstream,
    backup: FakeUpstream,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="llm_sidecar.access")
    retry = {"attempts": 4, "backoff": "20ms"}
    policy = two(fake.base_url, backup.base_url, eject={"eject_after": 10}, retry=retry)
    proxy = await start_proxy(policy, raw=True)
    proxy.runtime.retries.rng.seed(3)
    fake.settings = replace(fake.settings, error_status=502)
    backup.settings = replace(backup.settings, error_status=503)
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await post(session, f"{proxy.base_url}/chat/completions", chat("wrap"))
    assert (status, headers[ATTEMPTS], headers["x-should-retry"]) == (503, "4", "false")
    [attempts] = [
        r.fields["attempts"]  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "llm_sidecar.access"
    ]
    targets = [a["target"] for a in attempts]
    waits = [a["waited_ms"] for a in attempts]
    assert targets == ["primary", "backup", "primary", "backup"]
    # The fallback goes at once; the way back to a target that failed backs off
    # (full jitter under 20 ms x 2^n for the n-th retry, the fallback counted).
    assert waits[:2] == [0.0, 0.0]
    assert 0.0 < waits[2] <= 40.0 and 0.0 < waits[3] <= 80.0, waits
    await wait_idle(proxy.runtime)


async def test_weighted_balance_three_to_one(
    fake: FakeUpstream, backup: FakeUpstream, start_proxy: StartProxy
) -> None:
    targets = [{"upstream": "heavy", "weight": 3}, {"upstream": "light", "weight": 1}]
    policy = routed(
        {"heavy": fake.base_url, "light": backup.base_url},
        {"targets": targets, "strategy": "balance"},
    )
    proxy = await start_proxy(policy, raw=True)
    proxy.runtime.retries.rng.seed(15)
    url = f"{proxy.base_url}/embeddings"
    gate = asyncio.Semaphore(16)

    async def one(session: aiohttp.ClientSession, n: int) -> int:
        async with gate:
            status, _, _ = await post(session, url, {"model": "e", "input": f"spread {n}"})
            return status

    async with aiohttp.ClientSession() as session:
        statuses = await asyncio.gather(*(one(session, n) for n in range(400)))
    assert set(statuses) == {200}
    assert fake.total_calls + backup.total_calls == 400
    # Binomial(400, 3/4): mean 300, sd about 8.7; 5 sd either side.
    assert abs(fake.total_calls - 300) <= 43, fake.total_calls


async def test_each_target_gets_its_model_and_the_key_stays_the_callers(
    backup: FakeUpstream, start_proxy: StartProxy
) -> None:
    targets = [{"upstream": "primary"}, {"upstream": "backup", "model": "backup-deployment"}]
    policy = routed(
        {"primary": refused_url(), "backup": backup.base_url},
        {"targets": targets, "cache": {"ttl": "1h"}},
    )
    proxy = await start_proxy(policy, raw=True)
    url = f"{proxy.base_url}/chat/completions"
    async with aiohttp.ClientSession() as session:
        status, headers, body = await post(session, url, chat("rename me"))
        assert (status, headers["x-llm-sidecar"]) == (200, "lead")
        assert orjson.loads(body)["model"] == "backup-deployment"
        await proxy.runtime.cache.flush()
        # The same request, whichever target answered it, is the same key.
        status, headers, again = await post(session, url, chat("rename me"))
    assert (status, headers["x-llm-sidecar"], again) == (200, "hit", body)
    [sent] = [orjson.loads(r.body) for r in backup.requests]
    assert sent["model"] == "backup-deployment"
    assert backup.total_calls == 1


async def test_each_upstream_key_goes_to_its_upstream_only(
    fake: FakeUpstream,
    backup: FakeUpstream,
    start_proxy: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PRIMARY_KEY", "sk-primary")
    monkeypatch.setenv("THIRD_KEY", "sk-third")
    third = FakeUpstream()
    await third.start()
    try:
        policy = routed(
            {"primary": fake.base_url, "backup": backup.base_url, "third": third.base_url},
            {
                "targets": [{"upstream": "primary"}, {"upstream": "backup"}, {"upstream": "third"}],
                "retry": {"attempts": 3},
            },
        )
        policy["upstreams"]["primary"]["api_key_env"] = "PRIMARY_KEY"
        policy["upstreams"]["third"]["api_key_env"] = "THIRD_KEY"
        proxy = await start_proxy(policy, raw=True)
        fake.settings = replace(fake.settings, error_status=503)
        backup.settings = replace(backup.settings, error_status=503)
        async with aiohttp.ClientSession() as session:
            status, headers, _ = await post(
                session,
                f"{proxy.base_url}/chat/completions",
                chat("keys"),
                Authorization="Bearer sk-caller",
            )
        assert (status, headers[ATTEMPTS]) == (200, "3")
        [to_primary], [to_backup], [to_third] = fake.requests, backup.requests, third.requests
        assert to_primary.headers["authorization"] == "Bearer sk-primary"
        # The primary's injected key replaced the caller's; neither reaches the backup.
        assert "authorization" not in to_backup.headers
        assert to_third.headers["authorization"] == "Bearer sk-third"
    finally:
        await third.close()


async def test_fallback_strategy_goes_down_the_list(
    fake: FakeUpstream, backup: FakeUpstream, start_proxy: StartProxy
) -> None:
    third = FakeUpstream()
    await third.start()
    try:
        targets = [{"upstream": "a"}, {"upstream": "b"}, {"upstream": "c"}]
        policy = routed(
            {"a": fake.base_url, "b": backup.base_url, "c": third.base_url},
            {"targets": targets},
        )
        for settings in policy["upstreams"].values():
            settings["eject_after"] = 10
        proxy = await start_proxy(policy, raw=True)
        fake.settings = replace(fake.settings, error_status=502)
        backup.settings = replace(backup.settings, error_status=500)
        async with aiohttp.ClientSession() as session:
            for n in range(3):
                status, headers, _ = await post(
                    session, f"{proxy.base_url}/chat/completions", chat(f"order {n}")
                )
                assert (status, headers[ATTEMPTS]) == (200, "3")
        assert (fake.total_calls, backup.total_calls, third.total_calls) == (3, 3, 3)
    finally:
        await third.close()


async def test_reload_resets_the_ejection_of_targets_that_changed(
    backup: FakeUpstream, start_proxy: StartProxy
) -> None:
    policy = two(refused_url(), backup.base_url, eject={"eject_after": 1, "eject_for": "1h"})
    proxy = await start_proxy(policy, raw=True)
    rt = proxy.runtime
    url = f"{proxy.base_url}/chat/completions"
    moved = FakeUpstream()
    await moved.start()
    try:
        async with aiohttp.ClientSession() as session:
            await post(session, url, chat("eject"))
            assert (await status_of(session, proxy.base_url))["targets"]["primary"]["ejected"]
            # A reload that leaves the primary as it was keeps it ejected.
            apply_policy(rt, parse_policy(yaml.safe_dump({**policy, "version": "2"}), "p.yaml"))
            assert (await status_of(session, proxy.base_url))["targets"]["primary"]["ejected"]
            # A reload that points it elsewhere forgets the old failures.
            policy["upstreams"]["primary"]["base_url"] = moved.base_url
            apply_policy(rt, parse_policy(yaml.safe_dump({**policy, "version": "3"}), "p.yaml"))
            assert not (await status_of(session, proxy.base_url))["targets"]["primary"]["ejected"]
            status, headers, _ = await post(session, url, chat("moved"))
        assert (status, headers[ATTEMPTS]) == (200, "1")
        assert (moved.total_calls, backup.total_calls) == (1, 1)
    finally:
        await moved.close()


async def test_each_attempt_leases_its_targets_session_until_its_response_is_done(
    fake: FakeUpstream, backup: FakeUpstream, start_proxy: StartProxy
) -> None:
    """A reload that replaces both upstreams mid-call closes the failed attempt's
    session at once and the answering one's only once its stream has ended."""
    policy = two(fake.base_url, backup.base_url)
    proxy = await start_proxy(policy, raw=True)
    rt = proxy.runtime
    [route] = rt.snapshot.routes
    fake.settings = replace(fake.settings, error_status=503)
    backup.hold_after = 1  # the backup's head is relayed, then it holds
    url = f"{proxy.base_url}/chat/completions"
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(post(session, url, chat("lease", stream=True)))
        await until(lambda: any(s.head.done() for s in rt.table))
        failed, answering = (rt.pool.session(t.upstream_name, t.upstream) for t in route.targets)
        for upstream in policy["upstreams"].values():
            upstream["idle_timeout"] = "11s"  # a new configuration: new sessions
        apply_policy(rt, parse_policy(yaml.safe_dump({**policy, "version": "2"}), "p.yaml"))
        await until(lambda: failed.closed)  # its attempt ended with the 503
        assert not answering.closed  # the answer is still streaming through it
        backup.release.set()
        status, headers, body = await task
    assert (status, headers[ATTEMPTS]) == (200, "2")
    assert body.rstrip().endswith(b"data: [DONE]")
    # One upstream call counted per attempt, by the attempt loop alone.
    calls = rt.metrics.registry.get_sample_value
    counted = [
        calls("llm_sidecar_upstream_requests_total", {"route": "0", "status": status})
        for status in ("503", "200")
    ]
    assert counted == [1, 1]
    await until(lambda: answering.closed)
    await wait_idle(rt)


async def test_every_target_gets_the_confined_path_and_the_query_as_sent(
    fake: FakeUpstream, backup: FakeUpstream, start_proxy: StartProxy
) -> None:
    """Each attempt's URL is built by `upstream_url`: the canonical path and the
    caller's query, still encoded, reach the fallback exactly as the primary."""
    proxy = await start_proxy(two(fake.base_url, backup.base_url), raw=True)
    fake.settings = replace(fake.settings, error_status=503)
    query = "api-version=2024-06-01&q=a%2Fb%20c%3D"
    # Sent as written: an empty and a dot segment that intake must resolve.
    url = URL(f"{proxy.base_url}//chat/./completions?{query}", encoded=True)
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=chat("both targets")) as response,
    ):
        assert (response.status, response.headers[ATTEMPTS]) == (200, "2")
    expected = f"/v1/chat/completions?{query}"
    assert [r.target for r in fake.requests] == [expected]
    assert [r.target for r in backup.requests] == [expected]


@pytest.mark.parametrize("cache_fallback", [True, False])
async def test_cache_fallback_decides_whether_a_fallbacks_answer_is_cached(
    fake: FakeUpstream, backup: FakeUpstream, start_proxy: StartProxy, cache_fallback: bool
) -> None:
    policy = two(fake.base_url, backup.base_url, cache={"ttl": "1h"}, cache_fallback=cache_fallback)
    proxy = await start_proxy(policy, raw=True)
    fake.settings = replace(fake.settings, error_status=503)
    url = f"{proxy.base_url}/chat/completions"
    async with aiohttp.ClientSession() as session:
        first = await post(session, url, chat("cache me?"))
        await proxy.runtime.cache.flush()
        second = await post(session, url, chat("cache me?"))
    assert (first[0], first[1]["x-llm-sidecar"]) == (200, "lead")
    assert second[1]["x-llm-sidecar"] == ("hit" if cache_fallback else "lead")
    assert backup.total_calls == (1 if cache_fallback else 2)
    await wait_idle(proxy.runtime)
