"""Bounds: no caller and no upstream holds a slot, a buffer or a task without limit.

Callers that stop reading hold no stage slot and are dropped alone after the
write timeout; an upstream response past `max_response_bytes`,
`max_event_bytes` or `max_duration` ends with an error for its readers, its
connection closed, its slot released and nothing cached.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import replace
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.observe import OBSERVER
from proxy.sse import EventTooLarge, SSEDecoder
from proxy.stream import Stream
from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import RunningProxy, StartProxy, post, until, wait_idle, wait_readers
from tests.stage_recorder import record_stages

CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "bounds"}]}

# A backlog far past what loopback socket buffers absorb (about 3 MiB with a
# 4 KiB receive buffer), so a caller that reads nothing really fills up.
BIG_TOKENS, PADDING = 100, 64 * 1024


def _live_stream(proxy: RunningProxy) -> Stream:
    streams = list(proxy.runtime.table)
    assert len(streams) == 1
    return streams[0]


async def _stalled_caller(port: int, body: dict[str, Any]) -> socket.socket:
    """A caller that sends its request and never reads a byte of the answer."""
    raw = orjson.dumps(body)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(raw), raw)
    )
    await loop.sock_sendall(sock, request)
    return sock


async def _cut_by_proxy(sock: socket.socket) -> bool:
    """Read what the caller was sent until the proxy's end: True if it reset or closed."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(10):
            while await loop.sock_recv(sock, 1 << 20):
                pass
    except ConnectionResetError:
        pass
    return True


def _big_answer(fake: FakeUpstream) -> None:
    """The next answer: a large backlog, every content event sent, the end held back."""
    fake.settings = replace(fake.settings, tokens=BIG_TOKENS, token_padding=PADDING)
    fake.hold_after = BIG_TOKENS + 1


async def _backlog_logged(proxy: RunningProxy) -> Stream:
    await wait_readers(proxy, 1)
    stream = _live_stream(proxy)
    await until(lambda: stream.size > BIG_TOKENS * PADDING)
    return stream


def _stall_policy(write_timeout: str) -> dict[str, Any]:
    return {
        "stages": {"follower": {"max_concurrency": 4, "max_queue": 0, "queue_timeout": "1s"}},
        "stream": {"write_high_water": "64KiB", "write_timeout": write_timeout},
    }


# --- item 3: a caller that stops reading -------------------------------------


