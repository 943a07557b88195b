"""Stage limiters: bounded concurrency, a bounded FIFO queue, a queue timeout.

One `StageLimiter` per stage (leader, follower, upstream). It is resized in
place on reload: a grow admits waiters at once, a shrink lets current holders
finish. A slot granted just as its waiter was cancelled is handed back, so
counts always return to zero.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

from proxy.errors import QueueFull, QueueTimeout


@dataclass(frozen=True, slots=True)
class StageStats:
    name: str
    in_use: int
    queued: int
    max_concurrency: int
    max_queue: int


@dataclass(frozen=True, slots=True)
class StageEvent:
    """One step of a holder through a stage, for tests and the live view."""

    stage: str
    holder: str
    kind: str  # "wait" | "acquire" | "release" | "reject"
    at: float


StageObserver = Callable[[StageEvent], None]


class StageLimiter:
    # All fields are touched only from the event loop thread; no await sits
    # between a check and the update it guards.
    def __init__(
        self,
        name: str,
        max_concurrency: int,
        max_queue: int,
        queue_timeout: float,
        observer: StageObserver | None = None,
    ) -> None:
        self.name = name
        self._max_concurrency = max_concurrency
        self._max_queue = max_queue
        self._queue_timeout = queue_timeout
        self._in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.observer = observer
        self.on_wait: Callable[[str, float], None] | None = None

    def resize(self, max_concurrency: int, max_queue: int, queue_timeout: float) -> None:
        self._max_concurrency = max_concurrency
        self._max_queue = max_queue
        self._queue_timeout = queue_timeout
        self._wake()

    def stats(self) -> StageStats:
        return StageStats(
            self.name,
            self._in_use,
            sum(1 for w in self._waiters if not w.done()),
            self._max_concurrency,
            self._max_queue,
        )

    @property
    def queue_timeout(self) -> float:
        return self._queue_timeout

    def _note(self, holder: str, kind: str) -> None:
        if self.observer is not None:
            self.observer(StageEvent(self.name, holder, kind, time.monotonic()))

    async def acquire(self, holder: str = "") -> bool:
        """Take a slot; True when it had to queue for it (time passed meanwhile)."""
        if self._in_use < self._max_concurrency and not self._waiters:
            self._in_use += 1
            self._note(holder, "acquire")
            if self.on_wait is not None:
                self.on_wait(self.name, 0.0)
            return False
        if len(self._waiters) >= self._max_queue:
            self._note(holder, "reject")
            raise QueueFull(self.name, retry_after=self._queue_timeout or 1.0)
        started = time.monotonic()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._note(holder, "wait")
        try:
            async with asyncio.timeout(self._queue_timeout):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                # Granted as we were cancelled or timed out: give it back.
                self._in_use -= 1
                self._wake()
            else:
                waiter.cancel()
                self._discard(waiter)
            if isinstance(exc, TimeoutError):
                self._note(holder, "reject")
                raise QueueTimeout(self.name, retry_after=self._queue_timeout or 1.0) from exc
            raise
        self._note(holder, "acquire")
        if self.on_wait is not None:
            self.on_wait(self.name, time.monotonic() - started)
        return True

    def release(self, holder: str = "") -> None:
        self._in_use -= 1
        self._note(holder, "release")
        self._wake()

    def _discard(self, waiter: asyncio.Future[None]) -> None:
        with suppress(ValueError):
            self._waiters.remove(waiter)

    def _wake(self) -> None:
        while self._waiters and self._in_use < self._max_concurrency:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._in_use += 1

    @asynccontextmanager
    async def slot(self, holder: str = "") -> AsyncIterator[bool]:
        """Hold a slot; the value says whether the holder queued for it."""
        queued = await self.acquire(holder)
        try:
            yield queued
        finally:
            self.release(holder)
