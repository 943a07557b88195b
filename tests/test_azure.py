"""Azure OpenAI through the proxy: its own client, paths, api-version and api-key.

policies/examples/azure.yaml, pointed at the fake upstream, serves the real
`AsyncAzureOpenAI` client on Azure's deployment paths and the plain client
on the v1 API, coalesced and cached like `/v1`. The deployment (path), the
`api-version` (query) and the caller's `api-key` (tenant) each tell two
calls apart; a path no route matches is an OpenAI-style 404.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from openai.types.chat import ChatCompletionMessageParam

from proxy.endpoint import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, Endpoint, endpoint_of
from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import RunningProxy, StartProxy

EXAMPLE = Path(__file__).parent.parent / "policies" / "examples" / "azure.yaml"
VERSION = "2024-10-21"
PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello from azure"}]


@pytest.fixture
async def azure_proxy(start_proxy: StartProxy, fake: FakeUpstream) -> RunningProxy:
    policy: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    root = fake.base_url.removesuffix("/v1")
    policy["upstreams"]["azure"]["base_url"] = root
    policy["upstreams"]["azure-v1"]["base_url"] = root + "/openai/v1"
    return await start_proxy(policy, raw=True)


def _azure(proxy: RunningProxy, key: str = "azure-key", version: str = VERSION) -> Any:
    root = proxy.base_url.removesuffix("/v1")
    return openai.AsyncAzureOpenAI(
        azure_endpoint=root, api_version=version, api_key=key, max_retries=0
    )


async def _chat(client: openai.AsyncAzureOpenAI, deployment: str = "gpt-4o") -> str:
    raw = await client.chat.completions.with_raw_response.create(
        model=deployment,
        messages=PROMPT,
        temperature=0,
    )
    served: str = raw.headers["x-llm-sidecar"]
    return served


@pytest.mark.parametrize(
    ("path", "endpoint"),
    [
        ("/openai/deployments/gpt-4o/chat/completions", CHAT),
        ("/openai/deployments/gpt-4o/completions", COMPLETIONS),
        ("/openai/deployments/my-embedder/embeddings", EMBEDDINGS),
        ("/openai/deployments/gpt-4o/responses", RESPONSES),
        ("/openai/responses", RESPONSES),
        ("/openai/v1/chat/completions", CHAT),
        ("/openai/deployments/gpt-4o/chat/completions/", None),
        ("/openai/deployments/a/b/chat/completions", None),
        ("/openai/deployments/gpt-4o/files", None),
    ],
)
def test_azure_paths_are_the_endpoints_of_their_v1_twins(
    path: str, endpoint: Endpoint | None
) -> None:
    assert endpoint_of("POST", path) is endpoint


async def test_the_example_policy_serves_both_azure_clients(
    azure_proxy: RunningProxy, fake: FakeUpstream
) -> None:
    async with _azure(azure_proxy) as client:
        assert await _chat(client) == "lead"
        await azure_proxy.runtime.cache.flush()
        assert await _chat(client) == "hit"
        embedded = await client.embeddings.with_raw_response.create(
            model="my-embedder", input="hello"
        )
        assert embedded.headers["x-llm-sidecar"] == "lead"
        assert len(embedded.parse().data) == 1
        responded = await client.responses.with_raw_response.create(
            model="gpt-4o", input="hello", temperature=0
        )
        assert responded.headers["x-llm-sidecar"] == "lead"
        assert responded.parse().status == "completed"
    sent = [r for r in fake.requests if r.path.startswith("/openai/")]
    assert [r.path for r in sent] == [
        "/openai/deployments/gpt-4o/chat/completions",
        "/openai/deployments/my-embedder/embeddings",
        "/openai/responses",
    ]
    # The caller's key went upstream, as Azure expects it.
    assert all(r.headers["api-key"] == "azure-key" for r in sent)
    plain = openai.AsyncOpenAI(base_url=azure_proxy.base_url, api_key="k", max_retries=0)
    async with plain:
        raw = await plain.chat.completions.with_raw_response.create(
            model="gpt-4o",
            messages=PROMPT,
            temperature=0,
        )
    assert raw.headers["x-llm-sidecar"] == "lead"
    assert fake.requests[-1].path == "/openai/v1/chat/completions"


async def test_the_deployment_the_api_version_and_the_api_key_are_each_in_the_key(
    azure_proxy: RunningProxy, fake: FakeUpstream
) -> None:
    clients = [
        _azure(azure_proxy),
        _azure(azure_proxy, version="2025-01-01-preview"),
        _azure(azure_proxy, key="another-key"),
    ]
    try:
        first = [await _chat(client) for client in clients]
        first.append(await _chat(clients[0], deployment="gpt-4o-mini"))
        assert first == ["lead"] * 4  # four different calls, four upstream calls
        await azure_proxy.runtime.cache.flush()
        again = [await _chat(client) for client in clients]
        again.append(await _chat(clients[0], deployment="gpt-4o-mini"))
        assert again == ["hit"] * 4  # each its own cache entry
    finally:
        for client in clients:
            await client.close()
    assert fake.total_calls == 4


async def test_a_path_no_route_matches_is_an_openai_style_404(proxy: RunningProxy) -> None:
    # The default test policy routes /v1/* only.
    url = proxy.base_url.removesuffix("/v1") + "/openai/deployments/d/chat/completions"
    async with aiohttp.ClientSession() as session, session.post(url, json={}) as response:
        assert response.status == 404
        assert response.headers["x-llm-sidecar"] == "error"
        assert (await response.json())["error"]["code"] == "not_found"
