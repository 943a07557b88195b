"""Coalescing with fan-out: one upstream call per key, every reader served.

Each test gates the fake upstream with events it controls, so "arrived while
in flight" is a fact, not a timing hope.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import replace
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import RunningProxy, StartProxy, post, wait_idle, wait_readers

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "coalesce me"}]}


def _strip_volatile(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("id", "created")}


@pytest.mark.parametrize("leader_streams", [False, True], ids=["plain-leader", "stream-leader"])
async def test_200_identical_requests_make_one_upstream_call(
    fake: FakeUpstream, proxy: RunningProxy, leader_streams: bool
) -> None:
    fake.hold_after = 0
    url = f"{proxy.base_url}/chat/completions"
    bodies = [{**CHAT, "stream": (i % 4 == 0) == leader_streams} for i in range(200)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        # The first one leads: the upstream is asked in its mode, the rest share it.
        tasks = [asyncio.create_task(post(session, url, bodies[0]))]
        async with asyncio.timeout(10):
            await fake.reached_hold.wait()
        tasks += [asyncio.create_task(post(session, url, body)) for body in bodies[1:]]
        await wait_readers(proxy, 200)
        fake.release.set()
        async with asyncio.timeout(30):
            results = await asyncio.gather(*tasks)
        fake.hold_after = None
        async with aiohttp.ClientSession() as direct:
            _, _, direct_body = await post(
                direct, f"http://127.0.0.1:{fake.port}/v1/chat/completions", CHAT
            )
    assert fake.total_calls == 2  # ours, and the direct reference call
    if leader_streams:
        asked = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        assert fake.calls_for(asked) == 1
    else:
        assert fake.calls_for({**CHAT, "stream": False}) == 1
    streamed = [r for r, b in zip(results, bodies, strict=True) if b["stream"]]
    plain = [r for r, b in zip(results, bodies, strict=True) if not b["stream"]]
    assert all(status == 200 for status, _, _ in results)
    assert len({body for _, _, body in streamed}) == 1
    assert streamed[0][2].endswith(b"data: [DONE]\n\n")
    assert b'"usage":{' not in streamed[0][2].replace(b" ", b"")  # nobody asked for it
    assert len({body for _, _, body in plain}) == 1
    assembled = orjson.loads(plain[0][2])
    assert _strip_volatile(assembled) == _strip_volatile(orjson.loads(direct_body))
    served = [headers["x-llm-sidecar"] for _, headers, _ in results]
    assert served.count("lead") == 1 and served.count("follow") == 199
    assert len({headers["x-request-id"] for _, headers, _ in results}) == 200
    await wait_idle(proxy.runtime)


async def test_late_joiner_gets_the_whole_stream(fake: FakeUpstream, proxy: RunningProxy) -> None:
    fake.settings = replace(fake.settings, tokens=10)
    fake.hold_after = 6
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-a", max_retries=0)
    try:

        async def read() -> str:
            stream = await client.chat.completions.create(**CHAT, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        first = asyncio.create_task(read())
        async with asyncio.timeout(10):
            await fake.reached_hold.wait()
        late = asyncio.create_task(read())
        await wait_readers(proxy, 2)
        fake.release.set()
        early_text, late_text = await asyncio.gather(first, late)
    finally:
        await client.close()
    assert late_text == early_text and len(early_text.split()) == 10
    assert fake.total_calls == 1
    await wait_idle(proxy.runtime)


async def test_usage_chunk_only_for_readers_who_asked(
    fake: FakeUpstream, proxy: RunningProxy
) -> None:
    fake.hold_after = 0
    url = f"{proxy.base_url}/chat/completions"
    with_usage = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    without = {**CHAT, "stream": True}
    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(post(session, url, b)) for b in (with_usage, without)]
        await wait_readers(proxy, 2)
        fake.release.set()
        (_, _, a), (_, _, b) = await asyncio.gather(*tasks)
    usage_events = [e for e in a.split(b"\n\n") if b'"choices":[]' in e]
    assert len(usage_events) == 1 and b'"usage":{' in usage_events[0]
    assert a.replace(usage_events[0] + b"\n\n", b"") == b
    assert fake.total_calls == 1


async def test_stream_options_that_change_every_chunk_are_part_of_the_key(
    fake: FakeUpstream, proxy: RunningProxy
) -> None:
    # vLLM's continuous_usage_stats puts usage on every chunk: a reader without
    # it must not share that stream. include_usage alone still shares (above).
    fake.hold_after = 0
    url = f"{proxy.base_url}/chat/completions"
    continuous = {"include_usage": True, "continuous_usage_stats": True}
    bodies = [
        {**CHAT, "stream": True, "stream_options": continuous},
        {**CHAT, "stream": True},
        {**CHAT, "stream": True, "stream_options": {"continuous_usage_stats": True}},
    ]
    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(post(session, url, body)) for body in bodies]
        await wait_readers(proxy, 3)
        assert len(proxy.runtime.table) == 2
        fake.release.set()
        results = await asyncio.gather(*tasks)
    assert fake.total_calls == 2
    assert sorted(h["x-llm-sidecar"] for _, h, _ in results) == ["follow", "lead", "lead"]
    sent = [orjson.loads(r.body)["stream_options"] for r in fake.requests]
    assert sorted(o.get("continuous_usage_stats", False) for o in sent) == [False, True]


async def test_different_credentials_never_share(fake: FakeUpstream, proxy: RunningProxy) -> None:
    fake.hold_after = 0
    url = f"{proxy.base_url}/chat/completions"
    async with aiohttp.ClientSession() as session:
        tasks = [
            asyncio.create_task(post(session, url, CHAT, Authorization=f"Bearer sk-{who}"))
            for who in ("alice", "bob", "alice")
        ]
        await wait_readers(proxy, 3)
        assert len(proxy.runtime.table) == 2
        fake.release.set()
        results = await asyncio.gather(*tasks)
    assert fake.total_calls == 2
    assert sorted(h["x-llm-sidecar"] for _, h, _ in results) == ["follow", "lead", "lead"]
    seen = [r.headers.get("authorization") for r in fake.requests]
    assert sorted(s or "" for s in seen) == ["Bearer sk-alice", "Bearer sk-bob"]


async def test_shared_route_lets_tenants_share(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(
        {"routes": [{"match": {"path": "/v1/*"}, "upstream": "fake", "share_across_tenants": True}]}
    )
    fake.hold_after = 0
    url = f"{proxy.base_url}/chat/completions"
    async with aiohttp.ClientSession() as session:
        tasks = [
            asyncio.create_task(post(session, url, CHAT, Authorization=f"Bearer sk-{who}"))
            for who in ("alice", "bob")
        ]
        await wait_readers(proxy, 2)
        fake.release.set()
        await asyncio.gather(*tasks)
    assert fake.total_calls == 1


async def test_embeddings_coalesce_as_plain_responses(
    fake: FakeUpstream, proxy: RunningProxy
) -> None:
    fake.hold_after = 0  # the answer waits for the test, not for a delay
    body = {"model": "emb", "input": ["a", "b"], "encoding_format": "float"}
    url = f"{proxy.base_url}/embeddings"
    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(post(session, url, body)) for _ in range(5)]
        await wait_readers(proxy, 5)
        fake.release.set()
        results = await asyncio.gather(*tasks)
    assert fake.total_calls == 1
    assert len({b for _, _, b in results}) == 1
    assert len(orjson.loads(results[0][2])["data"]) == 2


async def test_slow_reader_never_holds_the_others(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy({"stream": {"write_high_water": "4KiB"}})
    fake.settings = replace(fake.settings, tokens=4000)
    fake.hold_after = 0
    body = orjson.dumps({**CHAT, "stream": True})
    # A reader with a tiny receive buffer that reads nothing until the end.
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(slow, ("127.0.0.1", proxy.port))
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    )
    await loop.sock_sendall(slow, request)
    await wait_readers(proxy, 1)
    async with aiohttp.ClientSession() as session:
        fast = [
            asyncio.create_task(
                post(session, f"{proxy.base_url}/chat/completions", orjson.loads(body))
            )
            for _ in range(3)
        ]
        await wait_readers(proxy, 4)
        fake.release.set()
        async with asyncio.timeout(20):
            fast_results = await asyncio.gather(*fast)
    # The fast readers finished while the slow one still has most of the stream unread.
    expected = fast_results[0][2]
    assert len(expected) > 200_000
    received = b""
    async with asyncio.timeout(20):
        while chunk := await loop.sock_recv(slow, 65536):
            received += chunk
    slow.close()
    head, _, chunked = received.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0]
    assert _dechunk(chunked) == expected
    assert fake.total_calls == 1
    await wait_idle(proxy.runtime)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out += rest[:size]
        data = rest[size + 2 :]


async def test_waiting_readers_get_keepalive_comments_that_sdks_ignore(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy({"stream": {"keepalive_interval": "100ms"}})
    fake.settings = replace(fake.settings, ttft=0.6)
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{proxy.base_url}/chat/completions", json={**CHAT, "stream": True}) as r,
    ):
        raw = await r.read()
    before_first_event = raw.split(b"data: ", 1)[0]
    assert before_first_event.count(b": keepalive\n\n") >= 2
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-a", max_retries=0)
    try:
        stream = await client.chat.completions.create(**CHAT, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    finally:
        await client.close()
    assert text and len(text.split()) == fake.settings.tokens
    await wait_idle(proxy.runtime)
