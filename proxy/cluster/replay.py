"""Telling a local stream what the owner's stream was told, entry by entry.

`Replay.apply` is the mirror's side of `proxy.cluster.entries`: each entry
becomes the same producer step on the local stream (`open`, `append`,
`end`, `fail`) that the owner's pump took on its own, so local readers get
the owner's bytes, and the same conversions for readers of the other mode
(events are classified here as the owner's upstream stage classified them,
which marks the usage chunk and folds the non-stream object). No I/O.
"""

from __future__ import annotations

from proxy.classify import EventClassifier
from proxy.cluster.entries import DoneEntry, Entry, EventsEntry, FailedEntry, HeadEntry
from proxy.endpoint import Endpoint
from proxy.errors import UpstreamBroken
from proxy.sse import SSEDecoder
from proxy.stream import Head, Stream


class Replay:
    def __init__(self, stream: Stream, endpoint: Endpoint) -> None:
        self._stream = stream
        self._decoder = SSEDecoder()
        self._classifier = EventClassifier(endpoint)
        self.head: Head | None = None  # the head applied, once it was

    def apply(self, entry: Entry) -> bool:
        """Apply one entry; True when it ended the stream."""
        stream = self._stream
        if isinstance(entry, EventsEntry):
            events = self._decoder.feed(entry.raw)
            stream.append([self._classifier.feed(event) for event in events])
            return False
        if isinstance(entry, HeadEntry):
            self.head = entry.head
            stream.open(entry.head)
            if entry.head.body is not None:  # a plain answer, or a cached one replayed
                stream.assembled = entry.head.body
            return False
        if isinstance(entry, DoneEntry):
            if self.head is None:  # an end with no head: readers would wait forever
                stream.fail(UpstreamBroken("llm-sidecar: the shared stream ended before its head"))
                return True
            if self.head is not None and self.head.is_sse and stream.assembled is None:
                stream.assembled = self._classifier.finish().assembled
            stream.end(complete=entry.complete, error=entry.error)
            return True
        if isinstance(entry, FailedEntry):
            if isinstance(entry.error, Head):
                stream.fail_before_head(entry.error)
            else:
                stream.fail(entry.error)
            return True
        raise AssertionError(f"unhandled entry {entry!r}")
