"""The stream: one upstream response, logged once and fanned out to readers.

An append-only log of events plus readers with one cursor each. A reader
replays from event 0, then joins the push set: the producer frames the
events of each upstream read once (one HTTP chunk) and writes the same bytes
straight to every pushed reader's transport, with no wake-up per reader. A reader
whose transport buffer passes the high-water mark leaves the push set and
catches up from its cursor on its own, so one slow reader never holds the
producer or the others.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from multidict import CIMultiDict

from proxy.convert import Assembly, PlainAnswer
from proxy.errors import ProxyError
from proxy.policy import StreamSettings
from proxy.retry import Attempt
from proxy.sse import chunk_frame


@dataclass(frozen=True, slots=True)
class LogEvent:
    raw: bytes  # the event as the upstream framed it (never parsed to be logged)
    usage_only: bool = False  # the include_usage chunk: only readers who asked get it


def frame_events(events: Sequence[LogEvent], with_usage: bool) -> bytes:
    """Events as one HTTP chunk, or b"" when none is for this kind of reader.

    Framing happens when bytes are written, not when events are logged, so a
    stream with only non-stream readers never frames at all.
    """
    payload = b"".join(e.raw for e in events if with_usage or not e.usage_only)
    return chunk_frame(payload) if payload else b""


@dataclass(frozen=True, slots=True)
class Head:
    """The upstream's status line and headers, known before any event."""

    status: int
    headers: CIMultiDict[str]
    is_sse: bool
    body: bytes | None = None  # whole body for non-SSE or error responses


class PushReader:
    """A stream reader's place in the log and its connection."""

    __slots__ = ("cursor", "transport", "wake", "wants_usage")

    def __init__(self, transport: asyncio.WriteTransport | None, wants_usage: bool) -> None:
        self.transport = transport
        self.wants_usage = wants_usage
        self.cursor = 0
        # Set by whoever (producer or reader) created it; resolved by the
        # producer when this reader must act on its own (end, buffer full).
        self.wake: asyncio.Future[None] | None = None

    def notify(self) -> None:
        if self.wake is not None and not self.wake.done():
            self.wake.set_result(None)


State = Literal["pending", "open", "done"]
# Where a stream's events come from: its own upstream call ("local"), its own
# call shared with other replicas through Redis ("owner"), or another
# replica's call read from Redis ("mirror").
Role = Literal["local", "owner", "mirror"]


class StreamSink(Protocol):
    """Told every producer step of a stream, in order, as it happens.

    The cross-replica log writer is one: it records what the stream's
    readers are told so readers on other replicas are told the same.
    Called synchronously from the producer; it must not block.
    """

    def opened(self, head: Head) -> None: ...

    def appended(self, events: Sequence[LogEvent]) -> None: ...

    def ended(self, complete: bool, error: ProxyError | None) -> None: ...

    def failed(self, error: ProxyError | Head) -> None:
        """`fail` or `fail_before_head`: the readers get `error`, not more events."""
        ...


