"""Retries before the first byte, against real fake upstreams on loopback.

Every count is read from what the fakes recorded (one recorded call per
attempt) or from the proxy's own attempt records; no assertion depends on
how long something took, except a lower bound on a wait the proxy must do.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import RunningProxy, StartProxy, post, until, wait_idle
from tests.proxy_process import free_port
from tests.stage_recorder import record_stages

ATTEMPTS = "x-llm-sidecar-attempts"


def chat(prompt: str, stream: bool = False) -> dict[str, Any]:
    return {"model": "m", "stream": stream, "messages": [{"role": "user", "content": prompt}]}


def upstream(url: str) -> dict[str, str]:
    return {"base_url": url, "first_byte_timeout": "10s", "idle_timeout": "10s"}


def routed(upstreams: dict[str, str], route: dict[str, Any], **top: Any) -> dict[str, Any]:
    """A policy whose catch-all route is `route`, over `upstreams` (name -> base URL)."""
    return {
        "upstreams": {name: upstream(url) for name, url in upstreams.items()},
        "routes": [{"match": {"path": "/v1/*"}, **route}],
        **top,
    }


def two(
    primary: str, backup: str, eject: dict[str, Any] | None = None, **route: Any
) -> dict[str, Any]:
    """A primary and its fallback; `eject` sets both upstreams' ejection thresholds."""
    targets = [{"upstream": "primary"}, {"upstream": "backup"}]
    policy = routed({"primary": primary, "backup": backup}, {"targets": targets, **route})
    for settings in policy["upstreams"].values():
        settings.update(eject or {})
    return policy


def refused_url() -> str:
    """A loopback port nobody listens on: connecting is refused at once."""
    return f"http://127.0.0.1:{free_port()}/v1"


def access_attempts(caplog: pytest.LogCaptureFixture) -> list[list[dict[str, Any]]]:
    return [
        r.fields["attempts"]  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "llm_sidecar.access"
    ]


