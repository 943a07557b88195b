"""Invariant 6 under a seeded storm: faults, disconnects, overflow, all at once.

Every request either gets an answer or its caller leaves; afterwards every
stage's in-use and queued counts are zero, the table is empty, no pump is
left, and the fake upstream has no handler still running.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiohttp
import pytest

from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import StartProxy, until, wait_idle

FAULTS: list[dict[str, str]] = [
    {},
    {},
    {"x-fake-drop-after": "3"},
    {"x-fake-status": "500"},
    {"x-fake-status": "429"},
    {"x-fake-token-delay": "0.02"},
    {"x-fake-ttft": "0.2"},
]


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("on_abandon", ["finish", "cancel"])
async def test_stage_counts_return_to_zero_after_a_storm(
    fake: FakeUpstream, start_proxy: StartProxy, seed: int, on_abandon: str
) -> None:
    rng = random.Random(seed)
    proxy = await start_proxy(
        {
            "stages": {
                "leader": {"max_concurrency": 3, "max_queue": 6, "queue_timeout": "300ms"},
                "follower": {"max_concurrency": 4, "max_queue": 8, "queue_timeout": "300ms"},
                "upstream": {"max_concurrency": 3, "max_queue": 6, "queue_timeout": "500ms"},
            },
            "stream": {"write_high_water": "2KiB"},
            "routes": [
                {
                    "match": {"path": "/v1/*"},
                    "upstream": "fake",
                    "on_abandon": on_abandon,
                    "cache": {"ttl": "1h"},
                }
            ],
        }
    )
    statuses: list[int | str] = []

    async def one(session: aiohttp.ClientSession, n: int) -> None:
        body: dict[str, Any] = {
            "model": "m",
            "messages": [{"role": "user", "content": f"storm {rng.randrange(8)}"}],
            "stream": rng.random() < 0.6,
        }
        headers = dict(rng.choice(FAULTS))
        headers["Authorization"] = f"Bearer sk-{rng.randrange(2)}"
        if rng.random() < 0.2:
            headers["Cache-Control"] = rng.choice(["no-cache", "no-store"])
        leave_after = rng.choice([None, None, 0.0, 0.05, 0.15])
        try:
            async with asyncio.timeout(leave_after):
                async with session.post(
                    f"{proxy.base_url}/chat/completions", json=body, headers=headers
                ) as response:
                    await response.read()
                    statuses.append(response.status)
        except TimeoutError:
            statuses.append("left")  # the caller gave up and went away
        except aiohttp.ClientError as exc:
            # The proxy never cuts a caller it is answering: this is a bug.
            statuses.append(f"cut: {exc!r}")

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for wave in range(4):
            await asyncio.gather(*(one(session, wave * 40 + i) for i in range(40)))
    assert len(statuses) == 160
    assert set(statuses) <= {200, 429, 500, 502, 503, "left"}, set(statuses)
    assert statuses.count(200) > 0
    await wait_idle(proxy.runtime, timeout=10)
    await until(lambda: fake.in_flight == 0)
