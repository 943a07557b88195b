"""A sans-IO Server-Sent Events codec.

`SSEDecoder.feed(bytes)` returns the complete events in those bytes, each
with the exact bytes the upstream framed it with, so a stored event replays
byte for byte. No I/O, no aiohttp: it is tested with input split at every
byte.
"""

from __future__ import annotations

from dataclasses import dataclass

DONE = b"[DONE]"


@dataclass(frozen=True, slots=True)
class SSEEvent:
    raw: bytes  # as framed upstream, blank line included
    event: str | None
    data: bytes  # data lines joined with "\n"


class EventTooLarge(ValueError):
    """An event (or the unfinished one) passed the decoder's `max_event_bytes`.

    `events` are the whole events the same read held before it, so a caller
    loses nothing that was complete.
    """

    def __init__(self, size: int, events: list[SSEEvent]) -> None:
        super().__init__(f"an SSE event of at least {size} bytes")
        self.size = size
        self.events = events


class SSEDecoder:
    """Incremental decoder; one per upstream response.

    A read costs in proportion to its own bytes, not to what is buffered:
    the unfinished event grows in place and the search for a line's end
    resumes where the last read left it. With `max_event_bytes`, an event
    (or the unfinished one) past that many bytes raises EventTooLarge, so a
    body that never ends an event cannot grow the buffer without bound.
    """

    __slots__ = ("_buf", "_data", "_event", "_line_start", "_max", "_scan")

    def __init__(self, max_event_bytes: int | None = None) -> None:
        self._buf = bytearray()  # the unfinished event, from its first byte
        self._line_start = 0  # where its unfinished line starts in _buf
        self._scan = 0  # where the search for that line's end resumes
        self._data: list[bytes] = []
        self._event: str | None = None
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        pending = self._buf
        buf: bytes | bytearray
        if pending:
            pending += chunk  # amortised in place: no copy of what is buffered
            buf = pending
        else:
            buf = chunk  # the common case: nothing pending, no copy at all
        events: list[SSEEvent] = []
        start = self._line_start
        scan = self._scan
        event_start = 0
        size = len(buf)
        nl = -2  # the next LF at or after `scan`; -1: none up to `size`; -2: not looked yet
        while start < size:
            if nl != -1 and nl < scan:
                nl = buf.find(b"\n", scan)
            cr = buf.find(b"\r", scan, nl if nl >= 0 else size)
            if cr >= 0:
                if cr + 1 == size:
                    scan = cr  # a lone CR at the end may be half of CRLF
                    break
                end = cr + 2 if buf[cr + 1] == 0x0A else cr + 1
                line_end = cr
            elif nl >= 0:
                end = nl + 1
                line_end = nl
            else:
                scan = size
                break
            line = buf[start:line_end]
            start = scan = end
            if not line:
                if self._max is not None and end - event_start > self._max:
                    raise EventTooLarge(end - event_start, events)
                if self._data or self._event is not None:
                    raw = bytes(buf[event_start:end])
                    events.append(SSEEvent(raw, self._event, b"\n".join(self._data)))
                self._data = []
                self._event = None
                event_start = end
                continue
            self._field(line)
        # Keep only the unfinished event so the buffer never grows past one.
        if buf is pending:
            del pending[:event_start]
        elif event_start < size:
            pending += memoryview(chunk)[event_start:]
        self._line_start = start - event_start
        self._scan = scan - event_start
        if self._max is not None and len(pending) > self._max:
            raise EventTooLarge(len(pending), events)
        return events

    def _field(self, line: bytes | bytearray) -> None:
        if line[0] == 0x3A:  # ":" starts a comment
            return
        name, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(bytes(value))
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet terminated by a blank line."""
        return bytes(self._buf)


def chunk_frame(data: bytes) -> bytes:
    """One HTTP/1.1 chunk carrying `data`: framed once, written to many readers."""
    return b"%x\r\n%b\r\n" % (len(data), data)


COMMENT_KEEPALIVE = b": keepalive\n\n"
