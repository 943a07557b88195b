"""Bounds: no caller and no upstream holds a slot, a buffer or a task without limit.

Callers that stop reading hold no stage slot and are dropped alone after the
write timeout; an upstream response past `max_response_bytes`,
`max_event_bytes` or `max_duration` ends with an error for its readers, its
connection closed, its slot released and nothing cached.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import replace
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from proxy.errors import ProxyError
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


async def test_a_dropped_reader_is_logged_499_and_counted_once(
    fake: FakeUpstream, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llm_sidecar.access")
    proxy = await start_proxy(_stall_policy("300ms"))
    rt = proxy.runtime
    value = rt.metrics.registry.get_sample_value
    dropped = {"reason": "write_timeout"}
    assert value("llm_sidecar_readers_dropped_total", dropped) == 0
    body = {**CHAT, "stream": True}
    _big_answer(fake)
    async with aiohttp.ClientSession() as session:
        leader = asyncio.create_task(post(session, f"{proxy.base_url}/chat/completions", body))
        stream = await _backlog_logged(proxy)
        stalled = await _stalled_caller(proxy.port, body)
        try:
            await wait_readers(proxy, 2)
            await until(lambda: stream.readers == 1, timeout=10)  # dropped, mid-stream
            assert await _cut_by_proxy(stalled)
            fake.release.set()
            async with asyncio.timeout(20):
                status, _, _ = await leader
        finally:
            stalled.close()
    await wait_idle(rt)
    lines = [r.fields for r in caplog.records if r.name == "llm_sidecar.access"]  # type: ignore[attr-defined]
    assert status == 200
    assert sorted((line["served"], line["status"]) for line in lines) == [
        ("follow", 499),
        ("lead", 200),
    ]
    [cut] = [line for line in lines if line["status"] == 499]
    assert 0 < cut["bytes_out"] < stream.size  # what it was sent before the cut
    assert value("llm_sidecar_readers_dropped_total", dropped) == 1
    assert value("llm_sidecar_requests_total", {"served": "follow", "status": "499"}) == 1
    assert value("llm_sidecar_requests_total", {"served": "follow", "status": "200"}) is None
    assert value("llm_sidecar_requests_total", {"served": "lead", "status": "200"}) == 1


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


# --- item 4: an upstream response past its bounds ----------------------------

# bound: (upstream policy, fake settings, error code)
BOUNDS: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "bytes": (
        {"max_response_bytes": "256KiB"},
        {"endless": "events", "token_padding": 1024},
        "upstream_response_too_large",
    ),
    "event": (
        {"max_event_bytes": "256KiB"},
        {"endless": "line"},
        "upstream_event_too_large",
    ),
    "duration": (
        {"max_duration": "400ms"},
        {"endless": "events", "token_delay": 0.005},
        "upstream_response_too_long",
    ),
}


def _bounded_policy(upstream: dict[str, Any], on_abandon: str = "finish") -> dict[str, Any]:
    return {
        "upstreams": {"fake": upstream},
        "routes": [
            {
                "match": {"path": "/v1/*"},
                "upstream": "fake",
                "on_abandon": on_abandon,
                "cache": {"ttl": "1h"},
            }
        ],
    }


async def _assert_nothing_cached(fake: FakeUpstream, proxy: RunningProxy, body: Any) -> None:
    fake.settings = replace(fake.settings, endless=None, token_delay=0.0, token_padding=0)
    fake.hold_after = None
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await post(session, f"{proxy.base_url}/chat/completions", body)
    assert status == 200
    assert headers["x-llm-sidecar"] == "lead"


@pytest.mark.parametrize("bound", list(BOUNDS))
async def test_a_response_past_a_bound_ends_with_an_error_for_every_reader(
    fake: FakeUpstream, start_proxy: StartProxy, bound: str
) -> None:
    upstream, settings, code = BOUNDS[bound]
    proxy = await start_proxy(_bounded_policy(upstream))
    rt = proxy.runtime
    fake.settings = replace(fake.settings, **settings)
    fake.hold_after = 0  # both readers attach before the first byte
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-a", max_retries=0)
    url = f"{proxy.base_url}/chat/completions"
    try:

        async def stream_reader() -> None:
            chunks = await client.chat.completions.create(**CHAT, stream=True)
            async for _ in chunks:
                pass

        async with aiohttp.ClientSession() as session:
            streaming = asyncio.create_task(stream_reader())
            async with asyncio.timeout(10):
                await fake.reached_hold.wait()  # the streaming caller leads
            plain = asyncio.create_task(post(session, url, CHAT, Authorization="Bearer sk-a"))
            await wait_readers(proxy, 2)
            stream = _live_stream(proxy)
            fake.release.set()
            async with asyncio.timeout(20):
                with pytest.raises(openai.APIError) as raised:
                    await streaming
                plain_status, _, plain_body = await plain
    finally:
        await client.close()
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["code"] == code
    assert plain_status == 502
    assert orjson.loads(plain_body)["error"]["code"] == code
    assert stream.error is not None and stream.error.code == code
    cap = 256 * 1024
    if bound != "duration":
        # The log holds at most the cap (and the error event).
        assert stream.size <= cap + len(stream.error.sse_event())
    await until(lambda: fake.in_flight == 0)  # the upstream connection was closed
    assert fake.disconnects == 1
    await wait_idle(rt)
    await _assert_nothing_cached(fake, proxy, CHAT)


@pytest.mark.parametrize("bound", ["bytes", "duration"])  # a plain body has no events
async def test_a_plain_call_past_a_bound_ends_with_an_error_for_every_reader(
    fake: FakeUpstream, start_proxy: StartProxy, bound: str
) -> None:
    # A plain caller leads, so the upstream is asked for a plain body: the
    # bound ends it too, its streaming follower included, and nothing is cached.
    upstream, settings, code = BOUNDS[bound]
    proxy = await start_proxy(_bounded_policy(upstream))
    fake.settings = replace(fake.settings, **settings)
    fake.hold_after = 0  # both readers attach before the first byte
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-a", max_retries=0)
    url = f"{proxy.base_url}/chat/completions"
    try:

        async def stream_reader() -> None:
            chunks = await client.chat.completions.create(**CHAT, stream=True)
            async for _ in chunks:
                pass

        async with aiohttp.ClientSession() as session:
            plain = asyncio.create_task(post(session, url, CHAT, Authorization="Bearer sk-a"))
            async with asyncio.timeout(10):
                await fake.reached_hold.wait()  # the plain caller leads
            streaming = asyncio.create_task(stream_reader())
            await wait_readers(proxy, 2)
            stream = _live_stream(proxy)
            assert stream.plain_call
            fake.release.set()
            async with asyncio.timeout(20):
                plain_status, _, plain_body = await plain
                with pytest.raises(openai.APIError) as raised:
                    await streaming
    finally:
        await client.close()
    assert plain_status == 502
    assert orjson.loads(plain_body)["error"]["code"] == code
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["code"] == code
    # Before the head: the error is the head's, no body was ever logged.
    failed = stream.head.exception()
    assert isinstance(failed, ProxyError) and failed.code == code
    assert stream.plain is None and not stream.complete and stream.size == 0
    await until(lambda: fake.in_flight == 0)  # the upstream connection was closed
    await wait_idle(proxy.runtime)
    await _assert_nothing_cached(fake, proxy, CHAT)


@pytest.mark.parametrize("bound", list(BOUNDS))
async def test_a_response_nobody_reads_is_bounded_too(
    fake: FakeUpstream, start_proxy: StartProxy, bound: str
) -> None:
    # on_abandon: finish keeps the call going for the cache after every
    # caller left; the bound still ends it, and nothing partial is cached.
    upstream, settings, code = BOUNDS[bound]
    proxy = await start_proxy(_bounded_policy(upstream, on_abandon="finish"))
    fake.settings = replace(fake.settings, **settings)
    fake.hold_after = 0
    body = {**CHAT, "stream": True}
    session = aiohttp.ClientSession()
    response = await session.post(f"{proxy.base_url}/chat/completions", json=body)
    await wait_readers(proxy, 1)
    stream = _live_stream(proxy)
    response.close()
    await session.close()
    await until(lambda: stream.readers == 0)
    fake.release.set()
    async with asyncio.timeout(20):
        await asyncio.shield(stream.finished)
    assert stream.error is not None and stream.error.code == code
    assert not stream.complete
    await until(lambda: fake.in_flight == 0)
    await wait_idle(proxy.runtime)
    await _assert_nothing_cached(fake, proxy, body)


@pytest.mark.parametrize("shape", ["endless", "declared"])
async def test_a_plain_body_past_max_response_bytes_is_a_502(
    fake: FakeUpstream, start_proxy: StartProxy, shape: str
) -> None:
    proxy = await start_proxy(_bounded_policy({"max_response_bytes": "64KiB"}))
    if shape == "endless":
        fake.settings = replace(fake.settings, endless="events")
    else:  # a Content-Length over the cap is refused before reading the body
        fake.settings = replace(fake.settings, embedding_dims=16384)
    body = {"model": "emb", "input": ["a"], "encoding_format": "float"}
    async with aiohttp.ClientSession() as session, asyncio.timeout(20):
        status, _, answer = await post(session, f"{proxy.base_url}/embeddings", body)
    assert status == 502
    assert orjson.loads(answer)["error"]["code"] == "upstream_response_too_large"
    await until(lambda: fake.in_flight == 0)
    await wait_idle(proxy.runtime)


async def test_healthz_answers_while_a_stream_without_newlines_runs(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    # A large cap, so the hostile stream runs for a while: every read must
    # cost what it reads, not what is buffered, or the loop stalls.
    proxy = await start_proxy(_bounded_policy({"max_event_bytes": "48MiB"}))
    fake.settings = replace(fake.settings, endless="line")
    fake.hold_after = 1
    base = f"http://127.0.0.1:{proxy.port}"
    async with aiohttp.ClientSession() as session:
        # A streaming caller: the upstream is asked in its mode, so it streams.
        url = f"{proxy.base_url}/chat/completions"
        reader = asyncio.create_task(post(session, url, {**CHAT, "stream": True}))
        await wait_readers(proxy, 1)
        stream = _live_stream(proxy)
        fake.release.set()
        answered = 0
        while not stream.finished.done():
            async with asyncio.timeout(2), session.get(f"{base}/healthz") as health:
                assert health.status == 200
            answered += 1
        async with asyncio.timeout(20):
            status, _, answer = await reader
    assert answered >= 1
    assert status == 200  # its stream had started: the bound ends it with an error event
    assert b'"code":"upstream_event_too_large"' in answer
    await until(lambda: fake.in_flight == 0)
    await wait_idle(proxy.runtime)


# --- the relay gets the same bounds -------------------------------------------


def _relay_policy(upstream: dict[str, Any]) -> dict[str, Any]:
    return {
        "upstreams": {"fake": upstream},
        "routes": [{"match": {"path": "/v1/*"}, "upstream": "fake", "coalesce": False}],
    }


@pytest.mark.parametrize("bound", ["bytes", "duration"])
async def test_a_relayed_stream_past_a_bound_ends_with_an_error_event(
    fake: FakeUpstream, start_proxy: StartProxy, bound: str
) -> None:
    upstream, settings, code = BOUNDS[bound]
    proxy = await start_proxy(_relay_policy(upstream))
    fake.settings = replace(fake.settings, **settings)
    body = {**CHAT, "stream": True}
    async with aiohttp.ClientSession() as session, asyncio.timeout(20):
        status, headers, answer = await post(session, f"{proxy.base_url}/chat/completions", body)
    assert status == 200
    assert headers["x-llm-sidecar"] == "bypass"
    last = answer.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert orjson.loads(last.removeprefix(b"data: "))["error"]["code"] == code
    if bound == "bytes":
        assert len(answer) <= 256 * 1024 + len(last) + 2
    await until(lambda: fake.in_flight == 0)
    await wait_idle(proxy.runtime)


async def test_a_relayed_caller_that_stops_reading_is_dropped_with_its_upstream_call(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    policy = _relay_policy({})
    policy["stream"] = _stall_policy("300ms")["stream"]
    proxy = await start_proxy(policy)
    # An upstream that never ends: only the proxy can end this exchange.
    fake.settings = replace(fake.settings, endless="events", token_padding=PADDING)
    stalled = await _stalled_caller(proxy.port, {**CHAT, "stream": True})
    try:
        await until(lambda: fake.in_flight == 1)
        # The relay stops reading the upstream while the caller's socket is
        # full; after the write timeout both connections are closed.
        await until(lambda: fake.in_flight == 0, timeout=10)
        assert fake.disconnects == 1
        assert await _cut_by_proxy(stalled)
    finally:
        stalled.close()
    await wait_idle(proxy.runtime)


async def test_a_relayed_plain_body_past_max_response_bytes_is_refused_or_cut(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(_relay_policy({"max_response_bytes": "64KiB"}))
    body = {"model": "emb", "input": ["a"], "encoding_format": "float"}
    url = f"{proxy.base_url}/embeddings"
    async with aiohttp.ClientSession() as session:
        # Declared over the cap: refused before anything reaches the caller.
        fake.settings = replace(fake.settings, embedding_dims=16384)
        status, _, answer = await post(session, url, body)
        assert status == 502
        assert orjson.loads(answer)["error"]["code"] == "upstream_response_too_large"
        # Found over the cap while relaying: the caller sees a cut body.
        fake.settings = replace(fake.settings, embedding_dims=8, endless="events")
        with pytest.raises(aiohttp.ClientPayloadError):
            async with asyncio.timeout(20):
                await post(session, url, body)
    await until(lambda: fake.in_flight == 0)
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
