"""The connection guards: slow callers are closed, malformed ones answered cleanly.

A real proxy on loopback, driven by raw sockets (no client library that
would fix a request up): callers that trickle or stall their head or their
body get a 408 and are closed, and afterwards the server holds no
connection, no handler and no stage slot for them. Malformed requests get
an OpenAI-style 400 and one log line without the bytes that made them bad.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib

import orjson
import pytest
from aiohttp import web

from proxy.observe import OBSERVER
from proxy.policy import Limits
from proxy.server import GuardedSite, request_line_of
from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import RunningProxy, StartProxy, wait_idle

SECRET = "sk-guard-7d1c55e0a9b34f"
FAST_LIMITS = {"header_timeout": "300ms", "body_timeout": "300ms", "idle_timeout": "2s"}
CALLERS = 200


RESET = b"(reset)"


async def read_all(reader: asyncio.StreamReader, timeout: float = 10.0) -> bytes:
    """Everything until the server closes; RESET when it reset the connection
    (a caller still sending when the server closes gets a TCP reset, which
    may discard the 408 before the caller reads it)."""
    async with asyncio.timeout(timeout):
        try:
            return await reader.read()
        except ConnectionResetError:
            return RESET


def status_and_body(data: bytes) -> tuple[int, bytes]:
    """The status and body of a proxy-made answer, checked to be marked as one."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    assert b"x-llm-sidecar: error" in lines[1:], head
    return int(lines[0].split(b" ", 2)[1]), body


async def held(proxy: RunningProxy) -> tuple[int, int]:
    """Connections the server still tracks, and requests inside a handler."""
    server = proxy.runner.server
    assert server is not None
    return len(server.connections), proxy.app[OBSERVER].active


