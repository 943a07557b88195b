"""The relay seen by the real OpenAI SDK: identical results through the proxy
and directly against the fake, and every error path as OpenAI-style JSON."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from multidict import CIMultiDict

from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import RunningProxy, StartProxy, wait_idle

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
        },
    }
]
VOLATILE = ("id", "created")


@pytest.fixture
async def clients(
    fake: FakeUpstream, proxy: RunningProxy
) -> AsyncIterator[tuple[openai.AsyncOpenAI, openai.AsyncOpenAI]]:
    direct = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{fake.port}/v1", api_key="sk-t", max_retries=0
    )
    proxied = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-t", max_retries=0)
    try:
        yield direct, proxied
    finally:
        await direct.close()
        await proxied.close()


def _stable(obj: Any) -> Any:
    data = obj.model_dump() if hasattr(obj, "model_dump") else obj
    return {k: v for k, v in data.items() if k not in VOLATILE}


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"tools": TOOLS},
        {"n": 2},
        {"logprobs": True},
        {"max_tokens": 3},
    ],
    ids=["plain", "tools", "n2", "logprobs", "length"],
)
async def test_chat_non_stream_identical(
    clients: tuple[openai.AsyncOpenAI, openai.AsyncOpenAI], kwargs: dict[str, Any]
) -> None:
    direct, proxied = clients
    a = await direct.chat.completions.create(model="m", messages=MESSAGES, **kwargs)
    b = await proxied.chat.completions.create(model="m", messages=MESSAGES, **kwargs)
    assert _stable(a) == _stable(b)
    if "tools" in kwargs:
        assert b.choices[0].message.tool_calls and b.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"tools": TOOLS}, {"n": 2}, {"stream_options": {"include_usage": True}}],
    ids=["plain", "tools", "n2", "usage"],
)
async def test_chat_stream_identical(
    clients: tuple[openai.AsyncOpenAI, openai.AsyncOpenAI], kwargs: dict[str, Any]
) -> None:
    direct, proxied = clients
    a = [
        _stable(c)
        async for c in await direct.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, **kwargs
        )
    ]
    b = [
        _stable(c)
        async for c in await proxied.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, **kwargs
        )
    ]
    assert a == b and len(a) > 2


async def test_sync_client(fake: FakeUpstream, proxy: RunningProxy) -> None:
    # The servers run on this loop, so the blocking client runs in a thread.
    def call() -> tuple[str, str]:
        with openai.OpenAI(base_url=proxy.base_url, api_key="sk-t", max_retries=0) as client:
            whole = client.chat.completions.create(model="m", messages=MESSAGES)
            parts = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
            return whole.choices[0].message.content or "", text

    whole, streamed = await asyncio.to_thread(call)
    assert whole == streamed and whole


async def test_completions_embeddings_models_responses(
    clients: tuple[openai.AsyncOpenAI, openai.AsyncOpenAI],
) -> None:
    direct, proxied = clients
    a = await direct.completions.create(model="m", prompt="Say hi")
    b = await proxied.completions.create(model="m", prompt="Say hi")
    assert _stable(a) == _stable(b)
    sa = [
        _stable(c)
        async for c in await direct.completions.create(model="m", prompt="hi", stream=True)
    ]
    sb = [
        _stable(c)
        async for c in await proxied.completions.create(model="m", prompt="hi", stream=True)
    ]
    assert sa == sb
    ea = await direct.embeddings.create(model="e", input=["one", "two"])  # base64 by default
    eb = await proxied.embeddings.create(model="e", input=["one", "two"])
    assert ea.model_dump() == eb.model_dump()
    ma = await direct.models.list()
    mb = await proxied.models.list()
    assert [m.id for m in ma.data] == [m.id for m in mb.data]
    ra = await direct.responses.create(model="m", input="hello")
    rb = await proxied.responses.create(model="m", input="hello")
    assert ra.output_text == rb.output_text and rb.output_text
    events = [
        e.type async for e in await proxied.responses.create(model="m", input="hello", stream=True)
    ]
    assert events[-1] == "response.completed"


async def _raw(
    url: str, method: str = "POST", data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, CIMultiDict[str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, data=data, headers=headers) as response,
    ):
        return response.status, CIMultiDict(response.headers), await response.read()


def _error(body: bytes, headers: CIMultiDict[str] | None = None) -> dict[str, Any]:
    if headers is not None:  # an answer the proxy made itself says so
        assert headers["x-llm-sidecar"] == "error"
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


async def test_body_over_limit_is_413_without_reading_it(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy({"limits": {"max_body_bytes": "1KiB"}})
    big = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]})
    status, headers, body = await _raw(
        f"{proxy.base_url}/chat/completions", data=big, headers={"Content-Type": "application/json"}
    )
    assert status == 413 and _error(body, headers)["code"] == "request_too_large"

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 500

    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{proxy.base_url}/chat/completions", data=chunked()) as response,
    ):
        assert response.status == 413
    assert fake.total_calls == 0


async def test_malformed_json_is_400(fake: FakeUpstream, proxy: RunningProxy) -> None:
    status, headers, body = await _raw(
        f"{proxy.base_url}/chat/completions",
        data=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert status == 400 and _error(body, headers)["type"] == "invalid_request_error"
    status, _, _ = await _raw(f"{proxy.base_url}/chat/completions", data=b"[1, 2]")
    assert status == 400
    assert fake.total_calls == 0


async def test_no_route_is_404_from_the_proxy(fake: FakeUpstream, proxy: RunningProxy) -> None:
    # Every policy ends with a "/v1/*" catch-all; the bare "/v1" is outside it.
    status, headers, body = await _raw(f"{proxy.base_url}", "GET")
    assert status == 404 and _error(body, headers)["code"] == "not_found"
    assert fake.total_calls == 0


async def test_unreachable_upstream_is_502(start_proxy: StartProxy) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: refused
        proxy = await start_proxy(
            {"upstreams": {"fake": {"base_url": f"http://127.0.0.1:{port}/v1"}}}
        )
        for path, method in (("/chat/completions", "POST"), ("/models", "GET")):
            data = orjson.dumps({"model": "m", "messages": []}) if method == "POST" else None
            status, headers, body = await _raw(f"{proxy.base_url}{path}", method, data)
            assert status == 502 and _error(body, headers)["code"] == "upstream_unavailable"
    await wait_idle(proxy.runtime)


async def test_no_headers_in_time_is_504(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = await start_proxy({"upstreams": {"fake": {"first_byte_timeout": "300ms"}}})
    fake.settings = replace(fake.settings, header_delay=2.0)
    status, headers, body = await _raw(
        f"{proxy.base_url}/chat/completions", data=orjson.dumps({"model": "m", "messages": []})
    )
    assert status == 504 and _error(body, headers)["code"] == "upstream_timeout"
    await wait_idle(proxy.runtime)


async def test_idle_stream_ends_with_error_event(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy({"upstreams": {"fake": {"idle_timeout": "300ms"}}})
    fake.settings = replace(fake.settings, tokens=6)
    fake.hold_after = 3  # never released: the upstream goes quiet mid-stream
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-t", max_retries=0)
    try:
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError, match="idle"):
            async with asyncio.timeout(10):
                async for _ in stream:
                    pass
    finally:
        await client.close()
    await wait_idle(proxy.runtime)


@pytest.mark.parametrize("status", [400, 401, 429, 500])
async def test_upstream_errors_pass_through_unchanged(
    fake: FakeUpstream, proxy: RunningProxy, status: int
) -> None:
    fake.settings = replace(fake.settings, error_status=status)
    body = orjson.dumps({"model": "m", "messages": MESSAGES})
    direct = await _raw(f"http://127.0.0.1:{fake.port}/v1/chat/completions", data=body)
    proxied = await _raw(f"{proxy.base_url}/chat/completions", data=body)
    assert proxied[0] == direct[0] == status
    assert proxied[2] == direct[2]
    if status == 429:
        assert proxied[1]["Retry-After"] == direct[1]["Retry-After"]
        assert proxied[1]["x-ratelimit-remaining-requests"] == "0"


async def test_header_hygiene_and_request_ids(fake: FakeUpstream, proxy: RunningProxy) -> None:
    headers = {
        "Authorization": "Bearer sk-caller",
        "Connection": "keep-alive, X-Hop",
        "X-Hop": "secret-hop",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic abc",
        "X-Custom": "kept",
        "X-Request-Id": "my-id-1",
    }
    status, out, _ = await _raw(f"{proxy.base_url}/models", "GET", headers=headers)
    assert status == 200 and out["X-Request-Id"] == "my-id-1" and out["x-llm-sidecar"] == "bypass"
    sent = fake.requests[-1].headers
    assert sent["authorization"] == "Bearer sk-caller"
    assert sent["x-custom"] == "kept" and sent["x-request-id"] == "my-id-1"
    for gone in ("x-hop", "keep-alive", "proxy-authorization"):
        assert gone not in sent
    status, out, _ = await _raw(
        f"{proxy.base_url}/chat/completions",
        data=orjson.dumps({"model": "m", "messages": MESSAGES}),
    )
    generated = out["X-Request-Id"]
    assert len(generated) == 32 and fake.requests[-1].headers["x-request-id"] == generated


async def test_injected_key_replaces_the_callers(
    fake: FakeUpstream, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLM_SIDECAR_TEST_KEY", "sk-injected")
    proxy = await start_proxy({"upstreams": {"fake": {"api_key_env": "LLM_SIDECAR_TEST_KEY"}}})
    for path, method, data in (
        ("/models", "GET", None),
        ("/chat/completions", "POST", orjson.dumps({"model": "m", "messages": MESSAGES})),
    ):
        status, _, _ = await _raw(
            f"{proxy.base_url}{path}",
            method,
            data,
            {"Authorization": "Bearer sk-caller", "api-key": "caller"},
        )
        assert status == 200
        sent = fake.requests[-1].headers
        assert sent["authorization"] == "Bearer sk-injected" and "api-key" not in sent