@dataclass(eq=False)
class Stream:
    """One in-flight upstream response for one key.

    The stream owns its upstream call (the `pump` task, set by the runtime
    when it starts it) and its readers; what happens when the last reader
    leaves is fixed at construction (`cancel_on_abandon`).
    """

    key: str
    settings: StreamSettings
    cancel_on_abandon: bool
    # The stream holds a plain call's answer (the leader asked for one, or it
    # queued and found one in the cache): no event comes before the whole of
    # it, and a streaming reader gets it re-chunked. A streamed call the
    # upstream answered in JSON is not one: its readers get it as it is.
    plain_call: bool = False
    head: asyncio.Future[Head] = field(init=False)
    finished: asyncio.Future[None] = field(init=False)
    events: list[LogEvent] = field(default_factory=list)
    size: int = 0
    state: State = "pending"
    error: ProxyError | None = None  # set when the stream ended abnormally
    complete: bool = False  # the whole answer arrived (cacheable if also `whole`, see write)
    readers: int = 0  # attached readers; the last one leaving may cancel
    abandoned: bool = False  # every reader left and the policy cancelled the call
    # The answer for readers of the other mode, converted on first use, once
    # for all of them; set by the pump when the answer is whole. A streamed
    # answer has `assembly` (its non-stream object), a plain one `plain`
    # (its body, and its events).
    assembly: Assembly | None = None
    plain: PlainAnswer | None = None
    pump: asyncio.Task[None] | None = None  # set once, by the runtime that owns the task
    created_at: float = 0.0
    first_event_at: float | None = None  # perf_counter at the first append, for TTFB
    attempts: list[Attempt] = field(default_factory=list)  # the pump's tries, before the head
    # The proxy retried, or refused a retry it would otherwise make: its
    # failed answer tells the caller's SDK not to retry on top.
    retries_spent: bool = False
    role: Role = "local"  # set by the cross-replica flight before the head
    mirrors: int = 0  # an owned stream: replicas mirroring it, as of the lease's last renewal
    sink: StreamSink | None = None  # set once, before the producer's first step
    _push: set[PushReader] = field(default_factory=set)

    def __post_init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.head = loop.create_future()
        self.finished = loop.create_future()
        self.created_at = loop.time()

    # --- producer side (the pump task) -----------------------------------

    def open(self, head: Head) -> None:
        if self.sink is not None:
            self.sink.opened(head)
        self.state = "open"
        if head.body is not None:
            # A whole body is a plain call's log: it counts toward the join cap.
            self.size += len(head.body)
        if not self.head.done():
            self.head.set_result(head)

    def fail_before_head(self, error: ProxyError | Head) -> None:
        """No events will come: every reader answers with this error."""
        if self.sink is not None and self.state != "done":
            self.sink.failed(error)
        if not self.head.done():
            if isinstance(error, Head):
                self.head.set_result(error)
            else:
                self.head.set_exception(error)
                # Readers may all be gone; the exception is still retrieved.
                self.head.exception()
        self._finish()

    def append(self, events: Sequence[LogEvent]) -> None:
        """Log the events of one upstream read and push them as one write per reader."""
        if not events:
            return
        if self.sink is not None:
            self.sink.appended(events)
        if self.first_event_at is None:
            self.first_event_at = time.perf_counter()
        self.events.extend(events)
        self.size += sum(len(event.raw) for event in events)
        if not self._push:
            return
        count = len(events)
        # At most two framings, shared by every pushed reader: with and
        # without the usage chunk.
        frames: dict[bool, bytes] = {}
        high_water = self.settings.write_high_water
        for reader in list(self._push):
            transport = reader.transport
            if transport is None or transport.is_closing():
                self._push.discard(reader)
                reader.notify()
                continue
            wants = reader.wants_usage
            frame = frames.get(wants)
            if frame is None:
                frame = frames[wants] = frame_events(events, wants)
            if frame:
                transport.write(frame)
            reader.cursor += count
            if transport.get_write_buffer_size() > high_water:
                self._push.discard(reader)
                reader.notify()

    def fail(self, error: ProxyError) -> None:
        """End abnormally: before the head every reader answers `error`;
        after it, every reader's stream ends with `error` as an SSE event."""
        if not self.head.done():
            self.fail_before_head(error)
        elif self.state != "done":
            sink, self.sink = self.sink, None  # told once, as a failure: not as events
            if sink is not None:
                sink.failed(error)
            self.append([LogEvent(error.sse_event())])
            self.end(complete=False, error=error)

    def end(self, *, complete: bool, error: ProxyError | None = None) -> None:
        if self.sink is not None and self.state != "done":
            self.sink.ended(complete, error)
        self.complete = complete and error is None
        self.error = error
        self._finish()

    def _finish(self) -> None:
        self.state = "done"
        if not self.finished.done():
            self.finished.set_result(None)
        for reader in self._push:
            reader.notify()
        self._push.clear()

    # --- reader side -------------------------------------------------------

    @property
    def joinable(self) -> bool:
        """Whether a new follower may attach: the log is under its cap, and the
        stream is live or ended whole (a follower then replays it all)."""
        if self.abandoned:
            return False
        return (self.state != "done" or self.complete) and self.size <= self.settings.max_log_bytes

    @property
    def retired(self) -> bool:
        """Ended or abandoned: a new stream may take its place in the table."""
        return self.state == "done" or self.abandoned

    def attach(self) -> None:
        self.readers += 1

    def detach(self) -> None:
        """One reader leaves; the last one abandons the call if the policy says so.

        Abandoning cancels the pump; its owner then ends the stream and
        unpublishes it. Until then `abandoned` keeps new readers off it.
        """
        self.readers -= 1
        if self.readers or self.state == "done" or not self.cancel_on_abandon:
            return
        self.abandoned = True
        if self.pump is not None:
            self.pump.cancel()

    def subscribe(self, reader: PushReader) -> bool:
        """Join the push set if `reader` has caught up; False means catch up first."""
        if self.state == "done" or reader.cursor < len(self.events):
            return False
        self._push.add(reader)
        return True

    def unsubscribe(self, reader: PushReader) -> None:
        self._push.discard(reader)
