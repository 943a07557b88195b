"""Graceful shutdown of a real proxy process on SIGTERM.

Readiness flips first; the listener closes after `accept_delay`; streams in
flight finish within `drain_timeout`; a stream still running at the deadline
ends with an error event; the process exits 0 either way.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import until
from tests.proxy_process import ProxyProcess, policy_for, run_proxy


def shutdown(accept_delay: str, drain_timeout: str) -> dict[str, Any]:
    return {"shutdown": {"accept_delay": accept_delay, "drain_timeout": drain_timeout}}


async def read_stream(session: aiohttp.ClientSession, url: str, prompt: str) -> list[bytes]:
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": prompt}]}
    async with session.post(f"{url}/chat/completions", json=body) as response:
        assert response.status == 200
        return [line async for line in response.content if line.startswith(b"data: ")]


async def refused(px: ProxyProcess) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", px.port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def test_sigterm_drains_open_streams_then_exits_zero(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.hold_after = 2
    async with run_proxy(tmp_path, policy_for(fake, shutdown("300ms", "10s"))) as px:
        await px.wait_ready()
        streams = [
            asyncio.create_task(read_stream(px.session, px.api, f"drain {n}")) for n in range(4)
        ]
        await until(lambda: fake.in_flight == 4)
        await px.until_status(lambda s: len(s["streams"]) == 4)

        px.signal(signal.SIGTERM)
        async with asyncio.timeout(5):
            while (await px.get("/readyz"))[0] != 503:
                await asyncio.sleep(0.01)
        # Streams are still held open upstream: readiness flipped first.
        assert not any(task.done() for task in streams)
        async with asyncio.timeout(5):
            while not await refused(px):
                await asyncio.sleep(0.02)
        assert not any(task.done() for task in streams)

        fake.release.set()
        async with asyncio.timeout(10):
            results = await asyncio.gather(*streams)
        for events in results:
            assert events[-1] == b"data: [DONE]\n"
            assert not any(b'"error"' in event for event in events)
        assert await px.wait_exit() == 0
        [end] = px.events("drain end")
        assert end["drained"] is True
        assert end["cancelled_streams"] == 0
        assert [line["msg"] for line in px.log_lines() if line["logger"].endswith("lifecycle")] == [
            "start",
            "drain start",
            "drain end",
            "stop",
        ]


async def test_a_stream_past_the_drain_deadline_ends_with_an_error_event(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.hold_after = 2  # never released while the proxy lives
    async with run_proxy(tmp_path, policy_for(fake, shutdown("0s", "500ms"))) as px:
        await px.wait_ready()
        stream = asyncio.create_task(read_stream(px.session, px.api, "stuck"))
        await until(lambda: fake.in_flight == 1)
        await px.until_status(lambda s: len(s["streams"]) == 1)

        px.signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            events = await stream
        assert await px.wait_exit() == 0
        # What was produced arrived, then one error event the SDK raises on.
        assert len(events) == 3
        error = orjson.loads(events[-1].removeprefix(b"data: "))
        assert error["error"]["code"] == "proxy_shutting_down"
        [end] = px.events("drain end")
        assert end["drained"] is False
        assert end["cancelled_streams"] == 1


async def test_a_second_sigterm_skips_the_wait(fake: FakeUpstream, tmp_path: Path) -> None:
    fake.hold_after = 1
    async with run_proxy(tmp_path, policy_for(fake, shutdown("30s", "30s"))) as px:
        await px.wait_ready()
        stream = asyncio.create_task(read_stream(px.session, px.api, "impatient"))
        await px.until_status(lambda s: len(s["streams"]) == 1)
        px.signal(signal.SIGTERM)
        async with asyncio.timeout(5):
            while (await px.get("/readyz"))[0] != 503:
                await asyncio.sleep(0.01)
        px.signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            events = await stream
        assert await px.wait_exit(timeout=10) == 0
        assert b"proxy_shutting_down" in events[-1]
        [end] = px.events("drain end")
        assert (end["drained"], end["cancelled_streams"]) == (False, 1)
