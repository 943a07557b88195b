"""The HTTP server edge: aiohttp's connection protocol with the proxy's guards.

Every listener (API and admin) accepts connections through `GuardedSite`,
whose protocol is `GuardedHandler`:

* a request head must be complete within `limits.header_timeout` of its
  first byte (or of the connection opening): a caller that trickles its
  headers, or connects and says nothing, gets a 408 and is closed;
* an idle keep-alive connection is closed after `limits.idle_timeout`;
* every answer made here carries `x-llm-sidecar: error`, as the proxy's
  other own answers do;
* a malformed request (a control byte in a header, a bare LF, a line or a
  header block over the limit) gets an OpenAI-style 400 and one log line
  naming the method, the path and the parser's error class. aiohttp's own
  text for these errors quotes the raw bytes, credentials included, so it
  reaches neither the log nor the caller;
* a handler that failed answers an OpenAI-style 500, logged with the
  method and path only (never the query string, never a header);
* a malformed body that aiohttp finds while discarding the rest of it
  (after the response) is logged the same way, without its traceback;
* a request whose body timed out is not lingered on: the connection closes
  right after its 408;
* an error aiohttp raises itself (a request target the router cannot match,
  such as `CONNECT host:443` or `OPTIONS *`; an `Expect` other than
  `100-continue`) is an OpenAI-style error too, and never echoes the request.

aiohttp offers no hook for any of this, so `GuardedHandler` subclasses its
`RequestHandler` and reads a few of its fields (`_request_count`,
`_waiter`, `_messages`, `_lingering_time`); the tests in
tests/test_server_guard.py pin each behaviour against the installed aiohttp.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from proxy.errors import error_body
from proxy.headers import SERVED_BY
from proxy.logs import log_path
from proxy.policy import Limits

log = logging.getLogger("llm_sidecar.server")

# Method and path of a request line (origin or absolute form), never the
# query nor an absolute form's authority (it may hold user:password): that
# is all a log line may say about a request it could not parse. `log_path`
# strips what the path itself may carry (a `//user:pass@` form, `;params`).
_REQUEST_LINE = re.compile(
    rb"([A-Z]{1,20}) (?:[a-zA-Z][a-zA-Z0-9+.-]*://[^/?# ]*)?(/[^?# \r\n]*)([?# \r\n])?"
)
_PATH_CHARS = 256
# Like every answer the proxy makes itself, marked `x-llm-sidecar: error`.
_TIMEOUT_408 = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
    b"x-llm-sidecar: error\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
)


def _timeout_response() -> bytes:
    body = error_body(
        "llm-sidecar: the request head did not arrive in time",
        "invalid_request_error",
        "request_timeout",
    )
    return _TIMEOUT_408 % (len(body), body)


_HEAD_TIMEOUT_RESPONSE = _timeout_response()


def request_line_of(data: bytes) -> tuple[str | None, str | None]:
    """The method and path at the start of `data`, without the query; None for either
    when the bytes do not start with a request line."""
    match = _REQUEST_LINE.match(data)
    if match is None:
        return None, None
    # Stripped whole, then cut: a cut first could keep a secret and lose its `@`.
    # Not ended by a space, `?` or `#`: these bytes end inside the target.
    path = log_path(match.group(2).decode("ascii", "backslashreplace"), match.group(3) is None)
    return match.group(1).decode("ascii"), path[:_PATH_CHARS]


class GuardedHandler(RequestHandler):
    """One connection: aiohttp's protocol plus the head timeout and clean errors."""

    __slots__ = ("_head_seen", "_head_start", "_head_timer", "_header_timeout", "dropped")

    def __init__(self, manager: web.Server, *, loop: asyncio.AbstractEventLoop, limits: Limits):
        # No aiohttp access log: the observer writes ours (aiohttp itself passes None).
        super().__init__(
            manager,
            loop=loop,
            keepalive_timeout=limits.idle_timeout,
            access_log=None,  # type: ignore[arg-type]
        )
        self._header_timeout = limits.header_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        # Whether bytes of the head being waited for have arrived, and the
        # first of them (for the method and path of a log line if it fails).
        self._head_seen = False
        self._head_start = b""
        # Why the proxy cut this connection mid-answer (`write_timeout`), if it
        # did: the request's access line and metrics read it when it ends.
        self.dropped: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # A connection that never sends a head is held no longer than one that trickles it.
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        count = self._request_count
        # aiohttp's loop has a waiter out exactly while it waits for the next
        # head, so these are the first bytes of one. (Bytes that arrive while
        # it is not waiting, between two requests, are left to idle_timeout,
        # which also bounds a partial head.)
        if not self._head_seen and (self._waiter is not None or count == 0):
            self._head_seen = True
            self._head_start = data  # a reference, parsed only if the head fails
        super().data_received(data)
        if self._request_count != count:
            # A head arrived (or failed to parse): its clock stops. The next
            # one's starts with its first byte; until then idle_timeout rules.
            self._disarm_head_timer()
            self._head_seen = False
        elif self._head_seen:
            # Part of a head: the clock runs from now (a whole head in one
            # read, the usual case, costs no timer at all).
            self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def stop_lingering(self) -> None:
        """Close right after the current response instead of reading the rest of
        a body the caller stopped sending."""
        self._lingering_time = 0.0

    def _arm_head_timer(self) -> None:
        if self._head_timer is None and self._header_timeout > 0:
            self._head_timer = self._loop.call_later(self._header_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._waiter is None or self._messages or self.transport is None:
            # Not waiting for a head after all (a request is being served).
            self._head_seen = False
            return
        if self._head_seen:
            # Nothing was sent to this connection since its last response:
            # a 408 is safe to write straight to the transport.
            self.transport.write(_HEAD_TIMEOUT_RESPONSE)
            if log.isEnabledFor(logging.INFO):
                method, path = request_line_of(self._head_start)
                fields = {"method": method, "path": path, "status": 408}
                log.info("request head timed out", extra={"fields": fields})
        self.force_close()

    async def _handle_request(
        self,
        request: web.BaseRequest,
        start_time: float | None,
        request_handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
    ) -> tuple[web.StreamResponse, bool]:
        async def guarded(request: web.BaseRequest) -> web.StreamResponse:
            try:
                return await request_handler(request)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                return _own_error(exc.status)

        return await super()._handle_request(request, start_time, guarded)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's own error lines. A caller's malformed body found while
        aiohttp discarded it (after the response) is the caller's fault: one
        info line with method and path, no traceback (its text quotes the
        bytes). Anything else keeps its traceback."""
        exc = kw.get("exc_info")
        if isinstance(exc, HttpProcessingError | web.RequestPayloadError):
            if log.isEnabledFor(logging.INFO):
                method, path = request_line_of(self._head_start)
                cause = exc.__cause__ if exc.__cause__ is not None else exc
                fields = {"method": method, "path": path, "reason": type(cause).__name__}
                log.info("malformed request body", extra={"fields": fields})
            return
        super().log_exception(*args, **kw)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, HttpProcessingError):
            reason = type(exc).__name__
            status = status if 400 <= status < 500 else 400
            # Not HTTP at all (TLS to a plain port, a scanner) is noise: debug.
            level = logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.INFO
            if log.isEnabledFor(level):
                method, path = request_line_of(self._head_start)
                fields = {"method": method, "path": path, "status": status, "reason": reason}
                log.log(level, "malformed request", extra={"fields": fields})
            text = f"llm-sidecar: malformed HTTP request ({reason})"
            kind, code = "invalid_request_error", "malformed_request"
        else:
            fields = {"method": request.method, "path": log_path(request.path), "status": status}
            if exc is not None:
                log.error("request handler failed", exc_info=exc, extra={"fields": fields})
            text = f"llm-sidecar: {HTTPStatus(status).phrase.lower()}"
            kind, code = "server_error", None
        if request.writer.output_size > 0:
            # Part of a response went out already; only a cut connection tells the truth.
            raise ConnectionError("response already started")
        response = web.Response(
            status=status,
            body=error_body(text, kind, code),
            headers={"Content-Type": "application/json", SERVED_BY: "error"},
        )
        response.force_close()
        return response


def _own_error(status: int) -> web.Response:
    """aiohttp's own error, as the proxy's: its text may quote the request
    (`Unknown Expect: <value>`), so only the status phrase is kept."""
    if status == 417:
        text, code = "llm-sidecar: only Expect: 100-continue is supported", "expectation_failed"
    elif status == 404:
        text, code = "llm-sidecar: nothing is served at this request target", "not_found"
    else:
        text, code = f"llm-sidecar: {HTTPStatus(status).phrase.lower()}", None
    return web.Response(
        status=status,
        body=error_body(text, "invalid_request_error", code),
        headers={"Content-Type": "application/json", SERVED_BY: "error"},
    )


def note_dropped(transport: asyncio.BaseTransport, reason: str) -> None:
    """The proxy cut this caller's connection (a stalled reader): its request
    is logged 499 and counted in `readers_dropped`, whatever it returns."""
    protocol = transport.get_protocol()
    if isinstance(protocol, GuardedHandler):
        protocol.dropped = reason


def dropped_reason(request: web.BaseRequest) -> str | None:
    """Why the proxy cut `request`'s connection (see `note_dropped`), or None."""
    protocol = request.protocol
    return protocol.dropped if isinstance(protocol, GuardedHandler) else None


def stop_lingering(request: web.BaseRequest) -> None:
    """After this request's response, close its connection at once (see GuardedHandler)."""
    protocol = request.protocol
    if isinstance(protocol, GuardedHandler):
        protocol.stop_lingering()


class GuardedSite(web.BaseSite):
    """A TCP listener whose connections are `GuardedHandler`s.

    `limits` is read for each new connection, so a reload applies to the
    connections opened after it.
    """

    __slots__ = ("_host", "_limits", "_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        limits: Callable[[], Limits],
        *,
        backlog: int = 1024,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._limits = limits

    @property
    def port(self) -> int:
        """The bound port (the requested one before `start`)."""
        server = self._server
        if isinstance(server, asyncio.Server) and server.sockets:
            port: int = server.sockets[0].getsockname()[1]
            return port
        return self._port

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        limits = self._limits

        def connection() -> GuardedHandler:
            return GuardedHandler(server, loop=loop, limits=limits())

        self._server = await loop.create_server(
            connection, self._host, self._port, backlog=self._backlog, reuse_address=True
        )