async def test_429_with_retry_after_ms_then_200(
    fake: FakeUpstream, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llm_sidecar.access")
    proxy = await start_proxy(
        {"routes": [{"match": {"path": "/v1/*"}, "upstream": "fake", "retry": {"attempts": 2}}]}
    )
    fake.settings = replace(fake.settings, error_status=429, error_times=1, retry_after_ms=20)
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-a", max_retries=0)
    try:
        raw = await client.chat.completions.with_raw_response.create(**chat("pace me"))
    finally:
        await client.close()
    assert raw.http_response.status_code == 200
    assert raw.headers[ATTEMPTS] == "2"
    assert raw.parse().choices[0].message.content
    assert fake.total_calls == 2  # one upstream call per attempt
    [attempts] = access_attempts(caplog)
    assert [(a["target"], a["status"], a["waited_ms"]) for a in attempts] == [
        ("fake", 429, 0.0),
        ("fake", 200, 20.0),  # retry-after-ms wins over the 429's Retry-After: 1
    ]
    await wait_idle(proxy.runtime)


async def test_429_with_retry_after_one_second_waits_it_out(
    fake: FakeUpstream, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """The seconds form, honestly: the one test here that really waits a second."""
    caplog.set_level(logging.INFO, logger="llm_sidecar.access")
    proxy = await start_proxy(
        {"routes": [{"match": {"path": "/v1/*"}, "upstream": "fake", "retry": {"attempts": 2}}]}
    )
    fake.settings = replace(fake.settings, error_status=429, error_times=1, retry_after="1")
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await post(session, f"{proxy.base_url}/chat/completions", chat("1s"))
    assert time.monotonic() - started >= 1.0  # a lower bound: load only makes it longer
    assert (status, headers[ATTEMPTS]) == (200, "2")
    assert fake.total_calls == 2
    [attempts] = access_attempts(caplog)
    assert [a["waited_ms"] for a in attempts] == [0.0, 1000.0]


async def test_backoff_retries_the_only_target_until_it_answers(
    fake: FakeUpstream, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llm_sidecar.access")
    retry = {"attempts": 3, "backoff": "10ms"}
    proxy = await start_proxy(
        {"routes": [{"match": {"path": "/v1/*"}, "upstream": "fake", "retry": retry}]}
    )
    fake.settings = replace(fake.settings, error_status=503, error_times=2)
    recorder = record_stages(proxy.runtime)
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await post(session, f"{proxy.base_url}/chat/completions", chat("b"))
    assert (status, headers[ATTEMPTS], fake.total_calls) == (200, "3", 3)
    [attempts] = access_attempts(caplog)
    waits = [a["waited_ms"] for a in attempts]
    assert waits[0] == 0.0
    assert 0.0 <= waits[1] <= 10.0 and 0.0 <= waits[2] <= 20.0  # full jitter under 10ms * 2^n
    # The retries kept the one upstream slot: one acquire, one release, no violation.
    upstream_events = [e.kind for e in recorder.events if e.stage == "upstream"]
    assert upstream_events == ["acquire", "release"]
    assert recorder.violations == []
    await wait_idle(proxy.runtime)


async def test_attempts_run_out_and_the_last_answer_goes_to_the_caller(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    retry = {"attempts": 2, "backoff": "1ms"}
    proxy = await start_proxy(
        {"routes": [{"match": {"path": "/v1/*"}, "upstream": "fake", "retry": retry}]}
    )
    fake.settings = replace(fake.settings, error_status=503)
    async with aiohttp.ClientSession() as session:
        status, headers, body = await post(session, f"{proxy.base_url}/chat/completions", chat("x"))
    assert (status, headers[ATTEMPTS], fake.total_calls) == (503, "2", 2)
    assert orjson.loads(body)["error"]["message"] == "The fake upstream answers 503."
    metrics = proxy.runtime.metrics.registry
    assert (
        metrics.get_sample_value(
            "llm_sidecar_upstream_retries_refused_total", {"reason": "attempts"}
        )
        == 1
    )
    assert (
        metrics.get_sample_value(
            "llm_sidecar_upstream_attempts_total", {"target": "fake", "outcome": "503"}
        )
        == 2
    )


@pytest.mark.parametrize("status", [400, 401, 403, 404])
async def test_client_errors_are_never_retried(
    fake: FakeUpstream, backup: FakeUpstream, start_proxy: StartProxy, status: int
) -> None:
    policy = two(fake.base_url, backup.base_url, retry={"attempts": 3})
    proxy = await start_proxy(policy, raw=True)
    fake.settings = replace(fake.settings, error_status=status)
    async with aiohttp.ClientSession() as session:
        got, headers, _ = await post(session, f"{proxy.base_url}/chat/completions", chat("4xx"))
    assert (got, headers[ATTEMPTS]) == (status, "1")
    assert (fake.total_calls, backup.total_calls) == (1, 0)
    await wait_idle(proxy.runtime)


async def test_a_failure_after_the_first_event_is_not_retried(
    fake: FakeUpstream, backup: FakeUpstream, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(two(fake.base_url, backup.base_url), raw=True)
    fake.settings = replace(fake.settings, drop_after=3, tokens=20)
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-a", max_retries=0)
    try:
        stream = await client.chat.completions.create(**chat("cut", stream=True))
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
    finally:
        await client.close()
    async with aiohttp.ClientSession() as session:
        # A plain call cut before its head is retried (nothing reached a reader);
        # this one streams, is cut after its first events, and its non-stream
        # follower gets the stream's error.
        fake.hold_after = 0
        url = f"{proxy.base_url}/chat/completions"
        leader = asyncio.create_task(post(session, url, chat("cut too", stream=True)))
        async with asyncio.timeout(10):
            await fake.reached_hold.wait()
        follower = asyncio.create_task(post(session, url, chat("cut too")))
        await until(lambda: sum(s.readers for s in proxy.runtime.table) == 2)
        fake.release.set()
        await leader
        status, headers, body = await follower
    assert status == 502  # a non-stream reader gets the stream's error
    assert orjson.loads(body)["error"]["code"] == "upstream_stream_error"
    assert headers[ATTEMPTS] == "1"
    assert fake.total_calls == 2
    assert backup.total_calls == 0  # the second target was never called
    await wait_idle(proxy.runtime)


async def test_retry_after_past_the_limit_moves_to_the_other_target_at_once(
    fake: FakeUpstream,
    backup: FakeUpstream,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="llm_sidecar.access")
    policy = two(fake.base_url, backup.base_url, retry={"max_retry_wait": "2s"})
    proxy = await start_proxy(policy, raw=True)
    fake.settings = replace(fake.settings, error_status=429, retry_after="30")
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await post(session, f"{proxy.base_url}/chat/completions", chat("far"))
    assert (status, headers[ATTEMPTS]) == (200, "2")
    assert (fake.total_calls, backup.total_calls) == (1, 1)
    [attempts] = access_attempts(caplog)
    assert [(a["target"], a["status"], a["waited_ms"]) for a in attempts] == [
        ("primary", 429, 0.0),
        ("backup", 200, 0.0),
    ]


async def test_retry_after_past_the_limit_on_a_lone_target_answers_at_once(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    route = {"match": {"path": "/v1/*"}, "upstream": "fake", "retry": {"attempts": 3}}
    proxy = await start_proxy({"routes": [route]})
    fake.settings = replace(fake.settings, error_status=429, retry_after="30")
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await post(session, f"{proxy.base_url}/chat/completions", chat("l"))
    # The caller's SDK gets the upstream's own Retry-After to pace itself.
    assert (status, headers["Retry-After"], headers[ATTEMPTS]) == (429, "30", "1")
    assert fake.total_calls == 1
    assert (
        proxy.runtime.metrics.registry.get_sample_value(
            "llm_sidecar_upstream_retries_refused_total", {"reason": "retry_after"}
        )
        == 1
    )


async def test_no_target_reachable_is_a_502_naming_the_attempts(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(two(refused_url(), refused_url()), raw=True)
    async with aiohttp.ClientSession() as session:
        status, headers, body = await post(
            session, f"{proxy.base_url}/chat/completions", chat("void")
        )
    assert (status, headers[ATTEMPTS]) == (502, "2")
    assert orjson.loads(body)["error"]["code"] == "upstream_unavailable"
    metrics = proxy.runtime.metrics.registry
    for target in ("primary", "backup"):
        assert (
            metrics.get_sample_value(
                "llm_sidecar_upstream_attempts_total",
                {"target": target, "outcome": "connect_error"},
            )
            == 1
        )
    await wait_idle(proxy.runtime)


async def test_a_one_target_route_without_a_retry_block_keeps_one_attempt(
    fake: FakeUpstream, proxy: RunningProxy
) -> None:
    fake.settings = replace(fake.settings, error_status=503)
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await post(session, f"{proxy.base_url}/chat/completions", chat("1"))
    assert (status, headers[ATTEMPTS], fake.total_calls) == (503, "1", 1)


async def test_the_fakes_error_knobs(fake: FakeUpstream) -> None:
    fake.settings = replace(
        fake.settings, error_status=503, error_times=1, retry_after="7", retry_after_ms=7000
    )
    url = f"{fake.base_url}/chat/completions"
    async with aiohttp.ClientSession() as session:
        first = await post(session, url, chat("knobs"))
        second = await post(session, url, chat("knobs"))
    assert first[0] == 503
    assert (first[1]["Retry-After"], first[1]["retry-after-ms"]) == ("7", "7000")
    assert second[0] == 200  # error_times: only the first call failed
    assert fake.errors_sent == 1


async def test_no_head_in_time_moves_to_the_next_target(
    fake: FakeUpstream, backup: FakeUpstream, start_proxy: StartProxy
) -> None:
    policy = two(fake.base_url, backup.base_url)
    policy["upstreams"]["primary"]["first_byte_timeout"] = "100ms"
    proxy = await start_proxy(policy, raw=True)
    fake.settings = replace(fake.settings, header_delay=30.0)  # no head for far too long
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await post(session, f"{proxy.base_url}/chat/completions", chat("t"))
    assert (status, headers[ATTEMPTS]) == (200, "2")
    assert (fake.total_calls, backup.total_calls) == (1, 1)
    assert (
        proxy.runtime.metrics.registry.get_sample_value(
            "llm_sidecar_upstream_attempts_total", {"target": "primary", "outcome": "timeout"}
        )
        == 1
    )
    await wait_idle(proxy.runtime)


async def test_a_pump_cancelled_while_it_waits_to_retry_gives_everything_back(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    route = {
        "match": {"path": "/v1/*"},
        "upstream": "fake",
        "on_abandon": "cancel",
        "retry": {"attempts": 2, "max_retry_wait": "30s"},
    }
    proxy = await start_proxy({"routes": [route]})
    rt = proxy.runtime
    fake.settings = replace(fake.settings, error_status=503, retry_after="30")
    async with aiohttp.ClientSession() as session:
        caller = asyncio.create_task(
            post(session, f"{proxy.base_url}/chat/completions", chat("leave"))
        )
        # The pump got its 503 and now sleeps 30 s on a budget token.
        await until(lambda: rt.retries.budget.in_flight == 1)
        caller.cancel()  # the only reader leaves: on_abandon cancels the pump
        with pytest.raises(asyncio.CancelledError):
            await caller
        await wait_idle(rt)
    assert rt.retries.budget.in_flight == 0
    assert fake.total_calls == 1  # the retry never went out


async def test_no_retry_once_draining(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    route = {"match": {"path": "/v1/*"}, "upstream": "fake", "retry": {"attempts": 3}}
    proxy = await start_proxy({"routes": [route]})
    proxy.runtime.draining = True
    fake.settings = replace(fake.settings, error_status=503)
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await post(session, f"{proxy.base_url}/chat/completions", chat("d"))
    assert (status, headers[ATTEMPTS], fake.total_calls) == (503, "1", 1)
    assert (
        proxy.runtime.metrics.registry.get_sample_value(
            "llm_sidecar_upstream_retries_refused_total", {"reason": "draining"}
        )
        == 1
    )


async def test_a_retry_block_without_attempts_retries_a_lone_target_once(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    route = {"match": {"path": "/v1/*"}, "upstream": "fake", "retry": {"backoff": "1ms"}}
    proxy = await start_proxy({"routes": [route]})
    # Driven by request headers, as an out-of-process fake would be.
    knobs = {"x-fake-status": "503", "x-fake-error-times": "1"}
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await post(
            session, f"{proxy.base_url}/chat/completions", chat("once more"), **knobs
        )
    assert (status, headers[ATTEMPTS], fake.total_calls) == (200, "2", 2)
    await wait_idle(proxy.runtime)


async def test_the_sdk_does_not_retry_on_top_of_the_proxys_retries(
    fake: FakeUpstream, backup: FakeUpstream, start_proxy: StartProxy
) -> None:
    """With its default max_retries=2, one create() used to make 3 x 3 upstream calls."""
    retry = {"attempts": 3, "backoff": "10ms"}
    proxy = await start_proxy(two(fake.base_url, backup.base_url, retry=retry), raw=True)
    fake.settings = replace(fake.settings, error_status=503)
    backup.settings = replace(backup.settings, error_status=500)
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-a")  # max_retries=2
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(**chat("no storm"))
    finally:
        await client.close()
    response = caught.value.response
    assert (response.headers[ATTEMPTS], response.headers["x-should-retry"]) == ("3", "false")
    # Every upstream call is one of the proxy's attempts; the SDK added none.
    assert fake.total_calls + backup.total_calls == 3
    await wait_idle(proxy.runtime)


async def test_the_sdk_does_not_retry_when_no_target_answered(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(two(refused_url(), refused_url()), raw=True)
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-a")  # max_retries=2
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(**chat("nobody home"))
    finally:
        await client.close()
    assert caught.value.response.headers["x-should-retry"] == "false"
    # One create(), one pump: the SDK came back zero times.
    assert (
        proxy.runtime.metrics.registry.get_sample_value(
            "llm_sidecar_requests_total", {"served": "lead", "status": "502"}
        )
        == 1
    )
    await wait_idle(proxy.runtime)


async def test_the_sdk_still_retries_where_the_proxy_did_not(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    """A route that never retries (one target, no retry block) leaves retrying to the SDK."""
    proxy = await start_proxy()
    # retry-after-ms keeps the SDK's own wait short.
    fake.settings = replace(fake.settings, error_status=503, error_times=1, retry_after_ms=10)
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-a", max_retries=1)
    try:
        raw = await client.chat.completions.with_raw_response.create(**chat("sdk retries"))
    finally:
        await client.close()
    assert raw.http_response.status_code == 200
    assert fake.total_calls == 2


async def test_a_failure_off_the_retry_list_after_a_fallback_tells_the_sdk_not_to_retry(
    fake: FakeUpstream, backup: FakeUpstream, start_proxy: StartProxy
) -> None:
    """501 is not in on_status, but the SDK retries every 5xx: the proxy already tried twice."""
    proxy = await start_proxy(two(fake.base_url, backup.base_url), raw=True)
    fake.settings = replace(fake.settings, error_status=503)
    backup.settings = replace(backup.settings, error_status=501)
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await post(session, f"{proxy.base_url}/chat/completions", chat("5"))
        assert (status, headers[ATTEMPTS], headers["x-should-retry"]) == (501, "2", "false")
        backup.settings = replace(backup.settings, error_status=None)
        status, headers, _ = await post(session, f"{proxy.base_url}/chat/completions", chat("6"))
    assert (status, headers[ATTEMPTS]) == (200, "2")
    assert "x-should-retry" not in headers  # an answer needs no such advice
    await wait_idle(proxy.runtime)
