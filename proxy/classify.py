"""Classifying a streamed upstream answer, event by event: sans-IO.

`EventClassifier.feed(event)` turns one decoded SSE event into the
`LogEvent` the stream logs, with the usage chunk marked; `finish()` says
what the whole stream was: ended at its end marker, an in-band upstream
error, or cut before its end marker, with the `Assembly` that folds it into
the non-stream object when (and only if) something asks.

Events are not parsed to be logged. A byte check picks the few that may
matter (`[DONE]`, an `event:` line naming the terminal Responses event, the
text `"error"`, an empty `choices` list) and only those are parsed to
confirm. The endpoint decides the end marker and the assembler. No I/O, no
aiohttp: tested with the input split at every byte.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

from proxy.assemble import RESPONSE_TERMINAL
from proxy.convert import Assembly, parse
from proxy.endpoint import EndMarker, Endpoint
from proxy.sse import DONE, SSEEvent
from proxy.stream import LogEvent

# What an include_usage chunk holds (`choices: []`) and most chunks do not.
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')


class Ending(enum.Enum):
    COMPLETE = "complete"  # its end marker arrived: whole (whether cacheable: `Assembly.whole`)
    UPSTREAM_ERROR = "upstream_error"  # an event carried an `error` key
    TRUNCATED = "truncated"  # ended before its end marker


@dataclass(frozen=True, slots=True)
class Outcome:
    ending: Ending
    assembly: Assembly | None  # the non-stream object on demand, for a complete stream


class EventClassifier:
    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._terminal = endpoint.end is EndMarker.TERMINAL
        self._data: list[bytes] = []  # for the assembly, parsed only if it is asked for
        self._ended = False  # the endpoint's end marker was seen
        self._upstream_error = False

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
        if b'"error"' in data:
            if payload is None:
                payload = parse(data)
            if isinstance(payload, dict) and "error" in payload:
                self._upstream_error = True
        usage_only = False
        if self._endpoint.adds_usage and _EMPTY_CHOICES.search(data) is not None:
            if payload is None:
                payload = parse(data)
            usage_only = (
                isinstance(payload, dict)
                and payload.get("choices") == []
                and payload.get("usage") is not None
            )
        return LogEvent(event.raw, usage_only)

    def finish(self) -> Outcome:
        if self._upstream_error:
            return Outcome(Ending.UPSTREAM_ERROR, None)
        if not self._ended:
            return Outcome(Ending.TRUNCATED, None)
        return Outcome(Ending.COMPLETE, Assembly(self._endpoint, self._data))
