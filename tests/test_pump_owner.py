"""The runtime owns each pump task's end: however the task ends, its stream
ends and leaves the table, even when the task was cancelled before it ran a
single step (its own cleanup never ran then)."""

from __future__ import annotations

import asyncio

import pytest

from proxy.errors import ProxyError, ShuttingDown, UpstreamBroken
from proxy.stream import Stream
from tests.conftest import RunningProxy


@pytest.mark.parametrize(("draining", "error"), [(False, UpstreamBroken), (True, ShuttingDown)])
async def test_a_pump_cancelled_before_its_first_step_ends_and_unpublishes_its_stream(
    proxy: RunningProxy, draining: bool, error: type[ProxyError]
) -> None:
    rt = proxy.runtime
    settings = rt.snapshot.loaded.policy.stream
    stream, joined = rt.table.join_or_publish(
        "k", lambda: Stream("k", settings, cancel_on_abandon=False)
    )
    assert not joined and list(rt.table) == [stream]
    steps: list[str] = []

    async def pump() -> None:
        steps.append("ran")

    rt.start_pump(stream, pump())
    assert stream.pump is not None
    rt.draining = draining
    try:
        stream.pump.cancel()  # before the task's first step
        async with asyncio.timeout(5):
            await asyncio.shield(stream.finished)
    finally:
        rt.draining = False
    assert steps == []
    assert isinstance(stream.head.exception(), error)
    assert len(rt.table) == 0
    assert not rt.pumps


async def test_a_stream_abandoned_by_its_last_reader_is_replaced_at_once(
    proxy: RunningProxy,
) -> None:
    rt = proxy.runtime
    settings = rt.snapshot.loaded.policy.stream
    gate = asyncio.Event()

    def make() -> Stream:
        return Stream("k", settings, cancel_on_abandon=True)

    async def pump() -> None:
        await gate.wait()

    first, _ = rt.table.join_or_publish("k", make)
    rt.start_pump(first, pump())
    first.attach()
    first.detach()
    assert first.abandoned  # the last reader left: the call is cancelled
    # A request arriving this instant starts afresh rather than joining it.
    second, joined = rt.table.join_or_publish("k", make)
    assert not joined and second is not first
    assert list(rt.table) == [second]
    async with asyncio.timeout(5):
        await asyncio.shield(first.finished)
    assert list(rt.table) == [second]  # the old stream's end removed only itself
    rt.table.unpublish(second)
