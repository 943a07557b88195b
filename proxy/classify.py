"""Classifying a streamed upstream answer, event by event: sans-IO.

`EventClassifier.feed(event)` turns one decoded SSE event into the
`LogEvent` the stream logs (parsed once, usage chunk marked);
`finish()` says what the whole stream was: complete (cacheable, with the
assembled non-stream object), whole but not complete, an in-band upstream
error, or cut before its end marker. The endpoint decides the end marker and
the assembler. No I/O, no aiohttp: tested with the input split at every byte.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.endpoint import Endpoint
from proxy.sse import DONE, SSEEvent
from proxy.stream import LogEvent


class Ending(enum.Enum):
    COMPLETE = "complete"  # whole and finished: cacheable
    INCOMPLETE = "incomplete"  # whole, but a choice or the response did not finish
    UPSTREAM_ERROR = "upstream_error"  # an event carried an `error` key
    TRUNCATED = "truncated"  # ended before its end marker


@dataclass(frozen=True, slots=True)
class Outcome:
    ending: Ending
    assembled: bytes | None  # the non-stream object, when the endpoint builds one


class EventClassifier:
    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._payloads: list[dict[str, Any]] = []
        self._ended = False  # the endpoint's end marker was seen
        self._upstream_error = False

    def feed(self, event: SSEEvent) -> LogEvent:
        parsed: Any = None
        done = event.data == DONE
        if not done:
            try:
                parsed = orjson.loads(event.data)
            except orjson.JSONDecodeError:
                parsed = None
        payload = parsed if isinstance(parsed, dict) else None
        if self._endpoint.end.ends(done, payload):
            self._ended = True
        usage_only = False
        if payload is not None:
            self._payloads.append(payload)
            if "error" in payload:
                self._upstream_error = True
            usage_only = payload.get("choices") == [] and payload.get("usage") is not None
        return LogEvent(event.raw, parsed, usage_only)

    def finish(self) -> Outcome:
        if self._upstream_error:
            return Outcome(Ending.UPSTREAM_ERROR, None)
        if not self._ended:
            return Outcome(Ending.TRUNCATED, None)
        assemble = self._endpoint.assemble
        if assemble is None:
            return Outcome(Ending.COMPLETE, None)
        final, whole = assemble(self._payloads)
        assembled = None if final is None else orjson.dumps(final)
        return Outcome(Ending.COMPLETE if whole else Ending.INCOMPLETE, assembled)
