"""Object -> stream -> object is the identity, for any answer and every dialect's answers.

`proxy.rechunk` turns a whole answer into its endpoint's stream; folding that
stream with `proxy.assemble` must give the answer back, field for field,
including fields no one knows today. Hypothesis generates the answers; the
fake's dialects supply real shapes.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response

from proxy.assemble import assemble_chat, assemble_completion, assemble_response, is_usage_chunk
from proxy.rechunk import chat_chunks, completion_chunks, response_events
from proxy.testing.dialects import DIALECT
from proxy.testing.fake_answers import FakeSettings, plan_chat, plan_completion, plan_response
from tests.test_fake_answers import (
    CHAT_BODIES,
    CHAT_META,
    COMPLETION_BODIES,
    COMPLETION_META,
    RESPONSE_BODIES,
    RESPONSE_META,
)

_NAMES = st.sampled_from(["alpha", "beta", "reasoning_content", "annotations", "audio", "name"])
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.text(max_size=8))
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(_NAMES, inner, max_size=3)
    ),
    max_leaves=6,
)
_EXTRAS = st.dictionaries(_NAMES, _VALUES, max_size=3)
_USAGE = st.one_of(
    st.none(),
    st.fixed_dictionaries({"prompt_tokens": st.integers(0, 9), "total_tokens": st.integers(0, 9)}),
)


@st.composite
def _calls(draw: st.DrawFn) -> list[dict[str, Any]]:
    count = draw(st.integers(0, 3))
    return [
        {
            "id": draw(st.one_of(st.none(), st.text(min_size=1, max_size=6))),
            "type": "function",
            "function": {
                "name": draw(st.text(max_size=6)),
                "arguments": draw(st.text(max_size=12)),
            },
            **draw(st.dictionaries(st.sampled_from(["extra", "custom"]), _VALUES, max_size=1)),
        }
        for _ in range(count)
    ]


@st.composite
def chat_objects(draw: st.DrawFn) -> dict[str, Any]:
    choices = []
    for index in sorted(draw(st.lists(st.integers(0, 5), unique=True, max_size=3))):
        message: dict[str, Any] = {
            "role": "assistant",
            "content": draw(st.one_of(st.none(), st.text(max_size=12))),
        }
        message.update(draw(st.dictionaries(_NAMES, _VALUES, max_size=3)))
        tools = draw(st.one_of(st.none(), st.just([]), _calls()))
        if tools is not None or draw(st.booleans()):
            message["tool_calls"] = tools
        choice: dict[str, Any] = {"index": index, "message": message}
        choice["finish_reason"] = draw(
            st.one_of(st.none(), st.sampled_from(["stop", "length", "tool_calls"]))
        )
        if draw(st.booleans()):
            choice["logprobs"] = draw(
                st.one_of(
                    st.none(), st.fixed_dictionaries({"content": st.lists(_VALUES, max_size=2)})
                )
            )
        choice.update(
            draw(
                st.dictionaries(
                    st.sampled_from(["stop_reason", "content_filter_results"]), _VALUES, max_size=2
                )
            )
        )
        choices.append(choice)
    top = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": draw(st.integers(0, 9)),
        "model": "m",
    }
    return {**top, **draw(_EXTRAS), "choices": choices, "usage": draw(_USAGE)}


@st.composite
def completion_objects(draw: st.DrawFn) -> dict[str, Any]:
    choices = []
    for index in sorted(draw(st.lists(st.integers(0, 5), unique=True, max_size=3))):
        choice: dict[str, Any] = {"text": draw(st.text(max_size=12)), "index": index}
        choice["finish_reason"] = draw(st.one_of(st.none(), st.sampled_from(["stop", "length"])))
        if draw(st.booleans()):
            choice["logprobs"] = draw(
                st.one_of(
                    st.none(),
                    st.fixed_dictionaries({"tokens": st.lists(st.text(max_size=3), max_size=2)}),
                )
            )
        choice.update(
            draw(
                st.dictionaries(
                    st.sampled_from(["stop_reason", "content_filter_results"]), _VALUES, max_size=2
                )
            )
        )
        choices.append(choice)
    top = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m"}
    return {**top, **draw(_EXTRAS), "choices": choices, "usage": draw(_USAGE)}


@settings(max_examples=150, deadline=None)
@given(chat_objects(), st.booleans())
def test_chat_object_to_stream_to_object_is_the_identity(
    whole: dict[str, Any], usage: bool
) -> None:
    chunks = chat_chunks(whole, with_usage=usage)
    assert assemble_chat(chunks) == (whole if usage else {**whole, "usage": None})
    assert [is_usage_chunk(c) for c in chunks].count(True) == (usage and whole["usage"] is not None)


@settings(max_examples=150, deadline=None)
@given(completion_objects(), st.booleans())
def test_completion_object_to_stream_to_object_is_the_identity(
    whole: dict[str, Any], usage: bool
) -> None:
    chunks = completion_chunks(whole, with_usage=usage)
    assert assemble_completion(chunks) == (whole if usage else {**whole, "usage": None})


SETTINGS = FakeSettings(tokens=5)


@pytest.mark.parametrize("body", CHAT_BODIES.values(), ids=CHAT_BODIES.keys())
@pytest.mark.parametrize("dialect", DIALECT)
def test_every_dialects_chat_answer_round_trips(dialect: str, body: dict[str, Any]) -> None:
    speaker = DIALECT[dialect]
    choices, usage = plan_chat(speaker.adjust(body), SETTINGS)
    # Ollama's per-call `index` is the one field a stream position replaces.
    whole = speaker.foldable(speaker.chat_object(CHAT_META, choices, usage))
    chunks = chat_chunks(whole, with_usage=True)
    assert assemble_chat(chunks) == whole
    for chunk in chunks:  # each one a chunk the SDK can read
        ChatCompletionChunk.model_validate(chunk)
    ChatCompletion.model_validate(assemble_chat(chunks))


@pytest.mark.parametrize("body", COMPLETION_BODIES.values(), ids=COMPLETION_BODIES.keys())
@pytest.mark.parametrize("dialect", DIALECT)
def test_every_dialects_completion_answer_round_trips(dialect: str, body: dict[str, Any]) -> None:
    speaker = DIALECT[dialect]
    choices, usage = plan_completion(speaker.adjust(body), SETTINGS)
    whole = speaker.completion_object(COMPLETION_META, choices, usage)
    chunks = completion_chunks(whole, with_usage=True)
    assert assemble_completion(chunks) == whole
    Completion.model_validate(assemble_completion(chunks))


@pytest.mark.parametrize("body", RESPONSE_BODIES.values(), ids=RESPONSE_BODIES.keys())
@pytest.mark.parametrize("dialect", DIALECT)
def test_every_dialects_response_round_trips(dialect: str, body: dict[str, Any]) -> None:
    speaker = DIALECT[dialect]
    plan, usage = plan_response(body, SETTINGS)
    whole = speaker.response_object(RESPONSE_META, "msg_1", plan, usage)
    events = response_events(whole)
    assert assemble_response(events) == whole
    # The deltas say the text, in order, and the sequence numbers count up.
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == "".join(plan.pieces)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == f"response.{whole['status']}"
    Response.model_construct(**whole)
    # Even when the terminal snapshot is stripped, the items rebuild it.
    empty = [*events[:-1], {**events[-1], "response": {**whole, "output": []}}]
    assert assemble_response(empty) == whole


def test_a_function_call_item_streams_its_arguments() -> None:
    call = {
        "id": "fc_1",
        "type": "function_call",
        "status": "completed",
        "call_id": "call_1",
        "name": "get_weather",
        "arguments": '{"location": "Paris"}',
    }
    whole = {"id": "resp_1", "object": "response", "status": "completed", "output": [call]}
    events = response_events(whole)
    kinds = [e["type"] for e in events]
    assert "response.function_call_arguments.delta" in kinds
    added = next(e for e in events if e["type"] == "response.output_item.added")
    assert added["item"]["arguments"] == "" and added["item"]["status"] == "in_progress"
    assert assemble_response(events) == whole
