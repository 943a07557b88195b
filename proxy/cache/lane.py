"""The cache fast lane: the `Cache` the pipeline calls, in front of one backend.

A lookup on a backend that does I/O goes through a fixed pool of worker tasks
fed by a queue. Admission is bounded (`workers + max_queue` lookups in the
lane at once) and every lookup has one deadline, `timeout` after it arrived,
that covers both its wait in the queue and the backend call. Whatever goes
wrong (lane full, deadline passed, breaker open, backend error, corrupt
record) the lookup answers None, a miss, and a counter says why; the cache
may make a request faster, never fail it. The lane takes no stage slot.

An optional local tier (an in-process `MemoryBackend`) sits in front of a
backend that does I/O: a lookup it answers is a hit with no round trip, no
queue and no breaker. It holds answers this process stored or fetched, each
for no longer than the entry's TTL as stored or fetched, and no longer than
`local_max_ttl`. Entries never change under a key, the key being the
request, so nothing needs invalidating; a store made here (a `no-cache`
caller's write included) replaces the local copy at once, even if its
backend write then fails. A refresh, delete or FLUSHDB made elsewhere is
seen when the local copy expires.

`store` never awaits: it starts a write task that the lane owns, bounded in
number (writes past the bound are dropped, not queued), each bounded by
`timeout` plus the time its bytes take at `WRITE_BYTES_PER_SECOND`. An
answer over `max_entry_bytes` is not written at all (it was served; it is
counted), whatever the backend. A write that times out is no verdict on the
backend's health: its time depends on its size, and one huge answer must
not open the breaker for everyone (lookups, small and fixed-size, are what
judge the backend). `close` lets pending writes finish within one
`timeout`, cancels the rest and the workers, and closes the backend.

Counters are plain ints on the lane, touched only from the event loop
thread; `stats()` returns a frozen snapshot for the metrics exporter.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from proxy.cache import codec
from proxy.cache.base import CachedAnswer, CacheStats
from proxy.cache.breaker import CircuitBreaker
from proxy.cache.memory import MemoryBackend

# The slowest transfer rate a healthy backend is expected to sustain for one
# write; a write gets `timeout` plus its size at this rate.
WRITE_BYTES_PER_SECOND = 32 * 1024 * 1024


def answer_bytes(answer: CachedAnswer) -> int:
    """The payload an entry stores: body and events (the record adds a few bytes)."""
    size = len(answer.body) if answer.body is not None else 0
    for event in answer.events:
        size += len(event)
    return size


class Backend(Protocol):
    """Where answers live. May raise anything (the builtin TimeoutError for a
    timeout); the lane contains it."""

    async def get(self, key: str) -> CachedAnswer | codec.Corrupt | None: ...

    async def set(self, key: str, answer: CachedAnswer, ttl: float) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class InlineBackend(Protocol):
    """A backend whose operations never block (in-process memory)."""

    def get_now(self, key: str) -> CachedAnswer | None: ...

    def set_now(self, key: str, answer: CachedAnswer, ttl: float) -> bool: ...


@runtime_checkable
class TtlBackend(Protocol):
    """A backend that tells how long an entry has left (for the local tier)."""

    async def get_with_ttl(self, key: str) -> tuple[CachedAnswer | codec.Corrupt | None, float]: ...


class _Outcome(enum.Enum):
    HIT = enum.auto()
    MISS = enum.auto()
    ERROR = enum.auto()
    TIMEOUT = enum.auto()
    CORRUPT = enum.auto()
    SKIPPED = enum.auto()  # breaker refused, or the lane closed


_Result = tuple[_Outcome, CachedAnswer | None]


@dataclass(slots=True)
class _Job:
    key: str
    deadline: float  # loop time; the caller stops waiting then, the worker too
    future: asyncio.Future[_Result]


class CacheLane:
    def __init__(
        self,
        backend: Backend,
        workers: int,
        max_queue: int,
        timeout: float,
        breaker: CircuitBreaker,
        *,
        max_writes: int | None = None,
        max_entry_bytes: int | None = None,
        local: MemoryBackend | None = None,
        local_max_ttl: float | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.backend = backend
        # An in-process backend answers without blocking: handing its lookup
        # to a worker would only add a queue hop, a future and two task
        # switches to the hot path. The lane exists so slow lookups never
        # queue behind slow work, and such a lookup is never slow, so it runs
        # inline in the caller's task (and so do its writes). It cannot fail
        # the way a network can either, so the breaker does not guard it.
        self._inline = backend if isinstance(backend, InlineBackend) else None
        # Only in front of a backend that does I/O and can say what TTL is left.
        self._local = local if self._inline is None and isinstance(backend, TtlBackend) else None
        # A local copy lives no longer than this, nor than the backend entry.
        self._local_max_ttl = float("inf") if local_max_ttl is None else local_max_ttl
        self.workers = workers
        self.max_queue = max_queue
        self.timeout = timeout
        self.breaker = breaker
        self.max_writes = max_writes if max_writes is not None else workers + max_queue
        self.max_entry_bytes = max_entry_bytes
        # The queue itself is unbounded: admission is bounded by `_in_lane`
        # instead, which also covers max_queue == 0 (asyncio's "no limit").
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._in_lane = 0
        # Started on the first queued lookup, so a lane can be built before
        # the event loop runs.
        self._workers: list[asyncio.Task[None]] = []
        self._writes: set[asyncio.Task[None]] = set()
        self._closed = False
        self._hits = 0
        self._misses = 0
        self._errors = 0
        self._timeouts = 0
        self._corrupt = 0
        self._lane_full = 0
        self._breaker_skipped = 0
        self._store_ok = 0
        self._store_errors = 0
        self._store_dropped = 0
        self._store_oversize = 0
        self._store_timeouts = 0
        self._local_hits = 0

    def stats(self) -> CacheStats:
        lookups = self._hits + self._misses
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            errors=self._errors,
            timeouts=self._timeouts,
            corrupt=self._corrupt,
            lane_full=self._lane_full,
            breaker_skipped=self._breaker_skipped,
            store_ok=self._store_ok,
            store_errors=self._store_errors,
            store_dropped=self._store_dropped,
            store_oversize=self._store_oversize,
            store_timeouts=self._store_timeouts,
            breaker_opened=self.breaker.opened,
            breaker_state=self.breaker.state,
            in_lane=self._in_lane,
            writes_pending=len(self._writes),
            local_hits=self._local_hits,
            local_bytes=self._local.bytes_used if self._local is not None else 0,
            hit_ratio=self._hits / lookups if lookups else 0.0,
        )

    # -- lookups ---------------------------------------------------------

    async def lookup(self, key: str) -> CachedAnswer | None:
        if self._closed:
            self._misses += 1
            return None
        if self._inline is not None:
            try:
                answer = self._inline.get_now(key)
            except Exception:
                answer = None
                self._errors += 1
            if answer is None:
                self._misses += 1
            else:
                self._hits += 1
            return answer
        if self._local is not None:
            answer = self._local.get_now(key)
            if answer is not None:
                self._hits += 1
                self._local_hits += 1
                return answer
        if self.breaker.refusing():
            return self._count(_Outcome.SKIPPED)
        if self._in_lane >= self.workers + self.max_queue:
            self._lane_full += 1
            self._misses += 1
            return None
        if not self._workers:
            self._workers = [
                asyncio.create_task(self._work(), name=f"cache-lane-{i}")
                for i in range(self.workers)
            ]
        loop = asyncio.get_running_loop()
        job = _Job(key, loop.time() + self.timeout, loop.create_future())
        self._in_lane += 1
        self._queue.put_nowait(job)
        try:
            # Waiting is bounded by the job's deadline even if a worker were
            # slow to honour it; timing out cancels the future, and the worker
            # skips or abandons a job whose future is done.
            async with asyncio.timeout_at(job.deadline):
                outcome, answer = await job.future
        except TimeoutError:
            outcome, answer = _Outcome.TIMEOUT, None
        return self._count(outcome, answer)

    def _count(self, outcome: _Outcome, answer: CachedAnswer | None = None) -> CachedAnswer | None:
        """Counts each lookup exactly once, in the caller's task."""
        if outcome is _Outcome.HIT:
            self._hits += 1
            return answer
        self._misses += 1
        if outcome is _Outcome.ERROR:
            self._errors += 1
        elif outcome is _Outcome.TIMEOUT:
            self._timeouts += 1
        elif outcome is _Outcome.CORRUPT:
            self._corrupt += 1
        elif outcome is _Outcome.SKIPPED:
            self._breaker_skipped += 1
        return None

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self._queue.get()
            result: _Result = (_Outcome.SKIPPED, None)  # if cancelled (close) midway
            try:
                if job.future.done():
                    continue  # the caller stopped waiting (deadline or cancel)
                if loop.time() >= job.deadline:
                    result = (_Outcome.TIMEOUT, None)
                else:
                    result = await self._get(job)
            finally:
                self._in_lane -= 1
                if not job.future.done():
                    job.future.set_result(result)

    async def _get(self, job: _Job) -> _Result:
        permit = self.breaker.allow()
        if permit is None:
            return (_Outcome.SKIPPED, None)
        left = 0.0
        try:
            async with asyncio.timeout_at(job.deadline):
                if self._local is not None:
                    assert isinstance(self.backend, TtlBackend)
                    found, left = await self.backend.get_with_ttl(job.key)
                else:
                    found = await self.backend.get(job.key)
        except TimeoutError:
            # The deadline, or the backend's own socket timeout: either way the
            # backend dropped that connection, and it counts as a fault.
            self.breaker.record(permit, False)
            return (_Outcome.TIMEOUT, None)
        except Exception:
            self.breaker.record(permit, False)
            return (_Outcome.ERROR, None)
        except BaseException:
            self.breaker.release(permit)  # cancelled by close(): no verdict
            raise
        self.breaker.record(permit, True)
        if found is None:
            return (_Outcome.MISS, None)
        if isinstance(found, codec.Corrupt):
            # Deleting may race with another sidecar's fresh write of the same
            # key; that costs one extra miss, never a wrong answer.
            self._spawn_write(self.backend.delete(job.key))
            return (_Outcome.CORRUPT, None)
        if self._local is not None and left > 0:
            self._local.set_now(job.key, found, min(left, self._local_max_ttl))
        return (_Outcome.HIT, found)

    # -- writes ----------------------------------------------------------

    def store(self, key: str, answer: CachedAnswer, ttl: float) -> asyncio.Task[None] | None:
        if self._closed or ttl <= 0:
            return None
        size = answer_bytes(answer)
        if self.max_entry_bytes is not None and size > self.max_entry_bytes:
            self._store_oversize += 1
            return None
        if self._inline is not None:
            try:
                self._inline.set_now(key, answer, ttl)
            except Exception:
                self._store_errors += 1
            else:
                self._store_ok += 1
            return None
        if self._local is not None:
            # Replaces any older copy at once, whatever becomes of the backend write.
            self._local.set_now(key, answer, min(ttl, self._local_max_ttl))
        return self._spawn_write(self.backend.set(key, answer, ttl), size)

    def _spawn_write(
        self, write: Coroutine[Any, Any, None], size: int = 0
    ) -> asyncio.Task[None] | None:
        if self._closed or len(self._writes) >= self.max_writes or self.breaker.refusing():
            write.close()  # never awaited: close it so no warning is raised
            self._store_dropped += 1
            return None
        deadline = asyncio.get_running_loop().time() + self.timeout + size / WRITE_BYTES_PER_SECOND
        task = asyncio.create_task(self._write(write, deadline))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return task

    async def _write(self, write: Coroutine[Any, Any, None], deadline: float) -> None:
        permit = self.breaker.allow()
        if permit is None:
            write.close()
            self._store_dropped += 1
            return
        try:
            async with asyncio.timeout_at(deadline):
                await write
        except TimeoutError:
            # Slow is not sick: how long a write takes depends on its size.
            # The connection it used is dropped (redis-py disconnects on
            # cancellation), and the lookups decide the backend's health.
            self._store_errors += 1
            self._store_timeouts += 1
            self.breaker.release(permit)
        except Exception:
            self._store_errors += 1
            self.breaker.record(permit, False)
        except BaseException:
            self.breaker.release(permit)  # cancelled by close(): no verdict
            raise
        else:
            self._store_ok += 1
            self.breaker.record(permit, True)

    async def flush(self) -> None:
        """Wait for the writes started so far (each is bounded by `timeout`)."""
        while self._writes:
            await asyncio.wait(set(self._writes))

    # -- lifetime --------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Lookups first: a worker cancelled mid-call answers its caller with a
        # miss. Then writes, which are worth finishing if they can in time.
        for worker in self._workers:
            worker.cancel("cache lane closing")
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        writes = set(self._writes)
        if writes:
            _, late = await asyncio.wait(writes, timeout=self.timeout)
            for task in late:
                task.cancel("cache lane closing")
            await asyncio.gather(*writes, return_exceptions=True)
        # Jobs still queued belong to callers that are waiting: answer them.
        while not self._queue.empty():
            job = self._queue.get_nowait()
            self._in_lane -= 1
            if not job.future.done():
                job.future.set_result((_Outcome.SKIPPED, None))
        if self._local is not None:
            await self._local.close()
        with contextlib.suppress(Exception):
            await self.backend.close()
