"""Replies: writing a stream, a cached answer or an error to one caller.

A streaming reader first replays the log from its cursor, then joins the
stream's push set and sleeps until the producer tells it to act (the end,
or its own buffer passing the high-water mark). While nothing arrives it
sends an SSE comment now and then so idle timeouts on the hops between
never cut a long wait for the first token.

The log goes out in pieces of about `write_high_water`, and every wait on
the caller's socket is bounded (`proxy.backpressure`): a caller that stops
reading is dropped alone; the stream and its other readers go on.

A reader of the other mode than the upstream answered in gets the answer
converted at this edge (`proxy.convert`): a non-stream reader of a stream
gets the assembled object; a streaming reader of a plain answer (live or
cached) gets it re-chunked into the endpoint's own stream, all at once when
the whole answer is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_writer import StreamWriter
from multidict import CIMultiDict

from proxy.backpressure import drain_within, write_deadline
from proxy.cache.base import CachedAnswer
from proxy.convert import PlainAnswer
from proxy.errors import ProxyError, UpstreamBroken, UpstreamMalformed
from proxy.headers import ATTEMPTS_HEADER, SERVED_BY, SHOULD_RETRY_HEADER, Served
from proxy.intake import Intake
from proxy.policy import StreamSettings
from proxy.rechunk import Rechunked
from proxy.sse import COMMENT_KEEPALIVE, chunk_frame
from proxy.stream import Head, PushReader, Stream, frame_events
from proxy.trail import trail_of

_KEEPALIVE_FRAME = chunk_frame(COMMENT_KEEPALIVE)

# Fan-out writes frames straight to the transport after `send_headers`, an
# aiohttp internal (pinned in pyproject.toml; tests/test_aiohttp_writer.py).
# Refuse to start rather than corrupt streams on an aiohttp without it.
if not callable(getattr(StreamWriter, "send_headers", None)):
    raise ImportError(
        "llm-sidecar: aiohttp's StreamWriter.send_headers is gone; fan-out needs it."
        " Install the aiohttp series pyproject.toml pins."
    )
# A JSON reply built from a stream (or a cache hit) is not a stream: the
# upstream's framing and its stream-only headers do not describe it.
_DROP_FROM_JSON = (
    "content-type",
    "content-length",
    "transfer-encoding",
    "cache-control",
    "x-accel-buffering",
)
_SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
# Statuses that describe the caller or the request, whatever its mode: a
# plain call would get them too. Any other 4xx to a streamed call may be the
# upstream refusing to stream (`stream: true` or `stream_options`).
_ANY_MODE_REFUSALS = frozenset({401, 403, 404, 429})


@dataclass(frozen=True, slots=True)
class AskPlain:
    """A plain reader of a streamed call the upstream refused in a way a plain
    call might not be: it should ask in its own mode, as it would direct.
    `fallback` is the refusal, for a caller who cannot ask again."""

    fallback: web.Response


Outcome = web.StreamResponse | AskPlain


def error_response(
    error: ProxyError, request_id: str, served: Served | None = None
) -> web.Response:
    headers = error.headers()
    headers["X-Request-Id"] = request_id
    if served is not None:
        headers.setdefault(SERVED_BY, served)  # a proxy-made error already says "error"
    return web.Response(status=error.status, body=error.body(), headers=headers)


def _headers(base: CIMultiDict[str], intake: Intake, served: Served) -> CIMultiDict[str]:
    headers = base.copy()
    headers["X-Request-Id"] = intake.request_id
    headers[SERVED_BY] = served
    return headers


def _json_headers(
    base: CIMultiDict[str], intake: Intake, served: Served, content_type: str = "application/json"
) -> CIMultiDict[str]:
    headers = _headers(base, intake, served)
    for name in _DROP_FROM_JSON:
        headers.popall(name, None)
    headers["Content-Type"] = content_type
    return headers


def restreamed_response(
    status: int, base: CIMultiDict[str], intake: Intake, served: Served, events: Rechunked
) -> web.Response:
    """A plain answer re-chunked for a streaming reader: the whole stream in one body."""
    headers = _json_headers(base, intake, served, _SSE_CONTENT_TYPE)
    headers["Cache-Control"] = "no-cache"
    skip = None if intake.wants_usage else events.usage_event
    body = b"".join(raw for index, raw in enumerate(events.events) if index != skip)
    return web.Response(status=status, body=body, headers=headers)


class SSEOut:
    """One caller's SSE response: its writer, transport and cursor."""

    __slots__ = ("reader", "response", "write_timeout", "writer")

    def __init__(
        self,
        response: web.StreamResponse,
        writer: StreamWriter,
        wants_usage: bool,
        write_timeout: float,
    ):
        self.response = response
        self.writer = writer
        self.reader = PushReader(writer.transport, wants_usage)
        self.write_timeout = write_timeout

    @classmethod
    async def start(
        cls,
        request: web.Request,
        head: Head,
        intake: Intake,
        served: Served,
        settings: StreamSettings,
    ) -> SSEOut:
        headers = _headers(head.headers, intake, served)
        headers.popall("content-length", None)
        headers["Cache-Control"] = "no-cache"
        response = web.StreamResponse(status=head.status, headers=headers)
        response.enable_chunked_encoding()
        writer = await response.prepare(request)
        assert isinstance(writer, StreamWriter)
        transport = writer.transport
        if transport is not None:
            # The connection pauses where fan-out stops pushing to it, so a
            # drain waits exactly until the caller has taken the excess.
            transport.set_write_buffer_limits(high=settings.write_high_water)
        # Our frames go straight to the transport, so the headers must go first.
        writer.send_headers()
        out = cls(response, writer, intake.wants_usage, settings.write_timeout)
        trail = trail_of(request)
        if trail is not None:
            trail.reader, trail.first_byte_at = out.reader, time.perf_counter()
        return out

    def replay(self, stream: Stream) -> bool:
        """Write the log from this reader's cursor, never waiting: True once
        caught up, False when the caller's socket is full and must drain.

        Pieces of about `write_high_water`, so the buffer never holds much
        more than that beyond what the socket took; a late joiner to a small
        backlog still costs one write.
        """
        reader = self.reader
        transport = reader.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away")
        events = stream.events
        high_water = stream.settings.write_high_water
        while reader.cursor < len(events):
            buffered = transport.get_write_buffer_size()
            if buffered > high_water:
                return False
            start = stop = reader.cursor
            end = len(events)
            room = max(high_water - buffered, 1)
            size = 0
            while stop < end and size < room:
                size += len(events[stop].raw)
                stop += 1
            frame = frame_events(events[start:stop], reader.wants_usage)
            reader.cursor = stop
            if frame:
                transport.write(frame)
        return True

    async def catch_up(self, stream: Stream) -> None:
        """Write the log from this reader's cursor to its current end, waiting
        for the caller's socket (at most `write_timeout` each time) when full."""
        while not self.replay(stream):
            await drain_within(self.writer, self.write_timeout)

    async def follow(self, stream: Stream) -> None:
        keepalive = stream.settings.keepalive_interval
        loop = asyncio.get_running_loop()
        reader = self.reader
        while True:
            await self.catch_up(stream)
            if stream.state == "done":
                return
            reader.wake = loop.create_future()
            if not stream.subscribe(reader):
                continue
            try:
                while not reader.wake.done():
                    before = reader.cursor
                    await asyncio.wait((reader.wake,), timeout=keepalive)
                    transport = reader.transport
                    if transport is None or transport.is_closing():
                        raise ConnectionResetError("the client went away")
                    if not reader.wake.done() and reader.cursor == before:
                        transport.write(_KEEPALIVE_FRAME)
            finally:
                stream.unsubscribe(reader)

    async def keep_alive_until(self, done: asyncio.Future[Any], interval: float) -> None:
        """A keepalive comment every `interval` until `done` (shared: never cancelled here)."""
        while not done.done():
            await asyncio.wait((done,), timeout=interval)
            if not done.done():
                self._send(_KEEPALIVE_FRAME)

    def write(self, payload: bytes) -> None:
        """`payload` (SSE events) as one chunk."""
        self._send(chunk_frame(payload))

    def _send(self, frame: bytes) -> None:
        transport = self.reader.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away")
        transport.write(frame)

    async def end(self, error: ProxyError | None = None) -> None:
        transport = self.reader.transport
        if error is not None and transport is not None and not transport.is_closing():
            transport.write(chunk_frame(error.sse_event()))
        async with write_deadline(transport, self.write_timeout):
            await self.response.write_eof()


