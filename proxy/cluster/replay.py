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
from proxy.convert import Assembly, PlainAnswer
from proxy.endpoint import Endpoint
from proxy.errors import UpstreamBroken
from proxy.sse import SSEDecoder
from proxy.stream import Head, Stream


class Replay:
    def __init__(self, stream: Stream, endpoint: Endpoint) -> None:
        self._stream = stream
        self._endpoint = endpoint
        self._decoder = SSEDecoder()  # the owner bounded each event already
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
            head = self.head = entry.head
            stream.open(head)
            # As the owner's upstream stage (a plain answer) or leader stage
            # (a cached answer replayed) set them, for readers of the other mode.
            if head.body is not None and head.is_sse:
                stream.assembly = Assembly.built(self._endpoint, head.body, whole=True)
            elif head.body is not None and head.status < 300:
                stream.plain = PlainAnswer(self._endpoint, head.body)
            return False
        if isinstance(entry, DoneEntry):
            if self.head is None:  # an end with no head: readers would wait forever
                stream.fail(UpstreamBroken("llm-sidecar: the shared stream ended before its head"))
                return True
            if self.head.is_sse and stream.assembly is None:
                stream.assembly = self._classifier.finish().assembly
            stream.end(complete=entry.complete, error=entry.error)
            return True
        if isinstance(entry, FailedEntry):
            if isinstance(entry.error, Head):
                stream.fail_before_head(entry.error)
            else:
                stream.fail(entry.error)
            return True
        raise AssertionError(f"unhandled entry {entry!r}")
