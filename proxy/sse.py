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


class SSEDecoder:
    """Incremental decoder; one per upstream response."""

    __slots__ = ("_buf", "_data", "_event", "_event_start", "_line_start")

    def __init__(self) -> None:
        self._buf = b""
        self._line_start = 0
        self._event_start = 0
        self._data: list[bytes] = []
        self._event: str | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        buf = self._buf + chunk if self._buf else chunk
        events: list[SSEEvent] = []
        start = self._line_start
        size = len(buf)
        while start < size:
            nl = buf.find(b"\n", start)
            cr = buf.find(b"\r", start, nl if nl >= 0 else size)
            if cr >= 0:
                if cr + 1 == size:
                    break  # a lone CR at the end may be half of CRLF
                end = cr + 2 if buf[cr + 1] == 0x0A else cr + 1
                line_end = cr
            elif nl >= 0:
                end = nl + 1
                line_end = nl
            else:
                break
            line = buf[start:line_end]
            start = end
            if not line:
                if self._data or self._event is not None:
                    events.append(
                        SSEEvent(buf[self._event_start : end], self._event, b"\n".join(self._data))
                    )
                self._data = []
                self._event = None
                self._event_start = end
                continue
            self._field(line)
        # Keep only the unfinished event so the buffer never grows past one.
        self._buf = buf[self._event_start :]
        self._line_start = start - self._event_start
        self._event_start = 0
        return events

    def _field(self, line: bytes) -> None:
        if line[0] == 0x3A:  # ":" starts a comment
            return
        name, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet terminated by a blank line."""
        return self._buf


def chunk_frame(data: bytes) -> bytes:
    """One HTTP/1.1 chunk carrying `data`: framed once, written to many readers."""
    return b"%x\r\n%b\r\n" % (len(data), data)


COMMENT_KEEPALIVE = b": keepalive\n\n"
