"""The fake's answers without a server: each dialect's stream folds into its own object.

A `stream: false` caller who shares a streamed call gets the chunks folded by
`proxy.assemble`; these tests pin that, for every dialect the fake speaks,
the fold of its stream (with usage asked, as the proxy asks) is the object
the same dialect answers to a non-stream request. For OpenAI the two are
equal to the byte; for the others, null and absent count as one (the SDK
reads both as None), and `foldable` removes the few values a dialect's
stream has no way to say (vLLM's `tool_calls: []`, Ollama's per-call
`index`).
"""

from __future__ import annotations

from typing import Any

import pytest

from proxy.assemble import assemble_chat, assemble_completion, assemble_response, is_usage_chunk
from proxy.testing.dialects import DIALECT, REASONING
from proxy.testing.fake_answers import FakeSettings, plan_chat, plan_completion, plan_response

SETTINGS = FakeSettings(tokens=5)
MESSAGES: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]


def _function(name: str, argument: str) -> dict[str, Any]:
    parameters = {"type": "object", "properties": {argument: {"type": "string"}}}
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


TOOLS: list[Any] = [_function("get_weather", "location")]
TWO_TOOLS: list[Any] = [*TOOLS, _function("get_time", "city")]
CHAT_META: dict[str, Any] = {
    "id": "chatcmpl-1",
    "created": 1_700_000_000,
    "model": "fake-model",
    "service_tier": "default",
    "system_fingerprint": "fp_fake",
}
COMPLETION_META: dict[str, Any] = {
    "id": "cmpl-1",
    "created": 1_700_000_000,
    "model": "fake-model",
    "system_fingerprint": "fp_fake",
}
RESPONSE_META: dict[str, Any] = {"id": "resp_1", "created_at": 1_700_000_000, "model": "fake-model"}

CHAT_BODIES: dict[str, dict[str, Any]] = {
    "plain": {"messages": MESSAGES},
    "tools": {"messages": MESSAGES, "tools": TOOLS},
    "tools_n2": {"messages": MESSAGES, "tools": TOOLS, "n": 2},
    "parallel_tools": {"messages": MESSAGES, "tools": TWO_TOOLS, "parallel_tool_calls": True},
    "parallel_tools_n2": {
        "messages": MESSAGES,
        "tools": TWO_TOOLS,
        "parallel_tool_calls": True,
        "n": 2,
    },
    "n2": {"messages": MESSAGES, "n": 2},
    "logprobs": {"messages": MESSAGES, "logprobs": True},
    "logprobs_n2": {"messages": MESSAGES, "logprobs": True, "n": 2},
    "max_tokens": {"messages": MESSAGES, "max_tokens": 2},
    "max_completion_tokens_n3": {"messages": MESSAGES, "max_completion_tokens": 3, "n": 3},
}
COMPLETION_BODIES: dict[str, dict[str, Any]] = {
    "plain": {"prompt": "Say hello"},
    "n2": {"prompt": "Say hello", "n": 2},
    "two_prompts_n2": {"prompt": ["Say hello", "Say goodbye"], "n": 2},
    "token_array": {"prompt": [1, 2, 3]},
    "max_tokens": {"prompt": "Say hello", "max_tokens": 2},
}
RESPONSE_BODIES: dict[str, dict[str, Any]] = {
    "plain": {"input": "Say hello"},
    "incomplete": {"input": "Say hello", "max_output_tokens": 2},
}


