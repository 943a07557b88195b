"""The observer: wraps the API handler to count, time and log every request.

One `Observer` per app. For each request it puts a `Trail` on the request,
counts it in flight (shutdown waits on that count), and when the handler
ends turns what the trail and the response say into metrics and, when the
access log is on, one JSON line. The per-request work is a few attribute
reads, two clock reads and pre-bound metric updates; the log line is only
built when it will be written.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.logs import access_log, log_path
from proxy.runtime import Runtime
from proxy.server import dropped_reason
from proxy.trail import TRAIL, Trail

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# What a request that ended without a response is counted as: the caller
# left (the handler was cancelled, or its connection broke) or was dropped
# for not reading, or a bug.
CLIENT_GONE = 499
INTERNAL = 500


class Observer:
    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self._metrics = rt.metrics
        # Requests inside the wrapped handler. Touched only on the loop thread.
        self.active = 0
        self._idle: list[asyncio.Future[None]] = []

    def wrap(self, handler: Handler) -> Handler:
        async def observed(request: web.Request) -> web.StreamResponse:
            start = time.perf_counter()
            trail = Trail()
            request[TRAIL] = trail
            self.active += 1
            response: web.StreamResponse | None = None
            status = INTERNAL
            try:
                response = await handler(request)
                status = response.status
                return response
            except (asyncio.CancelledError, ConnectionError):
                status = CLIENT_GONE
                raise
            finally:
                self.active -= 1
                if self._idle and not self.active:
                    self._wake_idle()
                self._finish(request, trail, response, status, start)

        return observed

    async def wait_idle(self) -> None:
        """Return once no request is inside the handler."""
        loop = asyncio.get_running_loop()
        while self.active:
            waiter = loop.create_future()
            self._idle.append(waiter)
            try:
                await waiter
            finally:
                self._idle.remove(waiter)

    def _wake_idle(self) -> None:
        for waiter in self._idle:
            if not waiter.done():
                waiter.set_result(None)

    def _finish(
        self,
        request: web.Request,
        trail: Trail,
        response: web.StreamResponse | None,
        status: int,
        start: float,
    ) -> None:
        end = time.perf_counter()
        dropped = dropped_reason(request)
        if dropped is not None:
            # Cut for not reading: the caller did not get the answer, whatever it began as.
            status = CLIENT_GONE
            self._metrics.reader_dropped(dropped)
        served = trail.served
        stream = trail.stream
        upstream = trail.upstream
        bytes_out = trail.bytes_out
        first_byte = trail.first_byte_at
        if stream is not None:
            head = stream.head
            if upstream is None and head.done() and not head.cancelled() and not head.exception():
                upstream = head.result().status
            reader = trail.reader
            if reader is not None:
                first_event = stream.first_event_at
                first_byte = None if first_event is None else max(first_event, first_byte or 0.0)
                events = stream.events
                cursor = reader.cursor
                if cursor >= len(events):
                    bytes_out = stream.size
                else:
                    bytes_out = sum(len(event.raw) for event in events[:cursor])
        if bytes_out is None:
            bytes_out = _body_length(response)
        if first_byte is None and trail.reader is None and response is not None:
            first_byte = end  # a whole body: its first byte leaves with the rest
        content = request.content
        bytes_in = content.total_bytes if content is not None else 0
        ttfb = None if first_byte is None else first_byte - start
        self._metrics.request_done(served or "none", status, end - start, ttfb, bytes_in, bytes_out)
        if access_log.isEnabledFor(logging.INFO) and self._rt.snapshot.loaded.policy.log.access:
            fields = {
                "request_id": trail.request_id,
                "method": request.method,
                "path": log_path(request.path),
                "route": trail.route,
                "served": served or "none",
                "status": status,
                "upstream_status": upstream,
                "duration_ms": round((end - start) * 1000, 3),
                "ttfb_ms": None if ttfb is None else round(ttfb * 1000, 3),
                "bytes_in": bytes_in,
                "bytes_out": bytes_out,
                "attempts": None if stream is None else [a.log_fields() for a in stream.attempts],
            }
            access_log.info("request", extra={"fields": fields})


def _body_length(response: web.StreamResponse | None) -> int:
    if isinstance(response, web.Response):
        return response.content_length or 0
    return 0


OBSERVER = web.AppKey("observer", Observer)
