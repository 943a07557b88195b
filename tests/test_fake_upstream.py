"""The fake upstream seen by the real OpenAI SDK, sync and async, on loopback.

Other tests trust the fake to speak OpenAI's wire format and to be
deterministic; these tests hold it to that.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from proxy.testing.fake_upstream import FakeUpstream

MESSAGES: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
        },
    }
]


@pytest.fixture
async def client(fake: FakeUpstream) -> AsyncIterator[openai.AsyncOpenAI]:
    # No retries: a 429 or 500 must reach the test, not wait out Retry-After.
    sdk = openai.AsyncOpenAI(base_url=fake.base_url, api_key="sk-test", max_retries=0)
    try:
        yield sdk
    finally:
        await sdk.close()


async def _until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.002)


async def _post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> bytes:
    async with session.post(url, json=body) as response:
        return await response.read()


async def _raw_events(response: aiohttp.ClientResponse, count: int | None = None) -> list[bytes]:
    """SSE events as framed on the wire; stops after `count` when given."""
    events: list[bytes] = []
    buffer = b""
    async for data in response.content.iter_any():
        buffer += data
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            events.append(event)
            if count is not None and len(events) == count:
                return events
    return events


async def test_chat_stream_and_non_stream_agree(client: openai.AsyncOpenAI) -> None:
    whole = await client.chat.completions.create(model="m", messages=MESSAGES)
    stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert whole.object == "chat.completion" and whole.model == "m"
    assert whole.choices[0].message.content == text and text.startswith("tok")
    assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert {c.system_fingerprint for c in chunks} == {"fp_fake"}
    assert whole.usage is not None and whole.usage.completion_tokens == 8
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 8
    again = await client.chat.completions.create(model="m", messages=MESSAGES)
    other = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Something else"}]
    )
    assert again.choices[0].message.content == text
    assert other.choices[0].message.content != text
    assert again.id != whole.id


async def test_sync_client_in_a_thread(fake: FakeUpstream) -> None:
    # The server runs on this loop, so the blocking client runs in a thread.
    def call() -> tuple[str, str]:
        with openai.OpenAI(base_url=fake.base_url, api_key="sk-t", max_retries=0) as sdk:
            whole = sdk.chat.completions.create(model="m", messages=MESSAGES)
            parts = sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
            return whole.choices[0].message.content or "", text

    whole, streamed = await asyncio.to_thread(call)
    assert whole == streamed and whole


async def test_tools_answer_with_a_tool_call(client: openai.AsyncOpenAI) -> None:
    whole = await client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"location"}
    stream = await client.chat.completions.create(
        model="m", messages=MESSAGES, tools=TOOLS, stream=True
    )
    fragments: list[str] = []
    ids: list[str] = []
    finish = None
    async for chunk in stream:
        for tool_call in chunk.choices[0].delta.tool_calls or ():
            assert tool_call.index == 0
            ids += [tool_call.id] if tool_call.id else []
            fragments.append((tool_call.function and tool_call.function.arguments) or "")
        finish = chunk.choices[0].finish_reason or finish
    assert ids == [call.id] and finish == "tool_calls"
    assert fragments[0] == "" and len(fragments) > 3
    assert "".join(fragments) == call.function.arguments
    plain = await client.chat.completions.create(
        model="m", messages=MESSAGES, tools=TOOLS, tool_choice="none"
    )
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content


async def test_n2_interleaves_choices(client: openai.AsyncOpenAI) -> None:
    whole = await client.chat.completions.create(model="m", messages=MESSAGES, n=2)
    assert [c.index for c in whole.choices] == [0, 1]
    texts = [c.message.content for c in whole.choices]
    assert texts[0] != texts[1]
    stream = await client.chat.completions.create(model="m", messages=MESSAGES, n=2, stream=True)
    order: list[int] = []
    streamed = ["", ""]
    async for chunk in stream:
        (part,) = chunk.choices
        order.append(part.index)
        streamed[part.index] += part.delta.content or ""
    assert streamed == texts
    assert order[:4] == [0, 1, 0, 1]
    assert whole.usage is not None and whole.usage.completion_tokens == 16


async def test_logprobs_in_stream_and_whole(client: openai.AsyncOpenAI) -> None:
    whole = await client.chat.completions.create(model="m", messages=MESSAGES, logprobs=True)
    logprobs = whole.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert "".join(t.token for t in logprobs.content) == whole.choices[0].message.content
    assert all(t.bytes == list(t.token.encode()) and t.logprob <= 0 for t in logprobs.content)
    stream = await client.chat.completions.create(
        model="m", messages=MESSAGES, logprobs=True, stream=True
    )
    streamed = []
    async for chunk in stream:
        part = chunk.choices[0]
        if part.delta.content:
            assert part.logprobs is not None and part.logprobs.content is not None
            streamed += part.logprobs.content
    assert streamed == logprobs.content


async def test_include_usage_and_length(client: openai.AsyncOpenAI) -> None:
    whole = await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 3
    stream = await client.chat.completions.create(
        model="m",
        messages=MESSAGES,
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == whole.choices[0].message.content


async def test_usage_null_on_the_wire(fake: FakeUpstream) -> None:
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{fake.base_url}/chat/completions", json=body) as response:
            plain = await _raw_events(response)
        usage = {**body, "stream_options": {"include_usage": True}}
        async with session.post(f"{fake.base_url}/chat/completions", json=usage) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            counted = await _raw_events(response)
    assert plain[-1] == counted[-1] == b"data: [DONE]"
    assert all("usage" not in orjson.loads(e[6:]) for e in plain[:-1])
    assert all(orjson.loads(e[6:])["usage"] is None for e in counted[:-2])
    assert len(counted) == len(plain) + 1


async def test_completions(client: openai.AsyncOpenAI) -> None:
    whole = await client.completions.create(model="m", prompt="Say hi")
    assert whole.object == "text_completion" and whole.choices[0].logprobs is None
    stream = await client.completions.create(
        model="m", prompt="Say hi", stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    two = await client.completions.create(model="m", prompt=["a", "b"], n=2, max_tokens=2)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert {c.finish_reason for c in two.choices} == {"length"}


async def test_embeddings_base64_and_float(client: openai.AsyncOpenAI, fake: FakeUpstream) -> None:
    default = await client.embeddings.create(model="e", input=["one", "two"])
    floats = await client.embeddings.create(
        model="e", input=["one", "two"], encoding_format="float"
    )
    assert [d.embedding for d in default.data] == [d.embedding for d in floats.data]
    assert [d.index for d in default.data] == [0, 1]
    assert default.data[0].embedding != default.data[1].embedding
    assert len(default.data[0].embedding) == 8 and default.usage.prompt_tokens == 2
    single = await client.embeddings.create(model="e", input="one", dimensions=5)
    assert len(single.data[0].embedding) == 5
    sent = orjson.loads(fake.requests[0].body)
    assert sent["encoding_format"] == "base64"  # the SDK's default
    async with aiohttp.ClientSession() as session:
        body = {"model": "e", "input": "one", "encoding_format": "base64"}
        async with session.post(f"{fake.base_url}/embeddings", json=body) as response:
            encoded = (await response.json())["data"][0]["embedding"]
    decoded = list(struct.unpack("<8f", base64.b64decode(encoded)))
    assert decoded == default.data[0].embedding


async def test_models(client: openai.AsyncOpenAI, fake: FakeUpstream) -> None:
    models = await client.models.list()
    assert "fake-model" in [m.id for m in models.data]
    one = await client.models.retrieve("my-model")
    assert one.id == "my-model" and one.object == "model"
    assert [r.method for r in fake.requests] == ["GET", "GET"]
    assert fake.total_calls == 0  # GETs are recorded, not counted as calls


async def test_responses_stream_and_whole(client: openai.AsyncOpenAI) -> None:
    whole = await client.responses.create(model="m", input="hello")
    assert whole.status == "completed" and whole.output_text.startswith("tok")
    assert whole.usage is not None and whole.usage.output_tokens == 8
    stream = await client.responses.create(model="m", input="hello", stream=True)
    events = [e async for e in stream]
    assert [e.type for e in events[:4]] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert [e.type for e in events[-5:]] == [
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) == 8 and "".join(deltas) == whole.output_text
    final = events[-1]
    assert final.type == "response.completed" and final.response.output_text == whole.output_text
    short = await client.responses.create(model="m", input="hello", max_output_tokens=2)
    assert short.status == "incomplete" and short.incomplete_details is not None


@pytest.mark.parametrize(
    ("status", "error"), [(429, openai.RateLimitError), (500, openai.InternalServerError)]
)
async def test_error_status(
    client: openai.AsyncOpenAI, fake: FakeUpstream, status: int, error: type[Exception]
) -> None:
    fake.settings = replace(fake.settings, error_status=status)
    with pytest.raises(error) as caught:
        await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert isinstance(caught.value, openai.APIStatusError)
    response = caught.value.response
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if status == 429:
        assert response.headers["retry-after"] == "1"
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
        assert body["error"]["code"] == "rate_limit_exceeded"
    else:
        assert body["error"]["type"] == "server_error"
    assert fake.total_calls == 1


async def test_require_key_and_unknown_path(fake: FakeUpstream) -> None:
    fake.settings = replace(fake.settings, require_key="sk-right")
    wrong = openai.AsyncOpenAI(base_url=fake.base_url, api_key="sk-wrong", max_retries=0)
    right = openai.AsyncOpenAI(base_url=fake.base_url, api_key="sk-right", max_retries=0)
    try:
        with pytest.raises(openai.AuthenticationError) as caught:
            await wrong.models.list()
        assert caught.value.code == "invalid_api_key"
        assert "sk-wrong" not in caught.value.response.text
        assert (await right.models.list()).data
        with pytest.raises(openai.NotFoundError) as missing:
            await right.get("/nowhere", cast_to=object)
        assert missing.value.response.json()["error"]["message"] == "Invalid URL (GET /v1/nowhere)"
    finally:
        await wrong.close()
        await right.close()


async def test_drop_after_breaks_the_stream(client: openai.AsyncOpenAI, fake: FakeUpstream) -> None:
    fake.settings = replace(fake.settings, drop_after=3)
    stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    received = []
    with pytest.raises(openai.APIError):
        async with asyncio.timeout(5):
            async for chunk in stream:
                received.append(chunk)
    assert len(received) == 3


async def test_hold_and_release(fake: FakeUpstream) -> None:
    fake.hold_after = 2
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    url = f"{fake.base_url}/chat/completions"
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
        async with asyncio.timeout(5):
            await fake.reached_hold.wait()
            first = await _raw_events(response, 2)  # written before the hold point
        assert fake.in_flight == 1 and fake.calls_for(body) == 1
        assert not response.content.at_eof()
        fake.release.set()
        async with asyncio.timeout(5):
            rest = await _raw_events(response)
    assert len(first) + len(rest) == 8 + 3  # role, tokens, finish, [DONE]
    assert rest[-1] == b"data: [DONE]"
    await _until(lambda: fake.in_flight == 0)


async def test_hold_counts_arrivals_and_disconnects(fake: FakeUpstream) -> None:
    fake.hold_after = 0
    body = {"model": "m", "messages": MESSAGES}
    async with aiohttp.ClientSession() as session:
        held = asyncio.create_task(_post(session, f"{fake.base_url}/chat/completions", body))
        async with asyncio.timeout(5):
            await fake.reached_hold.wait()  # a non-stream answer holds before it is sent
        assert fake.calls_for(body) == 1 and fake.in_flight == 1
        held.cancel()
        await _until(lambda: fake.in_flight == 0)
    assert fake.disconnects == 1


async def test_calls_counted_before_any_delay(fake: FakeUpstream) -> None:
    fake.settings = replace(fake.settings, header_delay=30)
    bodies = [{"model": "m", "messages": MESSAGES}, {"messages": MESSAGES, "model": "m"}]
    other = {"model": "m", "input": "x"}
    async with aiohttp.ClientSession() as session:
        tasks = [
            asyncio.create_task(_post(session, f"{fake.base_url}/chat/completions", body))
            for body in bodies
        ]
        tasks.append(asyncio.create_task(_post(session, f"{fake.base_url}/embeddings", other)))
        await _until(lambda: fake.total_calls == 3)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert fake.calls_for(bodies[0]) == 2  # key order does not matter
    assert fake.calls_for(other) == 1
    assert {r.path for r in fake.requests} == {"/v1/chat/completions", "/v1/embeddings"}
    assert fake.requests[0].headers["content-type"] == "application/json"
    fake.reset()
    assert fake.total_calls == 0 and fake.requests == []


async def test_header_overrides_and_control_endpoints(fake: FakeUpstream) -> None:
    url = f"http://127.0.0.1:{fake.port}"
    body = {"model": "m", "messages": MESSAGES}
    async with aiohttp.ClientSession() as session:
        headers = {"x-fake-tokens": "3"}
        async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
            assert (await r.json())["usage"]["completion_tokens"] == 3
        headers = {"x-fake-status": "503"}
        async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status == 503
        async with session.post(f"{url}/_fake/settings", json={"tokens": 2}) as r:
            assert r.status == 200 and (await r.json())["tokens"] == 2
        async with session.post(f"{url}/_fake/settings", json={"tokens": "x"}) as r:
            assert r.status == 400
        async with session.post(f"{url}/v1/chat/completions", json=body) as r:
            assert (await r.json())["usage"]["completion_tokens"] == 2
        async with session.get(f"{url}/_fake/stats") as r:
            stats = await r.json()
        assert stats["total"] == 3 and stats["by_path"] == {"/v1/chat/completions": 3}
        async with session.post(f"{url}/_fake/reset") as r:
            assert r.status == 200
    assert fake.total_calls == 0 and fake.settings.tokens == 2


def test_cli_workers_share_one_port() -> None:
    command = [sys.executable, "-m", "proxy.testing.fake_workers", "--port", "0", "--workers", "2"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert "(2 workers)" in line, line
            url = line.split()[4]
            client = openai.OpenAI(base_url=url, api_key="sk-t", max_retries=0)
            with client:
                texts = {
                    client.chat.completions.create(model="m", messages=MESSAGES)
                    .choices[0]
                    .message.content
                    for _ in range(4)
                }
            assert len(texts) == 1
        finally:
            proc.terminate()
            assert proc.wait(10) == 0


async def test_error_knob_headers_each_apply_to_one_request(fake: FakeUpstream) -> None:
    url = f"{fake.base_url}/chat/completions"
    body = {"model": "m", "messages": MESSAGES}
    other = {"model": "m", "messages": [{"role": "user", "content": "another prompt"}]}
    knobs = {
        "x-fake-status": "429",
        "x-fake-retry-after": "7",
        "x-fake-retry-after-ms": "6500",
        "x-fake-error-times": "2",
    }
    async with aiohttp.ClientSession() as session:

        async def call(payload: dict[str, Any]) -> tuple[int, dict[str, str]]:
            async with session.post(url, json=payload, headers=knobs) as r:
                await r.read()
                return r.status, dict(r.headers)

        first, second, third = [await call(body) for _ in range(3)]
        # The error count is the body's: another prompt starts its own.
        elsewhere = await call(other)
        async with session.post(url, json=body) as r:  # no knobs: the flags' settings
            plain = r.status
    assert [first[0], second[0], third[0], elsewhere[0], plain] == [429, 429, 200, 429, 200]
    assert (first[1]["Retry-After"], first[1]["retry-after-ms"]) == ("7", "6500")
    assert fake.errors_sent == 3


@pytest.mark.parametrize(
    ("header", "value", "expected"),
    [("x-fake-token-padding", "3", "tok"), ("x-fake-retry-after-ms", "soon", "not an integer")],
)
async def test_more_knob_headers(
    fake: FakeUpstream, header: str, value: str, expected: str
) -> None:
    body = {"model": "m", "messages": MESSAGES}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{fake.base_url}/chat/completions", json=body, headers={header: value}) as r,
    ):
        payload = await r.json()
    if r.status == 200:
        content = payload["choices"][0]["message"]["content"]
        words = content.split()
        assert all(w.startswith(expected) and w.endswith("...") for w in words), content
    else:
        assert (r.status, payload["error"]["code"]) == (400, "invalid_value")
        assert expected in payload["error"]["message"]


async def test_endless_header_never_ends_the_stream(fake: FakeUpstream) -> None:
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    headers = {"x-fake-endless": "events"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{fake.base_url}/chat/completions", json=body, headers=headers) as response,
    ):
        async with asyncio.timeout(5):
            events = await _raw_events(response, 50)  # far more than 8 tokens make
    assert len(events) == 50 and b"[DONE]" not in b"".join(events)


async def test_settings_errors_list_the_valid_keys_and_error_times_restarts(
    fake: FakeUpstream,
) -> None:
    base = f"http://127.0.0.1:{fake.port}"
    body = {"model": "m", "messages": MESSAGES}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/_fake/settings", json={"error_count": 1}) as r:
            message = (await r.json())["error"]["message"]
            assert r.status == 400
        assert "error_count" in message and "error_times" in message and "tokens" in message

        async def status() -> int:
            async with session.post(f"{base}/v1/chat/completions", json=body) as r:
                return r.status

        change = {"error_status": 503, "error_times": 1}
        async with session.post(f"{base}/_fake/settings", json=change) as r:
            assert r.status == 200
        assert [await status(), await status()] == [503, 200]
        # Setting error_times again gives the next call its error again.
        async with session.post(f"{base}/_fake/settings", json={"error_times": 1}) as r:
            assert r.status == 200
        assert [await status(), await status()] == [503, 200]
