"""Stateful Responses calls are never coalesced or cached; state that is only read is.

A `background: true` create starts work the caller polls for by id, and a
call with a `conversation` adds to it: every such call must reach the
upstream, as the caller sent it, and its answer (the queued object, at
once) is never replayed. `store` and `previous_response_id` only read state
that never changes (a stored response), and are part of the key: such calls
are coalesced and cached like any other.
"""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest

from proxy.testing.fake_upstream import FakeUpstream
from tests.conftest import RunningProxy, StartProxy

POLICY = {"routes": [{"match": {"path": "/v1/*"}, "upstream": "fake", "cache": {"ttl": "1h"}}]}


@pytest.fixture
async def client(start_proxy: StartProxy) -> Any:
    proxy: RunningProxy = await start_proxy(POLICY)
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key="k", max_retries=0) as sdk:
        yield sdk, proxy


@pytest.mark.parametrize(
    "extra", [{"background": True}, {"conversation": "conv_1"}], ids=["background", "conversation"]
)
async def test_a_call_that_changes_state_reaches_the_upstream_every_time(
    client: Any, fake: FakeUpstream, extra: dict[str, Any]
) -> None:
    sdk, proxy = client
    body = {"model": "m", "input": "start a long job", **extra}
    for _ in range(2):
        raw = await sdk.responses.with_raw_response.create(**body)
        assert raw.headers["x-llm-sidecar"] == "bypass"
        await proxy.runtime.cache.flush()
    assert fake.total_calls == 2
    # As the caller sent it: not turned into a stream, nothing added.
    assert orjson.loads(fake.requests[-1].body) == body
    if "background" in extra:
        answer = raw.parse()
        assert (answer.status, answer.background, answer.output) == ("queued", True, [])


async def test_a_call_that_reads_stored_state_is_cached_like_any_other(
    client: Any, fake: FakeUpstream
) -> None:
    sdk, proxy = client
    body = {"model": "m", "input": "and then?", "store": True, "previous_response_id": "resp_1"}
    raw = await sdk.responses.with_raw_response.create(**body)
    assert raw.headers["x-llm-sidecar"] == "lead"
    await proxy.runtime.cache.flush()
    raw = await sdk.responses.with_raw_response.create(**body)
    assert raw.headers["x-llm-sidecar"] == "hit"
    # Another previous response is another call.
    raw = await sdk.responses.with_raw_response.create(**{**body, "previous_response_id": "resp_2"})
    assert raw.headers["x-llm-sidecar"] == "lead"
    assert fake.total_calls == 2
