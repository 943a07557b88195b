"""The trail: what one API request leaves behind for its log line and metrics.

The observer (`proxy.observe`) creates one `Trail` per request and puts it on
the request under `TRAIL`; the pipeline, the relay and the reply note on it
what only they know (the route, the stream it read, the upstream status).
The observer reads it once, when the request ends. Plain slots, no methods
on the hot path beyond attribute stores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from proxy.headers import Served

if TYPE_CHECKING:
    from proxy.stream import PushReader, Stream


class Trail:
    # Written by the request's own task only (pipeline, relay, reply), read
    # by the observer in the same task after the handler returns.
    __slots__ = (
        "bytes_out",
        "first_byte_at",
        "reader",
        "request_id",
        "route",
        "served",
        "stream",
        "upstream",
    )

    def __init__(self) -> None:
        self.request_id: str | None = None
        self.route: int | None = None  # index of the matched policy route
        self.served: Served | None = None  # set by every path that serves; None: an error first
        self.upstream: int | None = None  # the upstream's status, when one answered
        self.stream: Stream | None = None  # the stream this caller read, if any
        self.reader: PushReader | None = None  # its cursor, for the bytes it was sent
        self.first_byte_at: float | None = None  # perf_counter when headers went out
        self.bytes_out: int | None = None  # body bytes, when the writer knows them


TRAIL = web.RequestKey("llm_sidecar_trail", Trail)


def trail_of(request: web.Request) -> Trail | None:
    """The request's trail; None when the app runs without an observer."""
    return request.get(TRAIL)
