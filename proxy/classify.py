"""Classifying a streamed upstream answer, event by event: sans-IO.

`EventClassifier.feed(event)` turns one decoded SSE event into the
`LogEvent` the stream logs, with the usage chunk marked; `finish(truncated)`
says what the whole stream was: ended whole, an in-band upstream error (with
the upstream's own error object), or cut, with the `Assembly` that folds it
into the non-stream object when (and only if) something asks. A chat or
completion stream that ends cleanly without `[DONE]` after every choice got
its finish reason is whole: several servers close the connection there.

Events are not parsed to be logged. A byte check picks the few that may
matter (`[DONE]`, an `event:` line naming the terminal Responses event, the
text `"error"`, a `usage` object) and only those are parsed to confirm. The
endpoint decides the end marker and the assembler. No I/O, no aiohttp:
tested with the input split at every byte.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

from proxy.assemble import RESPONSE_TERMINAL, choices_finished, is_usage_chunk
from proxy.convert import Assembly, parse
from proxy.endpoint import EndMarker, Endpoint
from proxy.sse import DONE, SSEEvent
from proxy.stream import LogEvent

# What a usage chunk holds (a `usage` object) and most chunks do not (they
# have none, or `"usage": null`); its `choices` vary by dialect.
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
# A Responses `error` event's own fields that make its error object: not its
# `type` (which is "error") or its `sequence_number`.
_ERROR_FIELDS = ("message", "code", "param")


class Ending(enum.Enum):
    COMPLETE = "complete"  # ended whole (whether cacheable: `Assembly.whole`)
    UPSTREAM_ERROR = "upstream_error"  # an in-band error: `error`, or a `type: "error"` event
    TRUNCATED = "truncated"  # ended before its end


@dataclass(frozen=True, slots=True)
class Outcome:
    ending: Ending
    assembly: Assembly | None  # the non-stream object on demand, for a complete stream
    error: dict[str, Any] | None = None  # UPSTREAM_ERROR: the upstream's error object


class EventClassifier:
    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._terminal = endpoint.end is EndMarker.TERMINAL
        self._data: list[bytes] = []  # for the assembly, parsed only if it is asked for
        self._ended = False  # the endpoint's end marker was seen
        self._upstream_error: dict[str, Any] | None = None  # the first one

    def feed(self, event: SSEEvent) -> LogEvent:
        data = event.data
        if data == DONE:
            if not self._terminal:
                self._ended = True
            return LogEvent(event.raw)
        self._data.append(data)
        payload: Any = None
        if self._terminal:
            kind: Any = event.event
            if kind is None:  # a dialect without `event:` lines: the type is in the data
                payload = parse(data)
                kind = payload.get("type") if isinstance(payload, dict) else None
            if kind in RESPONSE_TERMINAL:
                self._ended = True
        if b'"error"' in data and self._upstream_error is None:
            if payload is None:
                payload = parse(data)
            if isinstance(payload, dict):
                self._upstream_error = _in_band_error(payload)
        usage_only = False
        if self._endpoint.adds_usage and _USAGE_OBJECT.search(data) is not None:
            if payload is None:
                payload = parse(data)
            usage_only = isinstance(payload, dict) and is_usage_chunk(payload)
        return LogEvent(event.raw, usage_only)

    def finish(self, truncated: bool = False) -> Outcome:
        """What the stream was, once its input ended; `truncated`: it stopped mid-event."""
        if self._upstream_error is not None:
            return Outcome(Ending.UPSTREAM_ERROR, None, self._upstream_error)
        if not self._ended and (truncated or self._terminal or not self._all_finished()):
            return Outcome(Ending.TRUNCATED, None)
        return Outcome(Ending.COMPLETE, Assembly(self._endpoint, self._data))

    def _all_finished(self) -> bool:
        """Every choice got its finish reason: whole without `[DONE]` (parsed only then)."""
        payloads = [p for p in map(parse, self._data) if isinstance(p, dict)]
        return choices_finished(payloads)


def _in_band_error(payload: dict[str, Any]) -> dict[str, Any] | None:
    """The upstream's error object when `payload` is an in-band error, as the SDK sees one.

    A chat or completion chunk carries a truthy `error` (often with
    `finish_reason: "error"`); a Responses stream sends a `type: "error"`
    event whose code and message are its own fields.
    """
    error = payload.get("error")
    if error:
        return error if isinstance(error, dict) else {"message": str(error)}
    if payload.get("type") == "error":
        return {name: value for name, value in payload.items() if name in _ERROR_FIELDS}
    return None
