"""Faults and disconnects: every reader gets a clear end, nothing leaks.

After each scenario every stage's in-use and queued counts are back to zero,
the in-flight table is empty and no pump task is left.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import aiohttp
import openai
import orjson
import pytest

from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import RunningProxy, StartProxy, post, until, wait_idle, wait_readers

CHAT = {"model": "m", "messages": [{"role": "user", "content": "faults"}]}


@pytest.mark.parametrize("status", [500, 429, 400])
async def test_error_before_first_event_reaches_every_reader(
    fake: FakeUpstream, proxy: RunningProxy, status: int
) -> None:
    fake.settings = replace(fake.settings, error_status=status, header_delay=0.3)
    url = f"{proxy.base_url}/chat/completions"
    async with aiohttp.ClientSession() as session:
        tasks = [
            asyncio.create_task(post(session, url, {**CHAT, "stream": i % 2 == 0}))
            for i in range(6)
        ]
        await wait_readers(proxy, 6)
        results = await asyncio.gather(*tasks)
        fake.settings = replace(fake.settings, header_delay=0)
        direct = await post(session, f"http://127.0.0.1:{fake.port}/v1/chat/completions", CHAT)
    if status == 400:
        # A 400 to a streamed call may be a refusal to stream: its plain
        # readers ask once more, in their own mode, sharing one plain call
        # (none when a plain caller happened to lead). The direct call is one.
        assert 2 <= fake.total_calls <= 3
    else:
        assert fake.total_calls == 2
    for result_status, headers, body in results:
        assert result_status == status
        assert orjson.loads(body) == orjson.loads(direct[2])
        if status == 429:
            assert headers["Retry-After"] == direct[1]["Retry-After"]
    await wait_idle(proxy.runtime)


async def test_drop_mid_stream_ends_every_reader_with_an_error(
    fake: FakeUpstream, proxy: RunningProxy
) -> None:
    fake.settings = replace(fake.settings, drop_after=5, tokens=20)
    fake.hold_after = 0
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-a", max_retries=0)
    url = f"{proxy.base_url}/chat/completions"
    try:

        async def stream_reader() -> str:
            stream = await client.chat.completions.create(**CHAT, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        async with aiohttp.ClientSession() as session:
            # A streaming leader, so the upstream call is the stream that drops.
            readers = [asyncio.create_task(stream_reader())]
            async with asyncio.timeout(10):
                await fake.reached_hold.wait()
            readers += [asyncio.create_task(stream_reader()) for _ in range(2)]
            plain = asyncio.create_task(post(session, url, CHAT, Authorization="Bearer sk-a"))
            await wait_readers(proxy, 4)
            fake.release.set()
            outcomes = await asyncio.gather(*readers, return_exceptions=True)
            plain_status, _, plain_body = await plain
    finally:
        await client.close()
    assert all(isinstance(o, openai.APIError) for o in outcomes), outcomes
    assert plain_status == 502
    assert orjson.loads(plain_body)["error"]["code"] == "upstream_stream_error"
    assert fake.total_calls == 1
    await wait_idle(proxy.runtime)


async def test_leader_disconnect_leaves_followers_reading(
    fake: FakeUpstream, proxy: RunningProxy
) -> None:
    fake.settings = replace(fake.settings, tokens=12)
    fake.hold_after = 3
    url = f"{proxy.base_url}/chat/completions"
    body = {**CHAT, "stream": True}
    leader_session = aiohttp.ClientSession()
    leader_response = await leader_session.post(url, json=body)
    assert leader_response.headers["x-llm-sidecar"] == "lead"
    async with asyncio.timeout(10):
        await fake.reached_hold.wait()
    async with aiohttp.ClientSession() as session:
        followers = [asyncio.create_task(post(session, url, body)) for _ in range(3)]
        await wait_readers(proxy, 4)
        leader_response.close()  # the leader's caller goes away mid-stream
        await leader_session.close()
        await until(lambda: sum(s.readers for s in proxy.runtime.table) == 3)
        fake.release.set()
        results = await asyncio.gather(*followers)
    assert {status for status, _, _ in results} == {200}
    assert len({b for _, _, b in results}) == 1
    assert results[0][2].endswith(b"data: [DONE]\n\n")
    assert fake.total_calls == 1
    await wait_idle(proxy.runtime)


@pytest.mark.parametrize("on_abandon", ["finish", "cancel"])
async def test_all_readers_leave(
    fake: FakeUpstream, start_proxy: StartProxy, on_abandon: str
) -> None:
    proxy = await start_proxy(
        {
            "routes": [
                {
                    "match": {"path": "/v1/*"},
                    "upstream": "fake",
                    "on_abandon": on_abandon,
                    "cache": {"ttl": "1h"},
                }
            ]
        }
    )
    fake.settings = replace(fake.settings, tokens=10)
    fake.hold_after = 2
    url = f"{proxy.base_url}/chat/completions"
    sessions = [aiohttp.ClientSession() for _ in range(3)]
    responses = [await s.post(url, json={**CHAT, "stream": True}) for s in sessions]
    await wait_readers(proxy, 3)
    async with asyncio.timeout(10):
        await fake.reached_hold.wait()
    for response, session in zip(responses, sessions, strict=True):
        response.close()
        await session.close()
    await until(lambda: all(s.readers == 0 for s in proxy.runtime.table))
    if on_abandon == "cancel":
        # The upstream call is cut: the fake's handler goes away, and nothing is cached.
        await until(lambda: fake.in_flight == 0)
        await wait_idle(proxy.runtime)
        fake.release.set()
    else:
        assert fake.in_flight == 1
        fake.release.set()
        await wait_idle(proxy.runtime)
    # A repeat shows whether the abandoned call finished and was cached.
    fake.hold_after = None
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await post(session, url, {**CHAT, "stream": True})
    assert status == 200
    assert headers["x-llm-sidecar"] == ("hit" if on_abandon == "finish" else "lead")
    await wait_idle(proxy.runtime)


async def test_a_waiting_reader_leaving_never_cancels_the_others(
    fake: FakeUpstream, proxy: RunningProxy
) -> None:
    # Readers share the stream's head and end; one caller's cancelled wait
    # must not cancel them for everybody.
    fake.hold_after = 0
    url = f"{proxy.base_url}/chat/completions"
    async with aiohttp.ClientSession() as session:
        stay = [
            asyncio.create_task(post(session, url, {**CHAT, "stream": s})) for s in (False, True)
        ]
        leaver = asyncio.create_task(post(session, url, CHAT))
        await wait_readers(proxy, 3)
        leaver.cancel()  # its connection closes: the proxy cancels its handler
        await until(lambda: sum(s.readers for s in proxy.runtime.table) == 2)
        fake.release.set()
        results = await asyncio.gather(*stay)
    assert [status for status, _, _ in results] == [200, 200]
    assert fake.total_calls == 1
    await wait_idle(proxy.runtime)
