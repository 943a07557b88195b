"""Stage limiters: bounds, queue overflow and timeout, cancellation, live resize."""

from __future__ import annotations

import asyncio

import pytest

from proxy.errors import QueueFull, QueueTimeout
from proxy.limiter import StageLimiter


async def _park(limiter: StageLimiter, holder: str, release: asyncio.Event) -> None:
    async with limiter.slot(holder):
        await release.wait()


async def _until(predicate, timeout: float = 2.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0)


async def test_full_queue_rejects_exactly_the_excess() -> None:
    limiter = StageLimiter("leader", max_concurrency=2, max_queue=3, queue_timeout=5)
    release = asyncio.Event()
    tasks = [asyncio.create_task(_park(limiter, f"h{i}", release)) for i in range(8)]
    await _until(lambda: sum(t.done() for t in tasks) == 3)
    rejected = [t for t in tasks if t.done()]
    assert all(isinstance(t.exception(), QueueFull) for t in rejected)
    assert limiter.stats().in_use == 2 and limiter.stats().queued == 3
    release.set()
    await asyncio.gather(*(t for t in tasks if t not in rejected))
    assert (limiter.stats().in_use, limiter.stats().queued) == (0, 0)


async def test_queue_timeout_is_503_and_leaves_no_waiter() -> None:
    limiter = StageLimiter("upstream", max_concurrency=1, max_queue=5, queue_timeout=0.05)
    release = asyncio.Event()
    holder = asyncio.create_task(_park(limiter, "a", release))
    await _until(lambda: limiter.stats().in_use == 1)
    with pytest.raises(QueueTimeout) as info:
        await limiter.acquire("b")
    assert info.value.status == 503 and info.value.retry_after is not None
    assert limiter.stats().queued == 0
    release.set()
    await holder
    assert limiter.stats().in_use == 0


async def test_cancelled_waiter_leaves_queue_and_granted_slot_is_given_back() -> None:
    limiter = StageLimiter("follower", max_concurrency=1, max_queue=5, queue_timeout=5)
    await limiter.acquire("a")
    waiter = asyncio.create_task(limiter.acquire("b"))
    await _until(lambda: limiter.stats().queued == 1)
    # Grant the slot and cancel the waiter in the same loop iteration.
    limiter.release("a")
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (limiter.stats().in_use, limiter.stats().queued) == (0, 0)
    await limiter.acquire("c")
    plain = asyncio.create_task(limiter.acquire("d"))
    await _until(lambda: limiter.stats().queued == 1)
    plain.cancel()
    with pytest.raises(asyncio.CancelledError):
        await plain
    assert (limiter.stats().in_use, limiter.stats().queued) == (1, 0)
    limiter.release("c")
    assert limiter.stats().in_use == 0


async def test_grow_admits_waiters_at_once_and_shrink_lets_holders_finish() -> None:
    limiter = StageLimiter("leader", max_concurrency=1, max_queue=10, queue_timeout=5)
    release = asyncio.Event()
    tasks = [asyncio.create_task(_park(limiter, f"h{i}", release)) for i in range(4)]
    await _until(lambda: limiter.stats().queued == 3)
    limiter.resize(max_concurrency=3, max_queue=10, queue_timeout=5)
    assert limiter.stats().in_use == 3 and limiter.stats().queued == 1
    limiter.resize(max_concurrency=1, max_queue=10, queue_timeout=5)
    assert limiter.stats().in_use == 3  # current holders keep their slots
    release.set()
    await asyncio.gather(*tasks)
    assert (limiter.stats().in_use, limiter.stats().queued) == (0, 0)
