"""Stage limits: the leader slot is released before the upstream slot is
requested, no request holds two slots, and overflow/timeout answer 429/503.

Assertions read the limiters' recorded stage events, not wall-clock alone.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import aiohttp
import orjson

from proxy.limiter import StageEvent
from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import Hook, StartProxy, post, until, wait_idle
from tests.stage_recorder import record_stages


def _policy(
    hook: Hook, leader: dict[str, Any], upstream: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "stages": {
            "leader": leader,
            "upstream": upstream
            or {"max_concurrency": 16, "max_queue": 64, "queue_timeout": "30s"},
        },
        "routes": [
            {
                "match": {"path": "/v1/*"},
                "upstream": "fake",
                "prepare": [{"step": "http_hook", "url": hook.url, "timeout": "30s"}],
            }
        ],
    }


def _chat(n: int, stream: bool = True) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": f"prompt {n}"}],
        "stream": stream,
    }


def _first(events: list[StageEvent], holder: str, stage: str, kind: str) -> float:
    return next(e.at for e in events if e.holder == holder and e.stage == stage and e.kind == kind)


async def test_seed_scenario_third_request_prepares_after_one_second_not_six(
    fake: FakeUpstream, start_proxy: StartProxy, hook: Hook
) -> None:
    # The seed scenario (hook 1 s, streams ~5 s, two leader slots) driven by
    # gates instead of the clock: the hook and the streams wait for the test.
    hook.gate = asyncio.Event()
    fake.settings = replace(fake.settings, tokens=10)
    fake.hold_after = 1  # every stream stays open until the test releases it
    proxy = await start_proxy(
        _policy(hook, {"max_concurrency": 2, "max_queue": 8, "queue_timeout": "30s"})
    )
    rt = proxy.runtime
    recorder = record_stages(rt)
    url = f"{proxy.base_url}/chat/completions"
    async with aiohttp.ClientSession() as session:
        tasks = [
            asyncio.create_task(post(session, url, _chat(n), **{"X-Request-Id": f"req-{n}"}))
            for n in range(3)
        ]
        # Two requests prepare (in their hooks), the third queues for a slot.
        await until(lambda: (rt.stages.leader.stats().in_use, hook.calls) == (2, 2))
        await until(lambda: rt.stages.leader.stats().queued == 1)
        hook.gate.set()
        # The first two streams are running (held) and the third request has
        # been prepared and is streaming too: it did not wait for them.
        await until(lambda: rt.stages.upstream.stats().in_use == 3)
        events = list(recorder.events)
        fake.release.set()
        async with asyncio.timeout(30):
            results = await asyncio.gather(*tasks)
    assert [status for status, _, _ in results] == [200, 200, 200]
    assert not [e for e in events if e.stage == "upstream" and e.kind == "release"]
    leaders = sorted(
        (f"req-{n}" for n in range(3)), key=lambda h: _first(events, h, "leader", "acquire")
    )
    first, second, third = leaders
    third_prepares = _first(events, third, "leader", "acquire")
    # The third request was prepared as soon as a leader slot was released,
    # while both earlier streams were still running.
    assert third_prepares >= min(
        _first(events, first, "leader", "release"), _first(events, second, "leader", "release")
    )
    events = recorder.events
    assert third_prepares < _first(events, first, "upstream", "release")
    assert third_prepares < _first(events, second, "upstream", "release")
    # Invariant 2: each leader slot is released before that request asks for upstream.
    for holder in leaders:
        assert _first(events, holder, "leader", "release") <= _first(
            events, holder, "upstream", "acquire"
        )
    # Invariant 1: nobody held two slots at once.
    assert recorder.violations == []
    await wait_idle(proxy.runtime)


async def test_queue_overflow_answers_exactly_the_excess_with_429(
    fake: FakeUpstream, start_proxy: StartProxy, hook: Hook
) -> None:
    hook.gate = asyncio.Event()
    proxy = await start_proxy(
        _policy(hook, {"max_concurrency": 2, "max_queue": 3, "queue_timeout": "30s"})
    )
    url = f"{proxy.base_url}/chat/completions"
    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(post(session, url, _chat(n, stream=False))) for n in range(9)]
        async with asyncio.timeout(10):
            while sum(t.done() for t in tasks) < 4:
                await asyncio.sleep(0.01)
        stats = proxy.runtime.stages.leader.stats()
        assert (stats.in_use, stats.queued) == (2, 3)
        hook.gate.set()
        results = await asyncio.gather(*tasks)
    rejected = [r for r in results if r[0] == 429]
    assert len(rejected) == 4
    assert all(r[0] == 200 for r in results if r[0] != 429)
    for _, headers, body in rejected:
        assert int(headers["Retry-After"]) >= 1
        assert headers["x-llm-sidecar"] == "error"  # not "lead": the proxy answered itself
        assert orjson.loads(body)["error"]["code"] == "proxy_queue_full"
    await wait_idle(proxy.runtime)


async def test_queue_timeout_answers_503(
    fake: FakeUpstream, start_proxy: StartProxy, hook: Hook
) -> None:
    hook.gate = asyncio.Event()
    proxy = await start_proxy(
        _policy(hook, {"max_concurrency": 1, "max_queue": 5, "queue_timeout": "200ms"})
    )
    url = f"{proxy.base_url}/chat/completions"
    async with aiohttp.ClientSession() as session:
        held = asyncio.create_task(post(session, url, _chat(0, stream=False)))
        async with asyncio.timeout(5):
            while proxy.runtime.stages.leader.stats().in_use < 1:
                await asyncio.sleep(0.01)
        status, headers, body = await post(session, url, _chat(1, stream=True))
        hook.gate.set()
        assert (await held)[0] == 200
    assert status == 503
    assert "Retry-After" in headers
    assert headers["x-llm-sidecar"] == "error"
    error = orjson.loads(body)["error"]
    assert error["code"] == "proxy_queue_timeout" and set(error) == {
        "message",
        "type",
        "param",
        "code",
    }
    await wait_idle(proxy.runtime)
