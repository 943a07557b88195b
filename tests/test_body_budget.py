"""The per-process budget of request bodies held at once (issue 12 follow-up).

Many large bodies at once each parsed and held for the whole upstream call
took RSS to gigabytes; the budget bounds the body bytes held, and a request
past it gets an OpenAI-style 503 with Retry-After.
"""

from __future__ import annotations

import asyncio

import aiohttp
import orjson

from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import StartProxy, wait_idle

BODY_LIMIT = 256 * 1024
IN_FLIGHT = 2 * BODY_LIMIT


def _body(n: int) -> bytes:
    # Distinct prompts: every request leads its own upstream call and holds its body.
    pad = "{}," * ((BODY_LIMIT - 200) // 3 - 1)
    return f'{{"model":"m","messages":[],"seed":{n},"x":[{pad}{{}}]}}'.encode()


async def test_bodies_past_the_budget_get_503_and_the_bytes_held_stay_bounded(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(
        {"limits": {"max_body_bytes": BODY_LIMIT, "max_body_bytes_in_flight": IN_FLIGHT}}
    )
    rt = proxy.runtime
    fake.hold_after = 0  # every upstream answer waits for the test's gate
    url = f"{proxy.base_url}/chat/completions"
    size = len(_body(0))
    assert BODY_LIMIT // 2 < size <= BODY_LIMIT

    async def one(session: aiohttp.ClientSession, n: int) -> tuple[int, bytes]:
        async with session.post(
            url, data=_body(n), headers={"Content-Type": "application/json"}
        ) as r:
            return r.status, await r.read()

    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(one(session, n)) for n in range(6)]
        async with asyncio.timeout(10):
            while rt.bodies.in_use < 2 * size or sum(t.done() for t in tasks) < 4:
                await asyncio.sleep(0.01)
        held = rt.bodies.in_use
        early = [t for t in tasks if t.done()]
        refused = [t.result() for t in early]
        fake.release.set()
        async with asyncio.timeout(10):
            admitted = await asyncio.gather(*[t for t in tasks if t not in early])
    assert held == 2 * size <= IN_FLIGHT
    assert len(refused) == 4
    for status, body in refused:
        assert status == 503
        assert orjson.loads(body)["error"]["code"] == "proxy_bodies_busy"
    assert [status for status, _ in admitted] == [200, 200]
    await wait_idle(rt)
    assert rt.bodies.in_use == 0
