"""The in-process cache backend: an LRU of answers bounded by bytes, with TTLs.

For a single sidecar. Entries hold the `CachedAnswer` itself, not an encoded
record: the answer is immutable and its event bytes are the very objects the
stream log produced, so a hit is a dict lookup and a move to the LRU end, with
no decoding on the hot path. Sizes are estimated from the bytes an entry
references plus a fixed per-entry overhead; the total never passes `max_bytes`.

Every operation is synchronous and never blocks, which is what lets the lane
call it inline (`get_now`, `set_now`); the async methods exist so the backend
also fits the lane's general `Backend` shape.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from proxy.cache.base import CachedAnswer

# Dict slot, entry object, answer object, tuple and per-bytes-object headers:
# what an entry costs beyond the bytes it holds, rounded up.
ENTRY_OVERHEAD = 256
BYTES_OVERHEAD = 40


def answer_size(key: str, answer: CachedAnswer) -> int:
    """An upper estimate of the memory an entry keeps alive."""
    size = ENTRY_OVERHEAD + len(key) + len(answer.content_type)
    if answer.body is not None:
        size += BYTES_OVERHEAD + len(answer.body)
    for event in answer.events:
        size += BYTES_OVERHEAD + len(event)
    return size


@dataclass(slots=True)
class _Entry:
    answer: CachedAnswer
    expires_at: float  # on the backend's clock (monotonic)
    size: int


class MemoryBackend:
    name = "memory"

    def __init__(self, max_bytes: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self._clock = clock
        # Least recently used first. Owned by the event loop thread; every
        # method below finishes without awaiting, so no lock is needed.
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get_now(self, key: str) -> CachedAnswer | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= self._clock():
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return entry.answer

    def set_now(self, key: str, answer: CachedAnswer, ttl: float) -> bool:
        """Store (replacing any old entry); False when it cannot fit at all."""
        self._remove(key)
        size = answer_size(key, answer)
        if ttl <= 0 or size > self.max_bytes:
            return False
        # Expired entries are not swept: they are the oldest-used ones in
        # practice and go first when room is needed, or on their next lookup.
        while self._bytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.size
        self._entries[key] = _Entry(answer, self._clock() + ttl, size)
        self._bytes += size
        return True

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry.size

    async def get(self, key: str) -> CachedAnswer | None:
        return self.get_now(key)

    async def set(self, key: str, answer: CachedAnswer, ttl: float) -> None:
        self.set_now(key, answer, ttl)

    async def delete(self, key: str) -> None:
        self._remove(key)

    async def close(self) -> None:
        self._entries.clear()
        self._bytes = 0
