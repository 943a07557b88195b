"""The fake's answers without a server: its stream chunks fold into its whole object.

The proxy always asks upstream for a stream with `include_usage` and folds the
chunks for a `stream: false` caller; these tests pin that, for the fake, the
fold gives exactly the object the fake answers to a non-stream request.
"""

from __future__ import annotations

from typing import Any

import pytest

from proxy.assemble import assemble_chat, assemble_completion
from proxy.testing.fake_answers import (
    FakeSettings,
    chat_chunks,
    chat_object,
    completion_chunks,
    completion_object,
    plan_chat,
    plan_completion,
)

SETTINGS = FakeSettings(tokens=5)
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

CHAT_BODIES: dict[str, dict[str, Any]] = {
    "plain": {"messages": MESSAGES},
    "tools": {"messages": MESSAGES, "tools": TOOLS},
    "tools_n2": {"messages": MESSAGES, "tools": TOOLS, "n": 2},
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


@pytest.mark.parametrize("body", CHAT_BODIES.values(), ids=CHAT_BODIES.keys())
def test_chat_chunks_fold_into_chat_object(body: dict[str, Any]) -> None:
    choices, usage = plan_chat(body, SETTINGS)
    chunks = chat_chunks(CHAT_META, choices, usage, True)
    assert assemble_chat(chunks) == chat_object(CHAT_META, choices, usage)


@pytest.mark.parametrize("body", COMPLETION_BODIES.values(), ids=COMPLETION_BODIES.keys())
def test_completion_chunks_fold_into_completion_object(body: dict[str, Any]) -> None:
    choices, usage = plan_completion(body, SETTINGS)
    chunks = completion_chunks(COMPLETION_META, choices, usage, True)
    assert assemble_completion(chunks) == completion_object(COMPLETION_META, choices, usage)


def test_the_plans_cover_what_the_bodies_ask_for() -> None:
    # Guards the cases above against silently testing only plain answers.
    tool, _ = plan_chat(CHAT_BODIES["tools"], SETTINGS)
    assert tool[0].tool is not None and tool[0].finish == "tool_calls"
    two, _ = plan_chat(CHAT_BODIES["n2"], SETTINGS)
    assert [c.index for c in two] == [0, 1]
    scored, _ = plan_chat(CHAT_BODIES["logprobs"], SETTINGS)
    assert scored[0].logprobs is not None and len(scored[0].logprobs) == SETTINGS.tokens
    cut, usage = plan_chat(CHAT_BODIES["max_tokens"], SETTINGS)
    assert (len(cut[0].pieces), cut[0].finish, usage["completion_tokens"]) == (2, "length", 2)
    prompts, _ = plan_completion(COMPLETION_BODIES["two_prompts_n2"], SETTINGS)
    assert [c.index for c in prompts] == [0, 1, 2, 3]


def test_without_include_usage_the_fold_has_no_usage() -> None:
    choices, usage = plan_chat(CHAT_BODIES["plain"], SETTINGS)
    folded = assemble_chat(chat_chunks(CHAT_META, choices, usage, False))
    assert folded == {**chat_object(CHAT_META, choices, usage), "usage": None}