def null_free(value: Any) -> Any:
    """As the SDK reads it: a null field and an absent one are the same."""
    if isinstance(value, dict):
        return {k: null_free(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [null_free(v) for v in value]
    return value


def _same(dialect: str, folded: dict[str, Any], whole: dict[str, Any]) -> None:
    if dialect == "openai":
        assert folded == whole
    else:
        assert null_free(folded) == null_free(DIALECT[dialect].foldable(whole))


@pytest.mark.parametrize("body", CHAT_BODIES.values(), ids=CHAT_BODIES.keys())
@pytest.mark.parametrize("dialect", DIALECT)
def test_chat_chunks_fold_into_chat_object(dialect: str, body: dict[str, Any]) -> None:
    speaker = DIALECT[dialect]
    choices, usage = plan_chat(speaker.adjust(body), SETTINGS)
    chunks = speaker.chat_chunks(CHAT_META, choices, usage, True)
    _same(dialect, assemble_chat(chunks), speaker.chat_object(CHAT_META, choices, usage))


@pytest.mark.parametrize("body", COMPLETION_BODIES.values(), ids=COMPLETION_BODIES.keys())
@pytest.mark.parametrize("dialect", DIALECT)
def test_completion_chunks_fold_into_completion_object(dialect: str, body: dict[str, Any]) -> None:
    speaker = DIALECT[dialect]
    choices, usage = plan_completion(speaker.adjust(body), SETTINGS)
    chunks = speaker.completion_chunks(COMPLETION_META, choices, usage, True)
    whole = speaker.completion_object(COMPLETION_META, choices, usage)
    _same(dialect, assemble_completion(chunks), whole)


@pytest.mark.parametrize("body", RESPONSE_BODIES.values(), ids=RESPONSE_BODIES.keys())
@pytest.mark.parametrize("dialect", DIALECT)
def test_response_events_fold_into_response_object(dialect: str, body: dict[str, Any]) -> None:
    speaker = DIALECT[dialect]
    plan, usage = plan_response(body, SETTINGS)
    events = speaker.response_events(RESPONSE_META, "msg_1", plan, usage)
    whole = speaker.response_object(RESPONSE_META, "msg_1", plan, usage)
    assert assemble_response(events) == whole


@pytest.mark.parametrize("dialect", DIALECT)
def test_the_usage_chunk_is_recognised_in_every_dialect(dialect: str) -> None:
    speaker = DIALECT[dialect]
    choices, usage = plan_chat(CHAT_BODIES["n2"], SETTINGS)
    asked = speaker.chat_chunks(CHAT_META, choices, usage, True)
    unasked = speaker.chat_chunks(CHAT_META, choices, usage, False)
    usage_chunks = [c for c in asked if is_usage_chunk(c)]
    if dialect == "llamacpp":  # its usage chunk also carries timings, which move with it
        assert len(usage_chunks) == 1 and len(asked) == len(unasked) + 1
    else:
        # What a caller who did not ask sees; `usage: null` on each chunk reads as no usage.
        assert null_free([c for c in asked if not is_usage_chunk(c)]) == null_free(unasked)
        assert len(usage_chunks) == 1


def test_the_plans_cover_what_the_bodies_ask_for() -> None:
    # Guards the cases above against silently testing only plain answers.
    tool, _ = plan_chat(CHAT_BODIES["tools"], SETTINGS)
    assert len(tool[0].calls) == 1 and tool[0].finish == "tool_calls"
    two, _ = plan_chat(CHAT_BODIES["parallel_tools"], SETTINGS)
    assert [call.name for call in two[0].calls] == ["get_weather", "get_time"]
    assert len({call.id for call in two[0].calls}) == 2
    single, _ = plan_chat({**CHAT_BODIES["parallel_tools"], "parallel_tool_calls": False}, SETTINGS)
    assert len(single[0].calls) == 1
    n2, _ = plan_chat(CHAT_BODIES["n2"], SETTINGS)
    assert [c.index for c in n2] == [0, 1]
    scored, _ = plan_chat(CHAT_BODIES["logprobs"], SETTINGS)
    assert scored[0].logprobs is not None and len(scored[0].logprobs) == SETTINGS.tokens
    cut, usage = plan_chat(CHAT_BODIES["max_tokens"], SETTINGS)
    assert (len(cut[0].pieces), cut[0].finish, usage["completion_tokens"]) == (2, "length", 2)
    prompts, _ = plan_completion(COMPLETION_BODIES["two_prompts_n2"], SETTINGS)
    assert [c.index for c in prompts] == [0, 1, 2, 3]


def _deltas(dialect: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    speaker = DIALECT[dialect]
    choices, usage = plan_chat(speaker.adjust(body), SETTINGS)
    chunks = speaker.chat_chunks(CHAT_META, choices, usage, True)
    return [part.get("delta", {}) for chunk in chunks for part in chunk["choices"]]


def test_each_dialect_speaks_its_quirks() -> None:
    # Guards the folds above against dialects that quietly speak plain OpenAI.
    choices, usage = plan_chat(CHAT_BODIES["plain"], SETTINGS)
    azure = DIALECT["azure"].chat_chunks(CHAT_META, choices, usage, True)
    assert (azure[0]["id"], azure[0]["created"], azure[0]["choices"]) == ("", 0, [])
    assert "prompt_filter_results" in azure[0]
    assert "content_filter_results" in azure[2]["choices"][0]

    vllm = _deltas("vllm", CHAT_BODIES["plain"])
    assert tuple(d["reasoning_content"] for d in vllm if "reasoning_content" in d) == REASONING

    llama = _deltas("llamacpp", CHAT_BODIES["tools"])
    names = [call["function"].get("name") for d in llama for call in d.get("tool_calls", ())]
    assert len(names) > 2 and set(names) == {"get_weather"}

    ollama = _deltas("ollama", CHAT_BODIES["parallel_tools"])
    calls = [call for d in ollama for call in d.get("tool_calls", ())]
    assert [call["index"] for call in calls] == [0, 0]
    assert len({call["id"] for call in calls}) == 2

    litellm = DIALECT["litellm"].chat_chunks(CHAT_META, choices, usage, True)
    assert litellm[-1]["choices"] == [{"index": 0, "delta": {}}] and litellm[-1]["usage"]

    plan, used = plan_response(RESPONSE_BODIES["plain"], SETTINGS)
    events = DIALECT["litellm"].response_events(RESPONSE_META, "msg_1", plan, used)
    assert events[-1]["response"]["output"] == []
    assert not DIALECT["no_done"].done


def test_without_include_usage_the_fold_has_no_usage() -> None:
    choices, usage = plan_chat(CHAT_BODIES["plain"], SETTINGS)
    openai = DIALECT["openai"]
    folded = assemble_chat(openai.chat_chunks(CHAT_META, choices, usage, False))
    assert folded == {**openai.chat_object(CHAT_META, choices, usage), "usage": None}
