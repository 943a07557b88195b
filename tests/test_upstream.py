"""The upstream body reader: idle means the upstream was quiet, not that we were busy."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import aiohttp
import pytest

from proxy.errors import UpstreamBroken
from proxy.policy import Upstream
from proxy.testing.fake_upstream import FakeUpstream
from proxy.upstream import UpstreamPool, read_chunks

BODY = {"model": "m", "messages": [{"role": "user", "content": "idle"}], "stream": True}


def _idle(seconds: float) -> Upstream:
    return Upstream(base_url="http://127.0.0.1:1/v1", idle_timeout=seconds)


async def test_a_slow_consumer_is_not_an_idle_upstream(fake: FakeUpstream) -> None:
    fake.settings = replace(fake.settings, tokens=5)
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{fake.base_url}/chat/completions", json=BODY) as response,
    ):
        received = b""
        async for chunk in read_chunks(response, _idle(0.1)):
            received += chunk
            await asyncio.sleep(0.25)  # longer than the idle timeout, on our side
    assert received.endswith(b"data: [DONE]\n\n")


async def test_a_quiet_upstream_is_cut_after_the_idle_timeout(fake: FakeUpstream) -> None:
    fake.hold_after = 2
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{fake.base_url}/chat/completions", json=BODY) as response,
    ):
        chunks = []
        with pytest.raises(UpstreamBroken, match="idle"):
            async with asyncio.timeout(5):
                async for chunk in read_chunks(response, _idle(0.2)):
                    chunks.append(chunk)
        assert chunks  # the events before the silence arrived


async def test_a_session_a_reload_replaced_closes_once_its_last_call_ends() -> None:
    old = Upstream(base_url="http://127.0.0.1:1/v1")
    new = Upstream(base_url="http://127.0.0.1:2/v1")
    pool = UpstreamPool()
    try:
        with pool.lease("a", old) as held:
            pool.retain({"a": new})  # a reload replaced the upstream mid-call
            assert not held.closed  # the call in flight keeps its session
            assert pool.session("a", new) is not held
        async with asyncio.timeout(5):
            while not held.closed:  # closed off the request path, in a task
                await asyncio.sleep(0)
        with pool.lease("a", new) as current:
            pass
        assert not current.closed  # the current configuration's session stays open
    finally:
        await pool.close()
    assert current.closed
