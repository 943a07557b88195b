"""A sans-IO Server-Sent Events codec.

`SSEDecoder` follows the WHATWG HTML standard, section 9.2.6 "Interpreting an
event stream", line by line:

* CR LF, a bare LF or a bare CR ends a line; a leading U+FEFF is ignored;
* a line starting with ":" is a comment; `data` lines are joined with LF;
  `event` sets the type; other fields (`id`, `retry`) change nothing here;
* a blank line dispatches the event, unless it has no `data` line;
* at the end of input an unfinished event is discarded (`finish`).

A bare-CR blank line is dispatched as soon as it arrives: a CR at the end of
one read could be the first half of a CR LF, but waiting for the next read
would hold a whole event (and its first token) back. Once the stream has
used CR LF, a blank line's CR at the end of a read is instead held for its
LF (which the upstream wrote in the same breath), so that an event's bytes
do not depend on how the reads were cut.

With `max_event_bytes`, an event, the unfinished one, or the bytes that
lead it (comments) past that many bytes raises `EventTooLarge`, so a body
that never ends an event cannot grow the buffer without bound.

Each event keeps `raw`, the exact bytes it was framed with, for a replay
byte for byte. Bytes that dispatch nothing (comments, an event without
data, the LF of a CR LF split from its CR) lead the next event's `raw`:
the concatenated `raw` of every event, then `pending`, is exactly what was
fed. A feed costs time proportional to the bytes fed, never to what is
buffered. No I/O, no aiohttp: it is tested with the input split at every
byte.
"""

from __future__ import annotations

from dataclasses import dataclass

DONE = b"[DONE]"
_CR = 0x0D
_LF = 0x0A
_BOM = b"\xef\xbb\xbf"


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
    """Incremental decoder; one per upstream response."""

    __slots__ = (
        "_after_cr",
        "_crlf",
        "_data",
        "_event",
        "_held",
        "_held_cr",
        "_lead",
        "_line",
        "_max",
        "_raw",
        "_started",
    )

    def __init__(self, max_event_bytes: int | None = None) -> None:
        self._max = max_event_bytes
        # What `_raw` holds, and how much of it leads the next event (bytes
        # that dispatched nothing): each is bounded by `_max` on its own.
        self._held = 0
        self._lead = 0
        # Only the read being fed is searched; what earlier reads left over
        # waits in these lists and is joined once, when its line or event ends.
        self._raw: list[bytes] = []  # fed bytes not yet part of a dispatched event
        self._line: list[bytes] = []  # the start of an unfinished line
        self._after_cr = False  # the last line ended in CR: an LF next completes a CR LF
        self._held_cr = False  # a blank line's CR ended the last read (CR LF stream)
        self._crlf = False  # this stream has used CR LF
        self._started = False  # the first line (which may carry a BOM) was seen
        self._data: list[bytes] = []
        self._event: str | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        size = len(chunk)
        pos = 0  # the next line starts here
        seg = 0  # chunk[seg:] is not yet in a dispatched event
        if not size:
            return events
        if self._held_cr:
            self._held_cr = False
            pos = 1 if chunk[0] == _LF else 0
            self._dispatch(events, chunk[:pos])
            seg = pos
        elif self._after_cr:
            self._after_cr = False
            if chunk[0] == _LF:
                self._crlf = True
                pos = 1
        lf = -1
        lf_clear = pos  # no LF in chunk[pos:lf_clear]
        while pos < size:
            if lf < pos and lf_clear < size:
                # Each byte is searched for LF at most once, even in a CR-only stream.
                lf = chunk.find(b"\n", max(pos, lf_clear))
                lf_clear = size if lf < 0 else lf
            end = chunk.find(b"\r", pos, lf if lf >= pos else size)
            if end < 0:
                if lf < pos:
                    self._line.append(chunk[pos:])
                    break
                end = lf
            if chunk[end] == _LF:
                term = end + 1
            elif end + 1 < size:
                term = end + 2 if chunk[end + 1] == _LF else end + 1
                self._crlf = self._crlf or term == end + 2
            else:
                term = size
                if self._crlf and end == pos and not self._line:
                    # A blank line's CR in a CR LF stream: its LF is on the way,
                    # and the event's bytes should not depend on where reads end.
                    self._held_cr = True
                    pos = size
                    break
                self._after_cr = True
            if self._line:
                self._line.append(chunk[pos:end])
                content = b"".join(self._line)
                self._line = []
            else:
                content = chunk[pos:end]
            pos = term
            if not self._started:
                self._started = True
                content = content.removeprefix(_BOM)
            if content:
                self._field(content)
            elif self._data:
                self._dispatch(events, chunk[seg:term])
                seg = term
            else:
                self._event = None
                self._lead = self._held + term - seg  # all so far leads the next event
        if seg < size:
            self._raw.append(chunk[seg:] if seg else chunk)
            self._held += size - seg
        cap = self._max
        if cap is not None and (self._held - self._lead > cap or self._lead > cap):
            raise EventTooLarge(max(self._held - self._lead, self._lead), events)
        return events

    def finish(self) -> list[SSEEvent]:
        """End of input: a held CR ends its line; an unfinished event is discarded."""
        events: list[SSEEvent] = []
        if self._held_cr:
            self._held_cr = False
            self._dispatch(events, b"")
        return events

    @property
    def pending(self) -> bytes:
        """Fed bytes that are not (yet) part of a dispatched event."""
        return b"".join(self._raw)

    @property
    def truncated(self) -> bool:
        """An event was begun and not dispatched: the input stopped mid-event."""
        return bool(self._data or self._line or self._held_cr) or self._event is not None

    def _dispatch(self, events: list[SSEEvent], tail: bytes) -> None:
        if self._raw:
            self._raw.append(tail)
            raw = b"".join(self._raw)
            self._raw = []
        else:
            raw = tail
        self._held = 0
        if self._data:
            own = len(raw) - self._lead
            if self._max is not None and own > self._max:
                raise EventTooLarge(own, events)
            data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
            events.append(SSEEvent(raw, self._event, data))
            self._lead = 0
        elif raw:
            self._raw.append(raw)  # nothing to dispatch: these bytes lead the next event
            self._held = self._lead = len(raw)
        self._data = []
        self._event = None

    def _field(self, line: bytes) -> None:
        if line[0] == 0x3A:  # ":" starts a comment
            return
        name, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace") or None


def chunk_frame(data: bytes) -> bytes:
    """One HTTP/1.1 chunk carrying `data`: framed once, written to many readers."""
    return b"%x\r\n%b\r\n" % (len(data), data)


COMMENT_KEEPALIVE = b": keepalive\n\n"
