"""Conformance under faults: what the upstream got wrong reaches every caller as direct.

An in-band error (the upstream's error inside a 200 stream: a chunk with
`error` and `finish_reason: "error"`, or a Responses `type: "error"` event)
and a 200 that is not the endpoint's answer (text/plain, JSON cut short, a
stream event that is not JSON) are asked, with the real SDK, direct and
through the proxy: as the leader, as a follower of the other mode, and
again after a caller of the other mode (never a cache hit: nothing of
theirs is ever cached). Where the proxy has to parse such an answer to
serve a reader of the other mode (a follower: the upstream is asked in the
leader's mode), the reader gets a 502 with an OpenAI-style error instead,
and that is said here case by case.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from proxy.sse import SSEDecoder
from proxy.testing.fake_faults import chunk_error, response_error
from tests.conformance import ENDPOINTS, Answer, Env, Raised, call, env, held, normal

__all__ = ["env"]  # the module's fixture

pytestmark = pytest.mark.asyncio(loop_scope="module")

PATHS = ("lead", "follow", "again")
OTHER = {"whole": "stream", "stream": "whole"}


def _body(endpoint: str, prompt: str) -> dict[str, Any]:
    if endpoint == "chat":
        return {"model": "fake-model", "messages": [{"role": "user", "content": prompt}]}
    if endpoint == "completions":
        return {"model": "fake-model", "prompt": prompt}
    return {"model": "fake-model", "input": prompt}


async def _through(
    env: Env, endpoint: str, body: dict[str, Any], mode: str, path: str, knobs: dict[str, str]
) -> Answer:
    client = env.client("openai", "lf", proxied=True)
    if path == "lead":
        return await call(client, endpoint, body, mode, knobs)
    if path == "follow":
        _, answer = await held(
            env,
            lambda: call(client, endpoint, body, OTHER[mode], knobs),
            lambda: call(client, endpoint, body, mode, knobs),
        )
        return answer
    await call(client, endpoint, body, OTHER[mode], knobs)
    await env.flush()
    return await call(client, endpoint, body, mode, knobs)


def _served(path: str) -> str:
    # "again" is a second lead: the first caller's answer was never cached.
    return "lead" if path == "again" else path


# Upstream calls per path: a follower shares the leader's; "again" makes its own.
CALLS = {"lead": 1, "follow": 1, "again": 2}


CASES = [
    pytest.param(endpoint, mode, path, id=f"{endpoint}-{mode}-{path}")
    for endpoint in ENDPOINTS
    for mode in ("whole", "stream")
    for path in PATHS
]


@pytest.mark.parametrize(("endpoint", "mode", "path"), CASES)
async def test_an_in_band_error_reaches_the_caller_as_the_upstream_said_it(
    env: Env, endpoint: str, mode: str, path: str
) -> None:
    knobs = {"x-fake-inband-error": "429"}
    body = _body(endpoint, f"in-band {endpoint} {mode} {path}")
    direct, _ = await call(env.client("openai", "lf", False), endpoint, body, mode, knobs)
    before = env.fake.total_calls
    got, served = await _through(env, endpoint, body, mode, path, knobs)
    assert env.fake.total_calls - before == CALLS[path]
    assert served == _served(path)
    said = chunk_error(429) if endpoint != "responses" else response_error(429)
    if path == "follow" and mode == "stream":
        # Its flight was the whole-mode leader's plain call, which the upstream
        # answered 429 with this error object: that answer, as it said it.
        assert got == [Raised("RateLimitError", 429, said)]
        return
    assert normal(got) == normal(direct)
    if mode == "whole":
        # The upstream's code and message, with the status its code names: the
        # SDK raises RateLimitError, as direct, not a generic 502.
        assert got == Raised("RateLimitError", 429, said)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_a_streaming_reader_gets_the_upstreams_error_event_and_no_other(
    env: Env, endpoint: str
) -> None:
    paths = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
    body = {**_body(endpoint, f"one error event {endpoint}"), "stream": True}
    headers = {"x-fake-inband-error": "503"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            env.proxy_root + paths.get(endpoint, "/v1/responses"), json=body, headers=headers
        ) as response,
    ):
        assert response.status == 200
        raw = await response.read()
    events = [orjson.loads(e.data) for e in SSEDecoder().feed(raw) if e.data != b"[DONE]"]
    errors = [e for e in events if e.get("error") or e.get("type") == "error"]
    # Exactly the upstream's, last: no proxy-made error event after it.
    assert errors == [events[-1]]
    if endpoint == "responses":
        assert {k: events[-1][k] for k in ("code", "message", "param")} == response_error(503)
    else:
        assert events[-1]["error"] == chunk_error(503)
        assert events[-1]["choices"][0]["finish_reason"] == "error"


def _converted(bad: str, mode: str, path: str) -> bool:
    """Whether serving a `mode` reader on `path` means parsing the upstream's answer.

    The upstream is asked in the leader's mode, so only a follower (of a
    leader of the other mode) is converted: a streaming follower of a plain
    call always (its body is re-chunked), a plain follower of a stream only
    when the upstream did stream (`event`; a `text` or `json` answer to a
    stream request is no stream, and is relayed to it as sent).
    """
    return path == "follow" and (mode == "stream" or bad == "event")


BAD_CASES = [
    pytest.param(bad, endpoint, mode, path, id=f"{bad}-{endpoint}-{mode}-{path}")
    for bad in ("text", "json", "event")
    for endpoint in ENDPOINTS
    for mode in ("whole", "stream")
    for path in PATHS
]


@pytest.mark.parametrize(("bad", "endpoint", "mode", "path"), BAD_CASES)
async def test_a_200_that_is_not_the_endpoints_answer_is_relayed_and_never_cached(
    env: Env, bad: str, endpoint: str, mode: str, path: str
) -> None:
    knobs = {"x-fake-bad-body": bad}
    body = _body(endpoint, f"bad {bad} {endpoint} {mode} {path}")
    direct, _ = await call(env.client("openai", "lf", False), endpoint, body, mode, knobs)
    before = env.fake.total_calls
    got, served = await _through(env, endpoint, body, mode, path, knobs)
    assert env.fake.total_calls - before == CALLS[path]
    if _converted(bad, mode, path):
        # The proxy's own error (x-llm-sidecar: error), OpenAI-style.
        assert served == "error"
        raised = got if mode == "whole" else got[0]
        assert mode == "whole" or len(got) == 1  # a status, before any chunk
        assert isinstance(raised, Raised)
        assert (raised.kind, raised.status) == ("InternalServerError", 502)
        assert raised.body["code"] == "upstream_malformed"
    else:
        assert served == _served(path)
        assert normal(got) == normal(direct)
