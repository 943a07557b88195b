"""Classifying a streamed upstream answer, event by event: sans-IO.

`EventClassifier.feed(event)` turns one decoded SSE event into the
`LogEvent` the stream logs (parsed once, usage chunk marked);
`finish(truncated)` says what the whole stream was: complete (cacheable, with
the assembled non-stream object), whole but not complete, an in-band upstream
error (with the upstream's own error object), malformed (an event that is
not a JSON object), or cut before its end. The endpoint decides the end
marker and the assembler. A chat or completion stream that ends cleanly
without `[DONE]` after every choice got its finish reason is whole: several
servers close the connection there. No I/O, no aiohttp: tested with the
input split at every byte.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.assemble import choices_finished, is_usage_chunk
from proxy.endpoint import EndMarker, Endpoint
from proxy.sse import DONE, SSEEvent
from proxy.stream import LogEvent

# A Responses `error` event's own fields that make its error object: not its
# `type` (which is "error") or its `sequence_number`.
_ERROR_FIELDS = ("message", "code", "param")


class Ending(enum.Enum):
    COMPLETE = "complete"  # whole and finished: cacheable
    INCOMPLETE = "incomplete"  # whole, but a choice or the response did not finish
    UPSTREAM_ERROR = "upstream_error"  # an in-band error: `error`, or a `type: "error"` event
    MALFORMED = "malformed"  # whole, but an event is not a JSON object: relayed, never converted
    TRUNCATED = "truncated"  # ended before its end


@dataclass(frozen=True, slots=True)
class Outcome:
    ending: Ending
    assembled: bytes | None  # the non-stream object, when the endpoint builds one
    error: dict[str, Any] | None = None  # UPSTREAM_ERROR: the upstream's error object


class EventClassifier:
    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._payloads: list[dict[str, Any]] = []
        self._ended = False  # the endpoint's end marker was seen
        self._upstream_error: dict[str, Any] | None = None  # the first one
        self._malformed = False

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
            if self._upstream_error is None:
                self._upstream_error = _in_band_error(payload)
            usage_only = self._endpoint.adds_usage and is_usage_chunk(payload)
        elif not done:
            self._malformed = True
        return LogEvent(event.raw, parsed, usage_only)

    def finish(self, truncated: bool = False) -> Outcome:
        """What the stream was, once its input ended; `truncated`: it stopped mid-event."""
        if self._upstream_error is not None:
            return Outcome(Ending.UPSTREAM_ERROR, None, self._upstream_error)
        if not self._ended and (
            truncated
            or self._endpoint.end is not EndMarker.DONE
            or not choices_finished(self._payloads)
        ):
            return Outcome(Ending.TRUNCATED, None)
        if self._malformed:
            return Outcome(Ending.MALFORMED, None)
        assemble = self._endpoint.assemble
        if assemble is None:
            return Outcome(Ending.COMPLETE, None)
        final, whole = assemble(self._payloads)
        assembled = None if final is None else orjson.dumps(final)
        return Outcome(Ending.COMPLETE if whole else Ending.INCOMPLETE, assembled)


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
