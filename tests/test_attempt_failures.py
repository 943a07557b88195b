"""An answer whose body fails after its head: never retried, but the target's failure.

A stream that stalls (idle timeout) or is cut after the head reached a
reader, or a plain body that stalls while being read, ends its readers'
answers with an error as before; it now also counts against the target's
health (so a target that keeps stalling is ejected) and shows on the
access line's attempt. Counts come from /status and the fakes' records.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import StartProxy, post, wait_idle
from tests.test_fallbacks import hold_clock, status_of
from tests.test_retries import access_attempts, chat, routed, two


def one_target(url: str, **upstream: Any) -> dict[str, Any]:
    policy = routed({"fake": url}, {"upstream": "fake"})
    policy["upstreams"]["fake"].update({"idle_timeout": "100ms", **upstream})
    return policy


async def health(proxy_url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        targets: dict[str, Any] = (await status_of(session, proxy_url))["targets"]
        return targets


async def stream_until_error(base_url: str, prompt: str) -> None:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-a", max_retries=0)
    try:
        stream = await client.chat.completions.create(**chat(prompt, stream=True))
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
    finally:
        await client.close()


async def test_a_stream_that_stalls_after_its_head_counts_against_its_target(
    fake: FakeUpstream, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llm_sidecar")
    proxy = await start_proxy(one_target(fake.base_url, eject_after=2), raw=True)
    fake.hold_after = 2  # two events, then nothing: the idle timeout fires
    for n in range(2):
        await stream_until_error(proxy.base_url, f"stall {n}")
    view = (await health(proxy.base_url))["fake"]
    assert (view["consecutive_failures"], view["ejected"]) == (2, True)
    attempts = access_attempts(caplog)
    assert [[(a["status"], a["error"]) for a in line] for line in attempts] == [
        [(200, "idle_timeout")],
        [(200, "idle_timeout")],
    ]
    assert [r.msg for r in caplog.records if r.name == "llm_sidecar.attempts"] == ["target ejected"]
    assert fake.total_calls == 2  # never retried: the head had reached a reader
    fake.release.set()
    await wait_idle(proxy.runtime)


async def test_a_stream_cut_after_its_head_counts_against_its_target(
    fake: FakeUpstream,
    backup: FakeUpstream,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="llm_sidecar.access")
    proxy = await start_proxy(two(fake.base_url, backup.base_url), raw=True)
    fake.settings = replace(fake.settings, drop_after=3, tokens=20)
    await stream_until_error(proxy.base_url, "cut")
    view = (await health(proxy.base_url))["primary"]
    assert (view["consecutive_failures"], view["ejected"]) == (1, False)
    [[attempt]] = access_attempts(caplog)
    assert (attempt["target"], attempt["status"], attempt["error"]) == ("primary", 200, "broken")
    assert backup.total_calls == 0  # too late for a fallback
    await wait_idle(proxy.runtime)


async def test_a_plain_body_that_stalls_counts_against_its_target(
    fake: FakeUpstream, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llm_sidecar.access")
    proxy = await start_proxy(one_target(fake.base_url), raw=True)
    # A whole body that starts and then goes quiet for far longer than idle_timeout.
    fake.settings = replace(fake.settings, endless="events", token_delay=30.0)
    async with aiohttp.ClientSession() as session:
        status, _, body = await post(
            session, f"{proxy.base_url}/embeddings", {"model": "e", "input": "stall"}
        )
    assert (status, orjson.loads(body)["error"]["code"]) == (502, "upstream_stream_error")
    assert (await health(proxy.base_url))["fake"]["consecutive_failures"] == 1
    [[attempt]] = access_attempts(caplog)
    assert (attempt["status"], attempt["error"]) == (200, "idle_timeout")
    await wait_idle(proxy.runtime)


async def test_a_bound_of_ours_is_not_the_targets_failure(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(one_target(fake.base_url, max_response_bytes=1000), raw=True)
    fake.settings = replace(fake.settings, token_padding=500)  # an honest, large answer
    async with aiohttp.ClientSession() as session:
        status, _, _ = await post(session, f"{proxy.base_url}/chat/completions", chat("big"))
    assert status == 502
    assert (await health(proxy.base_url))["fake"]["consecutive_failures"] == 0
    await wait_idle(proxy.runtime)


async def test_a_whole_answer_after_a_cool_down_logs_target_restored(
    fake: FakeUpstream, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llm_sidecar.attempts")
    proxy = await start_proxy(one_target(fake.base_url, eject_after=1, eject_for="30s"), raw=True)
    clock = hold_clock(proxy.runtime)
    fake.settings = replace(fake.settings, error_status=503)
    url = f"{proxy.base_url}/chat/completions"
    async with aiohttp.ClientSession() as session:
        assert (await post(session, url, chat("fail")))[0] == 503
        fake.settings = replace(fake.settings, error_status=None)
        clock.now += 30.0
        assert (await post(session, url, chat("back")))[0] == 200
        assert (await post(session, url, chat("still fine")))[0] == 200
    lines = [(r.msg, r.fields) for r in caplog.records]  # type: ignore[attr-defined]
    assert [msg for msg, _ in lines] == ["target ejected", "target restored"]
    assert lines[1][1] == {"target": "fake", "ejections": 1}
    view = (await health(proxy.base_url))["fake"]
    assert (view["consecutive_failures"], view["ejections"], view["ejected"]) == (0, 0, False)
    await wait_idle(proxy.runtime)
