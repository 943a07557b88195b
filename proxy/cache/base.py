"""The cache seam: what a cached answer holds and what a cache must do.

The pipeline sees only `Cache`; backends (memory, Redis) and the fast lane
live behind it. A cache may make a request faster, never fail it: `lookup`
answers None on any fault, `store` never raises into the caller.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from proxy.cache.breaker import BreakerState


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """A complete, successful upstream answer: enough for both kinds of reader."""

    status: int
    content_type: str
    is_sse: bool
    events: tuple[bytes, ...]  # SSE events as the upstream framed them
    usage_event: int | None  # index in `events` of the include_usage chunk
    body: bytes | None  # the non-stream JSON (assembled from events, or as sent)
    stored_at: float  # wall-clock seconds, for the Age header


@dataclass(frozen=True, slots=True)
class CacheStats:
    hits: int
    misses: int  # every lookup that did not hit, whatever the reason below
    errors: int  # the backend raised
    timeouts: int  # the deadline passed (in the queue or in the backend call)
    corrupt: int  # a record that did not decode (deleted)
    lane_full: int  # refused at admission: workers + max_queue already in the lane
    breaker_skipped: int  # lookups not attempted because the breaker was open
    store_ok: int
    store_errors: int  # writes that raised or timed out
    store_dropped: int  # writes not attempted: write bound reached or breaker open
    store_oversize: int  # answers over max_entry_bytes: served, not written
    store_timeouts: int  # writes past their deadline (also in store_errors; not a fault)
    breaker_opened: int  # times the breaker opened
    breaker_state: BreakerState
    in_lane: int  # lookups admitted and not yet finished (queued or in a worker)
    writes_pending: int
    local_hits: int  # hits answered by the local tier, without a backend round trip
    local_bytes: int  # what the local tier holds now (0 without one)
    hit_ratio: float  # hits / lookups so far (0.0 before any)


class Cache(Protocol):
    async def lookup(self, key: str) -> CachedAnswer | None: ...

    def store(self, key: str, answer: CachedAnswer, ttl: float) -> asyncio.Future[None] | None:
        """Schedule a write off the caller's path; the cache owns the task.

        Returns the pending write to wait on (never to cancel), or None when
        the write is already done or was dropped.
        """
        ...

    def stats(self) -> CacheStats | None:
        """Counters for `/status` and `/metrics`; None when the cache keeps none."""
        ...

    async def flush(self) -> None:
        """Wait for the writes `store` started so far; at once for a cache that
        writes nothing off the caller's path."""
        ...

    async def close(self) -> None: ...


class NullCache:
    async def lookup(self, key: str) -> CachedAnswer | None:
        return None

    def store(self, key: str, answer: CachedAnswer, ttl: float) -> asyncio.Future[None] | None:
        return None

    def stats(self) -> CacheStats | None:
        return None

    async def flush(self) -> None:
        return None

    async def close(self) -> None:
        return None
