"""Converting a finished answer for a reader of the other mode, lazily and once.

A flight goes upstream in its leader's mode; a reader who asked in the other
mode still shares it (DESIGN: "Relay faithfully; convert only at the edge"):

* `Assembly`: a streamed answer's events folded into the non-stream object
  (`proxy.assemble`), for a `stream: false` reader and for the cache's
  completeness check;
* `PlainAnswer`: a non-stream answer re-chunked into the endpoint's own
  stream (`proxy.rechunk`), for a `stream: true` reader, and its own
  completeness check.

Nothing is parsed until something asks, and then only once per answer
however many readers ask: a flight whose readers all share its mode, on a
route without a cache, never parses its answer at all. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from proxy.endpoint import Endpoint
from proxy.rechunk import Rechunked


def parse(data: bytes) -> Any:
    """JSON, or None for what is not JSON: a converter then has nothing to convert."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


class Assembly:
    """A streamed answer as the non-stream object, built on first use."""

    __slots__ = ("_data", "_endpoint", "_result")

    def __init__(self, endpoint: Endpoint, data: Sequence[bytes]) -> None:
        self._endpoint = endpoint
        self._data = data  # every event's data but [DONE], as the upstream sent it
        self._result: tuple[bytes | None, bool] | None = None

    @classmethod
    def built(cls, endpoint: Endpoint, body: bytes | None, whole: bool) -> Assembly:
        """One whose object is already known (a cached answer)."""
        done = cls(endpoint, ())
        done._result = (body, whole)
        return done

    def _build(self) -> tuple[bytes | None, bool]:
        if self._result is None:
            assemble = self._endpoint.assemble
            if assemble is None:
                self._result = (None, True)
            else:
                payloads = [p for p in map(parse, self._data) if isinstance(p, dict)]
                final, whole = assemble(payloads)
                self._result = (None if final is None else orjson.dumps(final), whole)
        return self._result

    def body(self) -> bytes | None:
        """The object the upstream would have returned to a non-stream call."""
        return self._build()[0]

    def whole(self) -> bool:
        """Every choice finished (or the response completed): cacheable."""
        return self._build()[1]


class PlainAnswer:
    """A non-stream answer, and the same answer as the endpoint's stream on first use."""

    __slots__ = ("_endpoint", "_events", "_parsed", "body")

    def __init__(self, endpoint: Endpoint, body: bytes) -> None:
        self._endpoint = endpoint
        self.body = body
        self._parsed: tuple[Any] | None = None
        self._events: tuple[Rechunked | None] | None = None

    def _object(self) -> Any:
        if self._parsed is None:
            self._parsed = (parse(self.body),)
        return self._parsed[0]

    def events(self) -> Rechunked | None:
        """The stream the upstream would have sent; None when there is no stream form."""
        if self._events is None:
            restream = self._endpoint.restream
            self._events = (None if restream is None else restream(self._object()),)
        return self._events[0]

    def whole(self) -> bool:
        """Whole as the endpoint's stream would be (every choice finished): cacheable."""
        return self._endpoint.plain_whole(self._object())