async def until_released(proxy: RunningProxy, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while await held(proxy) != (0, 0):
            await asyncio.sleep(0.01)
    await wait_idle(proxy.runtime)


async def trickle(writer: asyncio.StreamWriter, piece: bytes, stop: asyncio.Event) -> None:
    """Send `piece` every 50 ms until told to stop or the server hangs up."""
    with contextlib.suppress(ConnectionError):
        while not stop.is_set():
            writer.write(piece)
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    await stop.wait()


async def connect(
    proxy: RunningProxy, first: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that sends `first` at once (a silent one is closed at the header timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(first)
    return reader, writer


async def test_callers_trickling_or_stalling_heads_are_closed(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llm_sidecar.server")
    proxy = await start_proxy({"limits": FAST_LIMITS})
    stop = asyncio.Event()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
    conns = [await connect(proxy, head) for _ in range(CALLERS)]
    tricklers = []
    for n, (_, writer) in enumerate(conns):
        if n % 2:  # half trickle a header byte by byte, half stall
            writer.write(b"Authorization: Bearer ")
            tricklers.append(asyncio.create_task(trickle(writer, b"k", stop)))
    try:
        answers = await asyncio.gather(*(read_all(reader) for reader, _ in conns))
    finally:
        stop.set()
        await asyncio.gather(*tricklers)
        for _, writer in conns:
            writer.close()
    for n, data in enumerate(answers):
        if n % 2 and data == RESET:
            continue
        status, body = status_and_body(data)
        assert status == 408
        assert orjson.loads(body)["error"]["code"] == "request_timeout"
    await until_released(proxy)
    lines = [r for r in caplog.records if r.getMessage() == "request head timed out"]
    assert len(lines) == CALLERS
    for line in lines:
        fields = line.__dict__["fields"]
        assert fields == {"method": "POST", "path": "/v1/chat/completions", "status": 408}


async def test_a_silent_connection_is_closed_after_the_header_timeout(
    start_proxy: StartProxy,
) -> None:
    proxy = await start_proxy({"limits": FAST_LIMITS})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        assert await read_all(reader, 5) == b""  # closed, nothing said
    finally:
        writer.close()
    await until_released(proxy)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/files"])
async def test_callers_trickling_bodies_get_408_and_are_closed(
    start_proxy: StartProxy, fake: FakeUpstream, path: str
) -> None:
    # Coalesced (intake reads the body) and relayed (the body streams upstream).
    proxy = await start_proxy({"limits": FAST_LIMITS})
    stop = asyncio.Event()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    conns = [await connect(proxy, head) for _ in range(CALLERS)]
    tricklers = []
    for _, writer in conns:
        tricklers.append(asyncio.create_task(trickle(writer, b"1\r\n \r\n", stop)))
    try:
        answers = await asyncio.gather(*(read_all(reader) for reader, _ in conns))
    finally:
        stop.set()
        await asyncio.gather(*tricklers)
        for _, writer in conns:
            writer.close()
    assert answers.count(RESET) < CALLERS  # most see their 408 before the reset
    for data in answers:
        if data == RESET:
            continue
        status, body = status_and_body(data)
        assert status == 408, data[:200]
        assert b'"code":"request_timeout"' in body
    await until_released(proxy)
    assert fake.total_calls == 0


async def test_a_normal_caller_is_not_hurried(start_proxy: StartProxy, fake: FakeUpstream) -> None:
    # The head clock stops at the head; a keep-alive connection idles freely
    # (up to idle_timeout) between requests.
    proxy = await start_proxy({"limits": FAST_LIMITS})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    body = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    try:
        for _ in range(2):
            writer.write(request)
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
            assert head.startswith(b"HTTP/1.1 200")
            await asyncio.sleep(0.5)  # longer than header_timeout, shorter than idle_timeout
    finally:
        writer.close()


MALFORMED = [
    # a control byte in a credential
    b"GET /v1/models?key=%s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\x01\r\n\r\n",
    # bare LF line endings
    b"GET /v1/models HTTP/1.1\nHost: x\nAuthorization: Bearer %s\n\n",
    # a header value over the line limit
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s" + b"A" * 9000 + b"\r\n\r\n",
    # a request line over the limit, with the credential in the query
    b"GET /v1/models?key=%s" + b"A" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    # a space before the colon, too many headers, a bad Content-Length
    b"GET /v1/models?api-key=%s HTTP/1.1\r\nHost: x\r\nAuthorization : Bearer %s\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
    + b"".join(b"X-%d: 1\r\n" % i for i in range(200))
    + b"\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Api-Key: %s\r\nContent-Length: 1x\r\n\r\n",
    # an unknown HTTP version, a broken chunked body
    b"GET /v1/models?key=%s HTTP/9.9\r\nHost: x\r\n\r\n",
    b"POST /v1/chat/completions?key=%s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\n%s\r\n",
]


@pytest.mark.parametrize("template", MALFORMED)
async def test_malformed_requests_get_json_400_and_log_no_bytes(
    proxy: RunningProxy, fake: FakeUpstream, caplog: pytest.LogCaptureFixture, template: bytes
) -> None:
    caplog.set_level(logging.DEBUG)
    raw = template.replace(b"%s", SECRET.encode())
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(raw)
        data = await read_all(reader)
    finally:
        writer.close()
    status, body = status_and_body(data)
    assert status == 400
    error = orjson.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and SECRET not in error["message"]
    await until_released(proxy)
    assert fake.total_calls == 0
    text = "\n".join(
        f"{r.getMessage()} {r.__dict__.get('fields')} {r.exc_text}" for r in caplog.records
    )
    assert SECRET not in text and "Traceback" not in text
    assert not any(r.exc_info for r in caplog.records)
    lines = [r for r in caplog.records if r.name == "llm_sidecar.server"]
    assert len(lines) == 1 or b"zz" in raw  # the chunked one is the intake's 400
    for line in lines:
        fields = line.__dict__["fields"]
        assert fields["status"] == 400 and fields["reason"]
        if raw.startswith(b"GET /v1/models "):
            assert (fields["method"], fields["path"]) == ("GET", "/v1/models")


async def test_a_handler_bug_is_a_json_500_logged_without_the_query(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A bare app behind the same listener: the proxy's handlers turn their own
    # errors into responses, so a raising handler stands in for a bug.
    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    app = web.Application()
    app.router.add_get("/v1/broken", broken)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = GuardedSite(runner, "127.0.0.1", 0, lambda: Limits())
    await site.start()
    caplog.set_level(logging.INFO)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
        writer.write(f"GET /v1/broken?key={SECRET} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = await read_all(reader)
        writer.close()
    finally:
        await runner.cleanup()
    status, body = status_and_body(data)
    assert status == 500
    assert orjson.loads(body)["error"]["type"] == "server_error"
    [line] = [r for r in caplog.records if r.name == "llm_sidecar.server"]
    assert line.levelno == logging.ERROR and line.exc_info is not None
    assert line.__dict__["fields"] == {"method": "GET", "path": "/v1/broken", "status": 500}
    assert SECRET not in line.getMessage()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/files"])
async def test_a_compressed_body_over_the_limit_is_not_read_to_the_end(
    start_proxy: StartProxy, path: str
) -> None:
    # A gzip stream of zeros, 1 MiB of content per piece (about 1 KB on the
    # wire): reading it to the end to discard it after the 413 would cost the
    # proxy the CPU to decompress all of it (a bomb: 1 GiB in 1 MB took 5 s).
    # Now the connection closes at the limit, long before the caller is done.
    proxy = await start_proxy({"limits": {"max_body_bytes": "1MiB"}})
    packer = zlib.compressobj(6, zlib.DEFLATED, 31)
    zeros = b"\0" * (1 << 20)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    )
    answer = asyncio.create_task(read_all(reader))
    pieces = 0
    with contextlib.suppress(ConnectionError):
        while pieces < 500 and not answer.done():
            piece = packer.compress(zeros) or packer.flush(zlib.Z_SYNC_FLUSH)
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))  # never a 0: that ends it
            await writer.drain()
            pieces += 1
            await asyncio.sleep(0.01)  # pacing only: the server decides when it ends
    data = await answer
    writer.close()
    assert data == RESET or status_and_body(data)[0] == 413
    assert pieces < 100  # it lingered to the end before (500 pieces, then 10 s)
    await until_released(proxy)


def test_the_request_line_is_reduced_to_method_and_path() -> None:
    assert request_line_of(b"GET /v1/models?key=sk-1 HTTP/1.1\r\n") == ("GET", "/v1/models")
    line = b"POST http://user:sk-2@evil.example/v1/chat/completions?x=1 HTTP/1.1"
    assert request_line_of(line) == ("POST", "/v1/chat/completions")
    assert request_line_of(b"\x16\x03\x01 TLS hello") == (None, None)
    long = request_line_of(b"GET /" + b"a" * 9000)[1]
    assert long is not None and len(long) == 256
