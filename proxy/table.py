"""The in-flight table: request key -> live stream, single-flight.

`join_or_publish` is the whole join-or-lead decision in one synchronous step
(no await inside), so two leaders for one key never exist in one process.
Removal checks identity so a stale cleanup never removes a newer stream
published under the same key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from proxy.stream import Stream


class InflightTable:
    def __init__(self) -> None:
        self._streams: dict[str, Stream] = {}

    def join_or_publish(
        self, key: str, make: Callable[[], Stream], plain_only: bool = False
    ) -> tuple[Stream, bool]:
        """The stream to read for `key`, and whether it was joined (True) or made.

        A made stream is published unless a live one holds the key (past its
        log cap, or a streamed call when `plain_only` asks for a plain call's
        answer); that one stays, and the new one runs unpublished.
        """
        existing = self._streams.get(key)
        if existing is not None and existing.joinable and (existing.plain_call or not plain_only):
            return existing, True
        stream = make()
        if existing is None or existing.retired:
            self._streams[key] = stream
        return stream, False

    def unpublish(self, stream: Stream) -> None:
        if self._streams.get(stream.key) is stream:
            del self._streams[stream.key]

    def __len__(self) -> int:
        return len(self._streams)

    def __iter__(self) -> Iterator[Stream]:
        return iter(list(self._streams.values()))
