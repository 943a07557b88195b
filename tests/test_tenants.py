"""Tenant isolation: every credential a caller presents makes its tenant.

Through the real OpenAI SDK (a placeholder api_key plus the real key in
`default_headers`, as Azure and gateway users write it) and raw aiohttp for
what the SDK cannot send (a header repeated). Two callers that differ in any
credential never share a cache entry; the same credentials in another order do.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import pytest
from multidict import CIMultiDict

from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import RunningProxy, StartProxy

MESSAGES: list[Any] = [{"role": "user", "content": "whose answer is this"}]
PLACEHOLDER = "sk-placeholder"


@pytest.fixture
async def cached(start_proxy: StartProxy) -> RunningProxy:
    return await start_proxy(
        {
            "cache": {"backend": "memory"},
            "routes": [
                {
                    "match": {"path": "/v1/*"},
                    "upstream": "fake",
                    "cache": {"ttl": "1h"},
                    "credential_headers": ["X-Tenant-Token"],
                }
            ],
        }
    )


async def _stored(proxy: RunningProxy) -> None:
    async with asyncio.timeout(5):
        await proxy.runtime.cache.flush()


async def _sdk_served(proxy: RunningProxy, headers: dict[str, str]) -> str:
    client = openai.AsyncOpenAI(
        base_url=proxy.base_url, api_key=PLACEHOLDER, default_headers=headers, max_retries=0
    )
    async with client:
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
    await _stored(proxy)
    return raw.headers["x-llm-sidecar"]


# The second caller differs from the first in one credential only.
DIFFERENT = [
    pytest.param({"api-key": "key-a"}, {"api-key": "key-b"}, id="api-key"),
    pytest.param({"x-api-key": "key-a"}, {"x-api-key": "key-b"}, id="x-api-key"),
    pytest.param({"x-goog-api-key": "a"}, {"x-goog-api-key": "b"}, id="x-goog-api-key"),
    pytest.param(
        {"Ocp-Apim-Subscription-Key": "a"}, {"Ocp-Apim-Subscription-Key": "b"}, id="ocp-apim"
    ),
    pytest.param({"anthropic-api-key": "a"}, {"anthropic-api-key": "b"}, id="anthropic-api-key"),
    pytest.param({"X-Auth-Token": "a"}, {"X-Auth-Token": "b"}, id="x-auth-token"),
    pytest.param({"Cookie": "session=a"}, {"Cookie": "session=b"}, id="cookie"),
    pytest.param({"Proxy-Authorization": "Basic a"}, {"Proxy-Authorization": "Basic b"}, id="pa"),
    pytest.param({"X-Tenant-Token": "a"}, {"X-Tenant-Token": "b"}, id="policy-listed"),
    pytest.param({"api-key": "key-a"}, {"x-api-key": "key-a"}, id="same-value-other-header"),
]


@pytest.mark.parametrize(("first", "second"), DIFFERENT)
async def test_a_different_credential_beside_the_bearer_is_another_tenant(
    fake: FakeUpstream, cached: RunningProxy, first: dict[str, str], second: dict[str, str]
) -> None:
    assert await _sdk_served(cached, first) == "lead"
    assert await _sdk_served(cached, second) == "lead"
    assert await _sdk_served(cached, first) == "hit"
    assert fake.total_calls == 2


async def _raw_served(proxy: RunningProxy, headers: list[tuple[str, str]]) -> str:
    body = {"model": "m", "messages": MESSAGES}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{proxy.base_url}/chat/completions", json=body, headers=CIMultiDict(headers)
        ) as response,
    ):
        assert response.status == 200
        await response.read()
    await _stored(proxy)
    return response.headers["x-llm-sidecar"]


@pytest.mark.parametrize("name", ["Authorization", "x-api-key", "api-key"])
async def test_every_value_of_a_repeated_credential_counts_in_any_order(
    fake: FakeUpstream, cached: RunningProxy, name: str
) -> None:
    a = [(name, "Bearer one"), (name, "Bearer two")]
    b = [(name, "Bearer one"), (name, "Bearer three")]
    assert await _raw_served(cached, a) == "lead"
    assert await _raw_served(cached, b) == "lead"
    assert await _raw_served(cached, a[::-1]) == "hit"
    assert fake.total_calls == 2


async def test_one_credential_still_shares_with_itself(
    fake: FakeUpstream, cached: RunningProxy
) -> None:
    both = {"api-key": "key-a", "x-goog-api-key": "g"}
    assert await _sdk_served(cached, both) == "lead"
    assert await _sdk_served(cached, both) == "hit"
    assert fake.total_calls == 1
