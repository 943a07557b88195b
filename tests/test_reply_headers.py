"""Which upstream headers a reply keeps, on each path: lead, follow, hit.

The rule (README, "Upstream dialects"): a reply relayed in the upstream's
own mode keeps the upstream's headers (hop-by-hop and framing aside); a
JSON reply built from a stream keeps them too, except the stream-only ones
(`Cache-Control: no-cache`, `X-Accel-Buffering`), and says
`application/json`; a cache hit keeps only what describes the answer (its
content type), never the headers of the call that once made it (rate-limit
counters, processing time, upstream request ids), and adds `Age`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import RunningProxy, StartProxy, post, wait_readers

POLICY = {"routes": [{"match": {"path": "/v1/*"}, "upstream": "fake", "cache": {"ttl": "1h"}}]}
STREAM_ONLY = ("cache-control", "x-accel-buffering")
PER_CALL = "openai-processing-ms"  # the fake sends it on every answer, as OpenAI does


def _chat(prompt: str, stream: bool) -> dict[str, Any]:
    return {"model": "m", "stream": stream, "messages": [{"role": "user", "content": prompt}]}


@pytest.fixture
async def proxy(start_proxy: StartProxy) -> RunningProxy:
    return await start_proxy(POLICY)


def _is_json_reply(headers: CIMultiDict[str]) -> None:
    assert headers["Content-Type"] == "application/json"
    for name in STREAM_ONLY:
        assert name not in headers, name


def _is_sse_reply(headers: CIMultiDict[str]) -> None:
    assert headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert headers["Cache-Control"] == "no-cache"


async def test_a_leaders_reply_keeps_the_upstreams_headers_but_not_a_streams_on_json(
    proxy: RunningProxy,
) -> None:
    async with aiohttp.ClientSession() as session:
        url = proxy.base_url + "/chat/completions"
        status, headers, _ = await post(session, url, _chat("lead json", stream=False))
        assert status == 200 and headers["x-llm-sidecar"] == "lead"
        _is_json_reply(headers)
        assert headers[PER_CALL] == "1"  # the call that answered is this one
        status, headers, _ = await post(session, url, _chat("lead sse", stream=True))
        assert status == 200 and headers["x-llm-sidecar"] == "lead"
        _is_sse_reply(headers)
        assert headers["X-Accel-Buffering"] == "no" and headers[PER_CALL] == "1"
        embedding = {"model": "m", "input": "lead plain"}
        status, headers, _ = await post(session, proxy.base_url + "/embeddings", embedding)
        assert status == 200 and headers[PER_CALL] == "1"
        _is_json_reply(headers)


async def _lead_and_follow(
    proxy: RunningProxy, fake: FakeUpstream, prompt: str, lead_stream: bool
) -> tuple[CIMultiDict[str], CIMultiDict[str]]:
    """A leader in one mode and a follower in the other, on one upstream call."""
    url = proxy.base_url + "/chat/completions"
    fake.hold_after = 1
    async with aiohttp.ClientSession() as session:
        leader = asyncio.ensure_future(post(session, url, _chat(prompt, stream=lead_stream)))
        try:
            async with asyncio.timeout(10):
                await fake.reached_hold.wait()
            follower = asyncio.ensure_future(post(session, url, _chat(prompt, not lead_stream)))
            await wait_readers(proxy, 2)
        finally:
            fake.hold_after = None
            fake.release.set()
        async with asyncio.timeout(10):
            (_, lead_headers, _), (status, headers, _) = await asyncio.gather(leader, follower)
    assert status == 200 and lead_headers["x-llm-sidecar"] == "lead"
    assert headers["x-llm-sidecar"] == "follow"
    return lead_headers, headers


async def test_a_json_follower_of_a_stream_gets_json_headers(
    proxy: RunningProxy, fake: FakeUpstream
) -> None:
    lead_headers, headers = await _lead_and_follow(proxy, fake, "follow json", lead_stream=True)
    _is_sse_reply(lead_headers)
    _is_json_reply(headers)
    assert headers[PER_CALL] == "1"  # the shared call's, which answered this reader too


async def test_a_streaming_follower_of_a_plain_call_gets_stream_headers(
    proxy: RunningProxy, fake: FakeUpstream
) -> None:
    lead_headers, headers = await _lead_and_follow(proxy, fake, "follow sse", lead_stream=False)
    _is_json_reply(lead_headers)
    _is_sse_reply(headers)  # the answer re-chunked: a stream, said so
    assert headers[PER_CALL] == "1"


@pytest.mark.parametrize("first_stream", [True, False])
async def test_a_hit_keeps_its_content_type_and_no_header_of_the_call_that_made_it(
    proxy: RunningProxy, first_stream: bool
) -> None:
    url = proxy.base_url + "/chat/completions"
    prompt = f"hit after stream={first_stream}"
    async with aiohttp.ClientSession() as session:
        await post(session, url, _chat(prompt, stream=first_stream))
        async with asyncio.timeout(5):
            await proxy.runtime.cache.flush()
        status, headers, _ = await post(session, url, _chat(prompt, stream=False))
        assert status == 200 and headers["x-llm-sidecar"] == "hit"
        _is_json_reply(headers)
        assert PER_CALL not in headers and "Age" in headers
        # Recorded events replay, a recorded body is re-chunked: a stream either way.
        status, headers, _ = await post(session, url, _chat(prompt, stream=True))
        assert status == 200 and headers["x-llm-sidecar"] == "hit"
        _is_sse_reply(headers)
        assert PER_CALL not in headers and "X-Accel-Buffering" not in headers