async def test_callers_that_stop_reading_hold_no_follower_slot(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    # A write timeout far longer than the test: the slots must come back
    # while the stalled callers are still attached, not because they left.
    proxy = await start_proxy(_stall_policy("120s"))
    rt = proxy.runtime
    recorder = record_stages(rt)
    body = {**CHAT, "stream": True}
    url = f"{proxy.base_url}/chat/completions"
    _big_answer(fake)
    async with aiohttp.ClientSession() as session:
        leader = asyncio.create_task(post(session, url, body))
        stream = await _backlog_logged(proxy)
        stalled = [await _stalled_caller(proxy.port, body) for _ in range(4)]
        try:
            await wait_readers(proxy, 5)
            await until(lambda: rt.stages.follower.stats().in_use == 0, timeout=5)
            follower_slots = [e.kind for e in recorder.events if e.stage == "follower"]
            assert follower_slots.count("acquire") == follower_slots.count("release") == 4
            assert stream.readers == 5  # still attached, holding no slot
            # The stage is at its limit of 4 with no queue: the next follower
            # is served only because the stalled ones hold nothing.
            nxt = asyncio.create_task(post(session, url, body))
            await wait_readers(proxy, 6)
            fake.release.set()
            async with asyncio.timeout(20):
                results = await asyncio.gather(leader, nxt)
            assert [status for status, _, _ in results] == [200, 200]
            assert results[0][2] == results[1][2]
            assert results[0][2].endswith(b"data: [DONE]\n\n")
            assert len(results[0][2]) > BIG_TOKENS * PADDING
            assert stream.readers == 4  # the stalled callers, still waiting on their sockets
        finally:
            for sock in stalled:
                sock.close()
    assert fake.total_calls == 1
    await wait_idle(rt)


async def test_a_caller_that_stops_reading_is_dropped_alone_after_the_write_timeout(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(_stall_policy("300ms"))
    rt = proxy.runtime
    body = {**CHAT, "stream": True}
    url = f"{proxy.base_url}/chat/completions"
    _big_answer(fake)
    async with aiohttp.ClientSession() as session:
        leader = asyncio.create_task(post(session, url, body))
        stream = await _backlog_logged(proxy)
        stalled = [await _stalled_caller(proxy.port, body) for _ in range(3)]
        try:
            await wait_readers(proxy, 4)
            # Dropped while the stream still runs: only the leader is left on it.
            await until(lambda: stream.readers == 1, timeout=10)
            assert stream.state == "open"
            assert rt.stages.follower.stats().in_use == 0
            for sock in stalled:
                assert await _cut_by_proxy(sock)
            fake.release.set()
            async with asyncio.timeout(20):
                status, _, answer = await leader
        finally:
            for sock in stalled:
                sock.close()
    assert status == 200
    assert answer.endswith(b"data: [DONE]\n\n")
    assert len(answer) > BIG_TOKENS * PADDING
    await wait_idle(rt)


async def test_a_pushed_reader_that_stops_reading_is_dropped_alone(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    # Attached before the events flow, the stalled caller is in the push set:
    # the producer writes to it until its buffer is full, then it must drain.
    proxy = await start_proxy(_stall_policy("300ms"))
    fake.settings = replace(fake.settings, tokens=BIG_TOKENS, token_padding=PADDING)
    fake.hold_after = 1
    body = {**CHAT, "stream": True}
    url = f"{proxy.base_url}/chat/completions"
    async with aiohttp.ClientSession() as session:
        leader = asyncio.create_task(post(session, url, body))
        await wait_readers(proxy, 1)
        stream = _live_stream(proxy)
        stalled = await _stalled_caller(proxy.port, body)
        try:
            await wait_readers(proxy, 2)
            fake.release.set()
            async with asyncio.timeout(20):
                status, _, answer = await leader
            await until(lambda: stream.readers == 0, timeout=10)
            assert await _cut_by_proxy(stalled)
        finally:
            stalled.close()
    assert status == 200
    assert answer.endswith(b"data: [DONE]\n\n")
    await wait_idle(proxy.runtime)


async def test_a_whole_body_caller_that_stops_reading_is_dropped_alone(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    # A stream: false answer is one body; aiohttp alone would hand it all to
    # the socket and wait on it forever, holding a copy of it.
    proxy = await start_proxy(_stall_policy("300ms"))
    observer = proxy.app[OBSERVER]
    _big_answer(fake)
    url = f"{proxy.base_url}/chat/completions"
    stalled = await _stalled_caller(proxy.port, CHAT)
    try:
        await wait_readers(proxy, 1)
        async with aiohttp.ClientSession() as session:
            reading = asyncio.create_task(post(session, url, CHAT))
            await wait_readers(proxy, 2)
            fake.release.set()
            async with asyncio.timeout(20):
                status, _, answer = await reading
            assert status == 200
            assert len(answer) > BIG_TOKENS * PADDING
            await until(lambda: observer.active == 0, timeout=10)
            assert await _cut_by_proxy(stalled)
    finally:
        stalled.close()
    await wait_idle(proxy.runtime)


# --- the SSE decoder: cost per read and event size ----------------------------


def test_a_line_that_never_ends_costs_what_each_read_brings() -> None:
    # Before: every read re-joined and re-scanned the whole buffer, about
    # 7 s for 32 MiB in 64 KiB reads; now about 0.07 s. The bound is far
    # from both, so a loaded machine does not make it flaky.
    decoder = SSEDecoder()
    piece = b"x" * 65536
    decoder.feed(b"data: ")
    started = time.process_time()
    for _ in range(512):
        assert decoder.feed(piece) == []
    assert time.process_time() - started < 2.0
    assert len(decoder.pending) == 6 + 512 * 65536
    events = decoder.feed(b"\n\n")
    assert len(events) == 1 and len(events[0].data) == 512 * 65536


def test_an_unfinished_event_past_max_event_bytes_raises_and_never_grows_past_it() -> None:
    cap = 4096
    decoder = SSEDecoder(max_event_bytes=cap)
    first = decoder.feed(b'data: {"a": 1}\n\ndata: ')
    assert [e.data for e in first] == [b'{"a": 1}']
    with pytest.raises(EventTooLarge) as raised:
        for _ in range(100):
            decoder.feed(b"x" * 1000)
            assert len(decoder.pending) <= cap
    assert raised.value.events == []


def test_a_whole_event_past_max_event_bytes_raises_with_the_events_before_it() -> None:
    decoder = SSEDecoder(max_event_bytes=64)
    small, big = b"data: ok\n\n", b"data: " + b"y" * 100 + b"\n\n"
    with pytest.raises(EventTooLarge) as raised:
        decoder.feed(small + big)
    assert [e.raw for e in raised.value.events] == [small]


EVENTS = (b'data: {"a": 1}\r\n\r\n', b"event: x\ndata: two\n\n", b": note\n\n", b"data: [DONE]\n\n")
STREAM = b"".join(EVENTS)


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_events_at_the_cap_pass_split_anywhere(cut: int) -> None:
    decoder = SSEDecoder(max_event_bytes=max(len(e) for e in EVENTS))
    events = decoder.feed(STREAM[:cut]) + decoder.feed(STREAM[cut:])
    assert [e.data for e in events] == [b'{"a": 1}', b"two", b"[DONE]"]
    assert decoder.pending == b""
