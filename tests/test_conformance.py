"""Conformance: every upstream dialect looks, through the proxy, exactly as it does direct.

For each dialect the fake upstream speaks (and each SSE line ending), each
endpoint (chat, text completions, the Responses API) and each kind of answer
(plain, n=2, a tool call, parallel tool calls; stream, stream with usage,
non-stream), the real OpenAI SDK makes the same call direct and through the
proxy, and the two parsed objects must be equal, ids and timestamps aside.
The azure dialect is called with the `AsyncAzureOpenAI` client, on Azure's
own deployment paths. The proxy's answer is taken three ways: as the leader
of the upstream call, as a follower attached to a leader of the other mode,
and as a cache hit of an answer a caller of the other mode left.

"Equal" is as the SDK reads it: a null field and an absent one are the same,
and a dialect's `foldable` drops the values its stream has no way to say
(vLLM's `tool_calls: []`, Ollama's per-call `index`); `unasked_usage_chunks`
drops what a dialect moves onto the usage chunk the proxy asks for and
withholds (llama.cpp's `timings`). README lists them.

One fake and one proxy serve the whole module (`tests.conformance`), so each
case costs a handful of loopback calls. Faults (in-band errors, answers that
are not the endpoint's) are in test_conformance_faults.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from proxy.assemble import assemble_chat, assemble_completion, assemble_response
from proxy.testing.dialects import DIALECT
from tests.conformance import Answer, Env, call, env, held, normal

__all__ = ["env"]  # the module's fixture

pytestmark = pytest.mark.asyncio(loop_scope="module")

# (dialect, line ending): every dialect as it frames by default, and the
# other line endings on two of them.
VARIANTS = [(name, "lf") for name in DIALECT] + [
    ("openai", "cr"),
    ("openai", "crlf"),
    ("vllm", "cr"),
]
MODES = ("whole", "stream", "usage")  # usage: a stream with stream_options.include_usage
PATHS = ("lead", "follow", "hit")
# A follower or a cache hit of the other mode.
OTHER = {"whole": "stream", "stream": "whole", "usage": "whole"}


def _function(name: str, argument: str) -> dict[str, Any]:
    parameters = {"type": "object", "properties": {argument: {"type": "string"}}}
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


TOOLS = [_function("get_weather", "location")]
TWO_TOOLS = [*TOOLS, _function("get_time", "city")]
# endpoint -> body kind -> (extra body fields, modes)
KINDS: dict[str, dict[str, tuple[dict[str, Any], tuple[str, ...]]]] = {
    "chat": {
        "plain": ({}, MODES),
        "n2": ({"n": 2}, ("whole", "stream")),
        "tools": ({"tools": TOOLS}, ("whole", "stream")),
        "parallel_tools": (
            {"tools": TWO_TOOLS, "parallel_tool_calls": True},
            ("whole", "stream"),
        ),
    },
    "completions": {
        "plain": ({}, MODES),
        "n2": ({"n": 2}, ("whole", "stream")),
    },
    "responses": {"plain": ({}, ("whole", "stream"))},
}


@dataclass(frozen=True)
class Case:
    dialect: str
    ending: str
    endpoint: str
    kind: str
    mode: str
    path: str

    @property
    def id(self) -> str:
        variant = self.dialect if self.ending == "lf" else f"{self.dialect}+{self.ending}"
        return f"{variant}-{self.endpoint}-{self.kind}-{self.mode}-{self.path}"

    def body(self) -> dict[str, Any]:
        # The case id in the prompt: no two cases share a key, a cache entry or an answer.
        extra, _ = KINDS[self.endpoint][self.kind]
        if self.endpoint == "chat":
            ask = f"{self.id}: what is the weather in Paris?"
            return {"model": "fake-model", "messages": [{"role": "user", "content": ask}], **extra}
        if self.endpoint == "completions":
            return {"model": "fake-model", "prompt": f"{self.id}: say hello", **extra}
        return {"model": "fake-model", "input": f"{self.id}: say hello", **extra}


def _cases() -> list[Any]:
    cases = []
    for dialect, ending in VARIANTS:
        for endpoint, kinds in KINDS.items():
            for kind, (_, modes) in kinds.items():
                for mode in modes:
                    for path in PATHS:
                        case = Case(dialect, ending, endpoint, kind, mode, path)
                        cases.append(pytest.param(case, id=case.id))
    return cases


def _comparable(case: Case, mode: str, answer: Any) -> Any:
    dialect = DIALECT[case.dialect]
    if mode == "whole" and case.endpoint != "responses":
        answer = dialect.foldable(answer)
    if mode == "stream" and case.endpoint == "chat":
        answer = dialect.unasked_usage_chunks(answer)
    return normal(answer)


def _rechunked(case: Case) -> bool:
    """The proxy's stream is a plain answer re-chunked: a follower or a hit of a
    `stream: false` leader, whose flight went upstream as a plain call."""
    return case.mode != "whole" and case.path != "lead"


_FOLD = {"chat": assemble_chat, "completions": assemble_completion}


def _what_the_stream_says(case: Case, chunks: list[Any]) -> Any:
    """A stream's answer, whatever its chunking: folded into its object.

    A re-chunked stream cannot cut the text where the upstream cut it, so
    two streams are the same answer when they fold into the same object (by
    `proxy.assemble`, which the whole-mode cases pin against every dialect's
    own non-stream answer), ids and timestamps aside.
    """
    if case.endpoint == "responses":
        return normal(assemble_response(chunks))
    folded = DIALECT[case.dialect].foldable(_FOLD[case.endpoint](chunks))
    if case.mode == "stream":
        # A re-chunked stream has OpenAI's shape: usage only for a caller who
        # asked (llama.cpp's own completion streams carry it unasked; README).
        folded = {**folded, "usage": None}
    return normal(folded)


async def _call(env: Env, case: Case, proxied: bool, mode: str) -> Answer:
    client = env.client(case.dialect, case.ending, proxied)
    return await call(client, case.endpoint, case.body(), mode)


async def _through_the_proxy(env: Env, case: Case) -> Answer:
    if case.path == "lead":
        return await _call(env, case, True, case.mode)
    if case.path == "follow":
        _, answer = await held(
            env,
            lambda: _call(env, case, True, OTHER[case.mode]),
            lambda: _call(env, case, True, case.mode),
        )
        return answer
    await _call(env, case, True, OTHER[case.mode])
    await env.flush()
    return await _call(env, case, True, case.mode)


@pytest.mark.parametrize("case", _cases())
async def test_through_the_proxy_as_direct(env: Env, case: Case) -> None:
    direct, _ = await _call(env, case, False, case.mode)
    got, served = await _through_the_proxy(env, case)
    assert served == case.path
    if not _rechunked(case):
        assert _comparable(case, case.mode, got) == _comparable(case, case.mode, direct)
        return
    assert _what_the_stream_says(case, got) == _what_the_stream_says(case, direct)
    # Usage only for a caller who asked, as direct: on no chunk, or on the last.
    if case.endpoint != "responses":
        usage = [i for i, chunk in enumerate(got) if chunk.get("usage")]
        assert usage == ([len(got) - 1] if case.mode == "usage" else [])
