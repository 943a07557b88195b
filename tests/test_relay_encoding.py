"""Content codings through the relay: responses pass through encoded, requests go up decoded.

Real servers on loopback: the fake upstream compresses its JSON with gzip
when asked (`x-fake-compress`) and the caller accepts it, with the
compressed Content-Length, as api.openai.com does; aiohttp's server decodes
a caller's gzip request body as it arrives.
"""

from __future__ import annotations

import gzip

import aiohttp
import openai
import orjson

from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import RunningProxy, StartProxy

COMPRESS = {"x-fake-compress": "gzip"}


async def test_a_compressed_response_passes_through_with_its_encoding_and_length(
    fake: FakeUpstream, proxy: RunningProxy
) -> None:
    direct = f"http://127.0.0.1:{fake.port}/v1/models"
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.get(direct, headers=COMPRESS) as response:
            upstream_body = await response.read()
        assert response.headers["Content-Encoding"] == "gzip"
        headers = {**COMPRESS, "Accept-Encoding": "gzip"}
        async with session.get(f"{proxy.base_url}/models", headers=headers) as response:
            raw = await response.read()
            assert response.status == 200
            assert response.headers["Content-Encoding"] == "gzip"
            assert int(response.headers["Content-Length"]) == len(raw)
        assert gzip.decompress(raw) == gzip.decompress(upstream_body)
        assert orjson.loads(gzip.decompress(raw))["object"] == "list"


async def test_a_caller_that_accepts_no_encoding_gets_none(
    fake: FakeUpstream, proxy: RunningProxy
) -> None:
    async with (
        aiohttp.ClientSession(auto_decompress=False, skip_auto_headers=["Accept-Encoding"]) as s,
        s.get(f"{proxy.base_url}/models", headers=COMPRESS) as response,
    ):
        raw = await response.read()
        assert "Content-Encoding" not in response.headers
        assert int(response.headers["Content-Length"]) == len(raw)
    assert orjson.loads(raw)["object"] == "list"
    assert "accept-encoding" not in fake.requests[-1].headers


async def test_the_sdk_lists_models_from_a_compressing_upstream(proxy: RunningProxy) -> None:
    client = openai.AsyncOpenAI(
        base_url=proxy.base_url, api_key="sk-a", max_retries=0, default_headers=COMPRESS
    )
    try:
        models = await client.models.list()
    finally:
        await client.close()
    assert [m.id for m in models.data] == ["fake-model", "gpt-4o-mini", "text-embedding-3-small"]


async def test_a_gzip_request_body_goes_upstream_decoded_with_a_true_length(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    relay_chat = {"match": {"path": "/v1/chat/completions"}, "upstream": "fake", "coalesce": False}
    proxy = await start_proxy(
        {"routes": [relay_chat, {"match": {"path": "/v1/*"}, "upstream": "fake"}]}
    )
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x " * 2000}]})
    packed = gzip.compress(body)
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{proxy.base_url}/chat/completions", data=packed, headers=headers) as r,
    ):
        answer = await r.json()
        assert r.status == 200 and r.headers["x-llm-sidecar"] == "bypass"
    assert answer["object"] == "chat.completion"
    received = fake.requests[-1]
    assert received.body == body
    assert "content-encoding" not in received.headers
    assert received.headers.get("content-length", str(len(body))) == str(len(body))
