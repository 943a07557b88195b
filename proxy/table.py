"""The in-flight table: request key -> live stream, single-flight.

Join-or-lead is one synchronous step (`get` then `publish` with no await
between them, done by the caller), so two leaders for one key never exist in
one process. Removal checks identity so a stale cleanup never removes a
newer stream published under the same key.
"""

from __future__ import annotations

from collections.abc import Iterator

from proxy.stream import Stream


class InflightTable:
    def __init__(self) -> None:
        self._streams: dict[str, Stream] = {}

    def get(self, key: str) -> Stream | None:
        return self._streams.get(key)

    def publish(self, stream: Stream) -> None:
        assert stream.key not in self._streams, "publish without a synchronous get"
        self._streams[stream.key] = stream

    def unpublish(self, stream: Stream) -> None:
        if self._streams.get(stream.key) is stream:
            del self._streams[stream.key]

    def __len__(self) -> int:
        return len(self._streams)

    def __iter__(self) -> Iterator[Stream]:
        return iter(list(self._streams.values()))
