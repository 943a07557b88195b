"""Edges of the mode rules a new user found: what a stream holds decides its
conversion, and a plain caller never gets a refusal meant for a stream.

A leader that queued may find an answer of the other mode in the cache (put
there by another sidecar sharing Redis); a `stream: false` follower of a
streamed call the upstream refused asks on its own. Each answer is compared
with what the same call returns direct, with the real SDK.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

import openai
import orjson
import pytest

from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import RunningProxy, StartProxy, wait_idle, wait_readers
from tests.redis_server import RedisServer
from tests.test_modes import STREAMING, _plain, _post_raw, _streamed


def _shared_redis(redis: RedisServer, **extra: Any) -> dict[str, Any]:
    route = {"match": {"path": "/v1/*"}, "upstream": "fake", "cache": {"ttl": "1h"}}
    cache = {"backend": "redis", "url": f"redis://127.0.0.1:{redis.port}/0"}
    return {"cache": cache, "routes": [route], **extra}


@pytest.mark.parametrize("name", STREAMING)
async def test_a_queued_streaming_leader_that_finds_a_plain_answer_gets_it_rechunked(
    fake: FakeUpstream, start_proxy: StartProxy, redis_server: RedisServer, name: str
) -> None:
    one_leader = {
        "stages": {"leader": {"max_concurrency": 1, "max_queue": 8, "queue_timeout": "10s"}}
    }
    here = await start_proxy(_shared_redis(redis_server, **one_leader))
    elsewhere = await start_proxy(_shared_redis(redis_server))
    leader_stage = here.runtime.stages.leader
    async with (
        openai.AsyncOpenAI(base_url=fake.base_url, api_key="sk-t", max_retries=0) as direct,
        openai.AsyncOpenAI(base_url=here.base_url, api_key="sk-t", max_retries=0) as proxied,
        openai.AsyncOpenAI(base_url=elsewhere.base_url, api_key="sk-t", max_retries=0) as other,
    ):
        async with leader_stage.slot("the test"):  # the only leader slot, tied up
            streaming = asyncio.create_task(_streamed(proxied, name))
            async with asyncio.timeout(10):
                while leader_stage.stats().queued != 1:
                    await asyncio.sleep(0.005)
            # Another sidecar sharing Redis answers a plain caller meanwhile.
            await _plain(other, name)
            async with asyncio.timeout(5):
                await elsewhere.runtime.cache.flush()
        async with asyncio.timeout(10):
            got = await streaming
        assert fake.total_calls == 1  # the queued leader took the cached answer
        assert got == await _streamed(direct, name)
    await wait_idle(here.runtime)


@pytest.mark.parametrize("refuse", ["stream", "stream_options"])
@pytest.mark.parametrize("name", ["chat", "responses"])
async def test_plain_followers_of_a_refused_stream_ask_plain_as_direct(
    fake: FakeUpstream, start_proxy: StartProxy, name: str, refuse: str
) -> None:
    fake.settings = replace(fake.settings, refuse=refuse)
    stages = {"leader": {"max_concurrency": 1, "max_queue": 8, "queue_timeout": "10s"}}
    proxy = await start_proxy({"stages": stages})
    leader_stage = proxy.runtime.stages.leader
    async with (
        openai.AsyncOpenAI(base_url=fake.base_url, api_key="sk-t", max_retries=0) as direct,
        openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-t", max_retries=0) as proxied,
    ):
        async with leader_stage.slot("the test"):  # the streamed call waits to be prepared
            streaming = asyncio.create_task(_streamed(proxied, name))
            plain = [asyncio.create_task(_plain(proxied, name)) for _ in range(2)]
            await wait_readers(proxy, 3)  # both plain callers follow the streamed call
        # The proxy adds no stream_options to a Responses stream: not refused.
        refused = refuse == "stream" or name != "responses"
        async with asyncio.timeout(10):
            answers = await asyncio.gather(*plain)
            if refused:
                with pytest.raises(openai.BadRequestError):
                    await streaming  # the refusal, to the caller who asked to stream
            else:
                await streaming
        # One refused streamed call, then one plain call both plain callers share.
        modes = [orjson.loads(r.body).get("stream") for r in fake.requests]
        assert modes == ([True, None] if refused else [True])
        expected = await _plain(direct, name)
        assert answers == [expected, expected]
    await wait_idle(proxy.runtime)


async def test_integers_wider_than_64_bits_key_apart(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    route = {"match": {"path": "/v1/*"}, "upstream": "fake", "cache": {"ttl": "1h"}}
    proxy = await start_proxy({"cache": {"backend": "memory"}, "routes": [route]})
    seeds = [2**70, 2**70 + 1]  # one float to a 64-bit parser: one key before the fix
    async with openai.AsyncOpenAI(
        base_url=proxy.base_url, api_key="sk-t", max_retries=0
    ) as proxied:
        for seed in seeds:
            await proxied.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "seeded"}], seed=seed
            )
    assert fake.total_calls == 2
    assert [json.loads(r.body)["seed"] for r in fake.requests] == seeds
    await wait_idle(proxy.runtime)


@pytest.mark.parametrize(
    ("options", "sent"),
    [
        (
            b'{ "include_obfuscation": false }',
            b'{"include_usage":true, "include_obfuscation": false }',
        ),
        (b"null", b'{"include_usage":true}'),
        (b'{"include_usage":  false}', b'{"include_usage":  true}'),
    ],
    ids=["other-option", "null", "usage-false"],
)
async def test_a_callers_own_stream_options_get_usage_spliced_into_its_bytes(
    fake: FakeUpstream, proxy: RunningProxy, options: bytes, sent: bytes
) -> None:
    head = b'{ "model" : "m",\n  "seed" : 1180591620717411303424,\t"stream": true,\n'
    tail = b',\n  "messages" : [ {"role":"user","content":"splice \\"}\\" here"} ] }'
    raw = head + b'  "stream_options" : ' + options + tail
    status, _ = await _post_raw(proxy.base_url + "/chat/completions", raw)
    assert status == 200
    (request,) = fake.requests
    expected = head + b'  "stream_options" : ' + sent + tail
    assert request.body == expected
    await wait_idle(proxy.runtime)
