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
from collections.abc import Callable, Coroutine
from contextlib import suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Any

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
        # Told of every slot that was waited for; a slot free at once is only
        # counted, which is all a wait of 0 s needs (the metrics fold it in).
        self.on_wait: Callable[[str, float], None] | None = None
        self.free_acquired = 0

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
            self.free_acquired += 1
            if self.observer is not None:
                self._note(holder, "acquire")
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

    def slot(self, holder: str = "") -> Slot:
        """`async with limiter.slot(holder) as queued:` holds one slot for the block;
        `queued` says whether the holder had to queue for it."""
        return Slot(self, holder)


class Slot:
    """One stage slot held for an `async with` block; released however the block ends.

    A class rather than `@asynccontextmanager`: every request takes two slots,
    and the generator machinery cost more than acquiring and releasing them.
    """

    __slots__ = ("_holder", "_limiter")

    def __init__(self, limiter: StageLimiter, holder: str) -> None:
        self._limiter = limiter
        self._holder = holder

    def __aenter__(self) -> Coroutine[Any, Any, bool]:
        # The acquire coroutine itself is what `async with` awaits: one frame fewer.
        return self._limiter.acquire(self._holder)

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._limiter.release(self._holder)