class StreamReply:
    """One caller answered from a stream it leads or follows.

    `run` writes the whole answer and maps what can go wrong (a proxy
    error, the caller leaving) onto the response; a stage passes `setup`
    to do its early part (a follower's attach and replay) under its slot.
    """

    def __init__(
        self, request: web.Request, intake: Intake, stream: Stream, served: Served
    ) -> None:
        self._request = request
        self._intake = intake
        self._stream = stream
        self._served = served
        self._out: SSEOut | None = None
        trail = trail_of(request)
        if trail is not None:
            trail.stream, trail.served = stream, served

    async def replay_backlog(self) -> None:
        """When the stream is already flowing, start this caller's SSE and
        hand its socket what it takes of the log at once, never waiting."""
        stream, intake = self._stream, self._intake
        if intake.wants_stream and stream.head.done() and stream.head.exception() is None:
            head = stream.head.result()
            if head.is_sse and head.status < 300:
                self._out = await SSEOut.start(
                    self._request, head, intake, self._served, stream.settings
                )
                # What the socket takes now; `run` writes the rest with no
                # slot held, so a caller that stops reading holds none.
                self._out.replay(stream)

    async def run(self, setup: Callable[[StreamReply], Awaitable[None]] | None = None) -> Outcome:
        try:
            if setup is not None:
                await setup(self)
            return await self._write()
        except ProxyError as exc:
            if self._out is None:
                response = error_response(exc, self._intake.request_id, self._served)
                attempts = self._stream.attempts
                if attempts:  # the tries that all failed, as the head would have said
                    response.headers[ATTEMPTS_HEADER] = str(len(attempts))
                if self._stream.retries_spent:
                    response.headers[SHOULD_RETRY_HEADER] = "false"
                return response
            with contextlib.suppress(ConnectionResetError):
                await self._out.end(exc)
            return self._out.response
        except ConnectionResetError:
            # The caller went away mid-stream; only this reader leaves. Nobody
            # reads what we return; 499 is what access logs call it.
            return self._out.response if self._out is not None else web.Response(status=499)

    async def _write(self) -> Outcome:
        stream, intake, served = self._stream, self._intake, self._served
        if intake.wants_stream and stream.plain_call and intake.endpoint.restream is not None:
            # Nothing of a plain call arrives before the whole answer. Past one
            # keepalive interval, start this caller's stream anyway, so idle
            # timeouts on the hops between never cut it while it waits.
            await asyncio.wait((stream.head,), timeout=stream.settings.keepalive_interval)
            if not stream.head.done():
                return await self._restream_when_whole()
        # shield: the head and the end are shared by every reader, and a
        # cancelled await (this caller leaving) would cancel them for all.
        head = await asyncio.shield(stream.head)
        if head.status >= 300 or not head.is_sse:
            if head.status < 300:
                await asyncio.shield(stream.finished)
                if stream.error is not None:
                    raise stream.error
                if intake.wants_stream and stream.plain_call and stream.plain is not None:
                    # A streaming reader of a plain call; a streamed call the
                    # upstream answered in JSON reaches its readers as it is.
                    events = stream.plain.events()
                    if events is not None:
                        return restreamed_response(
                            head.status, head.headers, intake, served, events
                        )
                    if intake.endpoint.restream is not None:
                        raise _no_stream_form()
            response = web.Response(
                status=head.status, body=head.body, headers=_headers(head.headers, intake, served)
            )
            if (
                not intake.wants_stream
                and not stream.plain_call
                and 400 <= head.status < 500
                and head.status not in _ANY_MODE_REFUSALS
            ):
                # Nothing was sent to this reader yet (a plain reader gets the
                # whole answer at once), so it may still ask on its own.
                return AskPlain(response)
            return response
        if intake.wants_stream:
            if self._out is None:
                self._out = await SSEOut.start(self._request, head, intake, served, stream.settings)
            await self._out.follow(stream)
            await self._out.end()
            return self._out.response
        await asyncio.shield(stream.finished)
        body = None if stream.assembly is None else stream.assembly.body()
        if body is None:
            if stream.error is None and stream.assembly is not None and stream.assembly.malformed():
                raise UpstreamMalformed(
                    "llm-sidecar: an event of the upstream's stream is not JSON"
                )
            raise stream.error or UpstreamBroken("llm-sidecar: the upstream answer was incomplete")
        return web.Response(
            status=head.status, body=body, headers=_json_headers(head.headers, intake, served)
        )

    async def _restream_when_whole(self) -> web.StreamResponse:
        """A streaming caller of a plain call, its stream started before the answer came.

        Keepalives until the whole answer is there, then all of its events
        at once. Its status is committed (200), so an error the upstream
        answered meanwhile reaches it as an error event, as a mid-stream
        error would: the upstream's own error object when it sent one.
        """
        stream, intake = self._stream, self._intake
        base: CIMultiDict[str] = CIMultiDict({"Content-Type": _SSE_CONTENT_TYPE})
        out = self._out = await SSEOut.start(
            self._request, Head(200, base, is_sse=True), intake, self._served, stream.settings
        )
        interval = stream.settings.keepalive_interval
        await out.keep_alive_until(stream.head, interval)
        error = stream.head.exception()
        if error is not None:
            raise error
        head = stream.head.result()
        if head.is_sse and head.status < 300:  # the upstream streamed all the same
            await out.follow(stream)
            await out.end()
            return out.response
        trail = trail_of(self._request)
        if trail is not None:
            trail.reader = None  # what it is sent is not the stream's log
        await out.keep_alive_until(stream.finished, interval)
        if head.status >= 300:
            payload = _upstream_error_event(head)
        elif stream.error is not None:
            raise stream.error
        else:
            events = None if stream.plain is None else stream.plain.events()
            if events is None:
                raise _no_stream_form()
            skip = None if intake.wants_usage else events.usage_event
            payload = b"".join(raw for index, raw in enumerate(events.events) if index != skip)
        out.write(payload)
        if trail is not None:
            trail.first_byte_at, trail.bytes_out = time.perf_counter(), len(payload)
        await out.end()
        return out.response


def _no_stream_form() -> UpstreamMalformed:
    # A 200 that is not the endpoint's answer: a streaming reader of the
    # plain call it answered cannot be given its stream.
    return UpstreamMalformed("llm-sidecar: the upstream's answer is not the endpoint's JSON")


def _upstream_error_event(head: Head) -> bytes:
    """An upstream's error answer as an SSE event the SDK raises on."""
    body = head.body or b""
    if body.startswith(b"{"):
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            return b"data: " + orjson.dumps({"error": parsed["error"]}) + b"\n\n"
    return UpstreamBroken(f"llm-sidecar: the upstream answered {head.status}").sse_event()


async def serve_answer(
    request: web.Request, intake: Intake, answer: CachedAnswer
) -> web.StreamResponse:
    """A cache hit: the stored events as SSE, or the stored JSON, each
    converted for a reader of the other mode."""
    trail = trail_of(request)
    if trail is not None:
        trail.served = Served.HIT
    base: CIMultiDict[str] = CIMultiDict({"Content-Type": answer.content_type})
    base["Age"] = str(max(0, int(time.time() - answer.stored_at)))
    if not (intake.wants_stream and answer.is_sse):
        assert answer.body is not None
        if intake.wants_stream:
            events = PlainAnswer(intake.endpoint, answer.body).events()
            if events is not None:
                return restreamed_response(answer.status, base, intake, Served.HIT, events)
        return web.Response(
            status=answer.status, body=answer.body, headers=_json_headers(base, intake, Served.HIT)
        )
    headers = _headers(base, intake, Served.HIT)
    headers["Cache-Control"] = "no-cache"
    skip = None if intake.wants_usage else answer.usage_event
    body = b"".join(raw for index, raw in enumerate(answer.events) if index != skip)
    return web.Response(status=answer.status, body=body, headers=headers)
