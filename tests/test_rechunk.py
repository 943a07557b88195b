"""Re-chunking a finished answer into its endpoint's stream.

Two properties pin `proxy.rechunk`: the round trip object -> events ->
`proxy.assemble` -> object is the identity (over generated objects, and over
the fake upstream's answers), and for answers whose stream has one piece per
chunk anyway (one token, or per-token logprobs) the events are byte for byte
what the fake upstream streams for the same request.
"""

from __future__ import annotations

from typing import Any, cast

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai import omit
from openai._models import construct_type
from openai.lib.streaming.chat._completions import ChatCompletionStreamState
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import ResponseStreamEvent

from proxy.assemble import (
    RESPONSE_TERMINAL,
    assemble_chat,
    assemble_completion,
    assemble_response,
    choices_finished,
)
from proxy.rechunk import DONE_EVENT, Rechunked, rechunk
from proxy.sse import DONE, SSEDecoder
from proxy.testing.fake_answers import (
    FakeSettings,
    chat_chunks,
    chat_object,
    completion_chunks,
    completion_object,
    plan_chat,
    plan_completion,
    plan_response,
    response_events,
    response_object,
    sse,
    sse_typed,
)
from tests.test_fake_answers import CHAT_BODIES, CHAT_META, COMPLETION_BODIES, COMPLETION_META

JSON = dict[str, Any]
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"


def payloads(out: Rechunked, *, with_usage: bool = True, step: int = 0) -> list[JSON]:
    """What a reader gets, decoded as a client would (fed `step` bytes at a time, 0: at once)."""
    decoder = SSEDecoder()
    wire = b"".join(
        event for i, event in enumerate(out.events) if with_usage or i != out.usage_event
    )
    step = step or len(wire) or 1
    events = [e for at in range(0, len(wire), step) for e in decoder.feed(wire[at : at + step])]
    assert decoder.pending == b""
    return [orjson.loads(e.data) for e in events if e.data != DONE]


def converted(path: str, answer: JSON) -> Rechunked:
    out = rechunk(path, answer)
    assert out is not None
    return out


# -- golden cases: the fake upstream's own two framings -------------------------------------------


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("body", CHAT_BODIES.values(), ids=CHAT_BODIES.keys())
def test_chat_object_streams_back_into_itself(body: JSON, tokens: int) -> None:
    choices, usage = plan_chat(body, FakeSettings(tokens=tokens))
    whole = chat_object(CHAT_META, choices, usage)
    out = converted(CHAT, whole)
    assert out.events[-1] == DONE_EVENT
    chunks = payloads(out, step=1)
    assert assemble_chat(chunks) == whole
    assert choices_finished(chunks)
    # The usage chunk is OpenAI's: no choices, right before [DONE].
    assert out.usage_event == len(out.events) - 2
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage
    without = payloads(out, with_usage=False)
    assert all(chunk["usage"] is None for chunk in without)
    assert assemble_chat(without) == {**whole, "usage": None}


# Argument fragments of a tool call are the upstream's choice: assembly is pinned above.
UNTOOLED = {name: body for name, body in CHAT_BODIES.items() if "tools" not in body}


@pytest.mark.parametrize("body", UNTOOLED.values(), ids=UNTOOLED.keys())
def test_chat_events_are_the_upstreams_bytes_when_pieces_are_known(body: JSON) -> None:
    # One token per choice, or per-token logprobs: the chunking is fully determined.
    tokens = 5 if body.get("logprobs") else 1
    choices, usage = plan_chat(body, FakeSettings(tokens=tokens))
    expected = [sse(c) for c in chat_chunks(CHAT_META, choices, usage, True)] + [DONE_EVENT]
    assert list(converted(CHAT, chat_object(CHAT_META, choices, usage)).events) == expected


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("body", COMPLETION_BODIES.values(), ids=COMPLETION_BODIES.keys())
def test_completion_object_streams_back_into_itself(body: JSON, tokens: int) -> None:
    choices, usage = plan_completion(body, FakeSettings(tokens=tokens))
    whole = completion_object(COMPLETION_META, choices, usage)
    out = converted(COMPLETIONS, whole)
    chunks = payloads(out)
    assert assemble_completion(chunks) == whole
    assert choices_finished(chunks)
    if tokens == 1:
        expected = [sse(c) for c in completion_chunks(COMPLETION_META, choices, usage, True)]
        assert list(out.events) == [*expected, DONE_EVENT]


RESPONSE_META: JSON = {  # what the fake upstream server puts in a response
    "id": "resp_1",
    "created_at": 1_700_000_000,
    "model": "fake-model",
    "instructions": None,
    "max_output_tokens": None,
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "temperature": 1.0,
    "text": {"format": {"type": "text"}},
    "tool_choice": "auto",
    "tools": [],
    "top_p": 1.0,
    "truncation": "disabled",
    "metadata": {},
}


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("limit", [None, 2])
def test_response_object_streams_back_into_itself(tokens: int, limit: int | None) -> None:
    body: JSON = {"input": "Say hello", "max_output_tokens": limit}
    plan, usage = plan_response(body, FakeSettings(tokens=tokens))
    whole = response_object(RESPONSE_META, "msg_1", plan, usage)
    out = converted(RESPONSES, whole)
    assert out.usage_event is None
    events = payloads(out)
    assert assemble_response(events) == whole
    assert_item_events_rebuild(events, whole)
    if tokens == 1:
        expected = [sse_typed(e) for e in response_events(RESPONSE_META, "msg_1", plan, usage)]
        assert list(out.events) == expected


def assert_item_events_rebuild(events: list[JSON], whole: JSON) -> None:
    """The item events alone spell the final output: what an item-level reader rebuilds."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created"
    assert events[-1]["type"] in RESPONSE_TERMINAL
    done = {
        e["output_index"]: e["item"] for e in events if e["type"] == "response.output_item.done"
    }
    assert [done[i] for i in sorted(done)] == whole["output"]
    texts: dict[tuple[int, int], str] = {}
    arguments: dict[int, str] = {}
    for event in events:
        if event["type"] in ("response.output_text.delta", "response.refusal.delta"):
            where = (event["output_index"], event["content_index"])
            texts[where] = texts.get(where, "") + event["delta"]
        elif event["type"] == "response.function_call_arguments.delta":
            arguments[event["output_index"]] = (
                arguments.get(event["output_index"], "") + event["delta"]
            )
    for position, item in enumerate(whole["output"]):
        if item.get("type") == "function_call":
            assert arguments.get(position, "") == item["arguments"]
        for index, part in enumerate(item.get("content") or ()):
            text = part.get("text", part.get("refusal"))
            if isinstance(text, str):
                assert texts.get((position, index), "") == text


def test_what_has_no_stream_form_is_not_converted() -> None:
    assert rechunk("/v1/embeddings", {"object": "list", "data": []}) is None
    assert rechunk(CHAT, ["not", "an", "object"]) is None
    assert rechunk(CHAT, {"choices": "nope"}) is None
    assert rechunk(CHAT, {"choices": [{"index": 0, "message": "nope"}]}) is None
    assert rechunk(RESPONSES, {"id": "resp_1", "status": "completed"}) is None


# -- generated objects ----------------------------------------------------------------------------

text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
word = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=8)
number = st.floats(allow_nan=False, allow_infinity=False, width=64)
finish = st.sampled_from(["stop", "length", "tool_calls", "content_filter"])
usage = st.none() | st.fixed_dictionaries(
    {"prompt_tokens": st.integers(0, 10**6), "completion_tokens": st.integers(0, 10**6)},
    optional={"total_tokens": st.integers(0, 10**6), "prompt_tokens_details": st.just({})},
)
top = st.fixed_dictionaries(
    {"id": text, "created": st.integers(0, 2**40), "model": text},
    optional={"system_fingerprint": st.none() | text, "service_tier": st.none() | text},
)


@st.composite
def token_logprobs(draw: st.DrawFn, tokens: list[str]) -> JSON:
    entries = [
        {"token": t, "logprob": draw(number), "bytes": list(t.encode()), "top_logprobs": []}
        for t in tokens
    ]
    return {"content": entries, "refusal": None}


@st.composite
def chat_choice(draw: st.DrawFn, index: int) -> JSON:
    message: JSON = {"role": "assistant"}
    pieces = draw(st.lists(word, max_size=4))
    has_text = draw(st.booleans())
    message["content"] = "".join(pieces) if has_text else None
    if draw(st.booleans()):
        message["refusal"] = draw(st.none() | text)
    if draw(st.booleans()):
        message["tool_calls"] = [
            {"id": draw(word), "type": "function", "function": {"name": draw(text), "arguments": a}}
            for a in draw(st.lists(text, min_size=1, max_size=3))
        ]
    if draw(st.booleans()):
        message["annotations"] = []
    if draw(st.booleans()):
        message["reasoning_content"] = draw(text)
    logprobs: Any = None
    kind = draw(st.sampled_from(["none", "tokens", "whole"]))
    if kind == "tokens" and has_text and pieces:
        logprobs = draw(token_logprobs(pieces))
    elif kind == "whole":
        logprobs = {"content": [], "refusal": draw(st.none() | st.just([]))}
    return {
        "index": index,
        "message": message,
        "logprobs": logprobs,
        "finish_reason": draw(finish),
    }


@st.composite
def chat_answer(draw: st.DrawFn) -> JSON:
    count = draw(st.integers(1, 3))
    return {
        **draw(top),
        "object": "chat.completion",
        "choices": [draw(chat_choice(i)) for i in range(count)],
        "usage": draw(usage),
    }


@st.composite
def completion_answer(draw: st.DrawFn) -> JSON:
    choices = []
    for index in range(draw(st.integers(1, 3))):
        pieces = draw(st.lists(word, max_size=4))
        logprobs: Any = None
        if draw(st.booleans()):
            logprobs = {
                "tokens": pieces,
                "token_logprobs": [draw(number) for _ in pieces],
                "top_logprobs": [None for _ in pieces],
                "text_offset": list(range(len(pieces))),
            }
        choices.append(
            {
                "text": "".join(pieces),
                "index": index,
                "logprobs": logprobs,
                "finish_reason": draw(finish),
            }
        )
    return {**draw(top), "object": "text_completion", "choices": choices, "usage": draw(usage)}


@st.composite
def response_answer(draw: st.DrawFn) -> JSON:
    output: list[JSON] = []
    for position in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["message", "function_call", "reasoning"]))
        if kind == "message":
            parts: list[JSON] = [
                {"type": "output_text", "text": draw(text), "annotations": [], "logprobs": []}
                if draw(st.booleans())
                else {"type": "refusal", "refusal": draw(text)}
                for _ in range(draw(st.integers(0, 2)))
            ]
            item: JSON = {
                "id": f"msg_{position}",
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": parts,
            }
        elif kind == "function_call":
            item = {
                "type": "function_call",
                "id": f"fc_{position}",
                "call_id": draw(word),
                "name": draw(word),
                "arguments": draw(text),
                "status": "completed",
            }
        else:
            item = {"type": "reasoning", "id": f"rs_{position}", "summary": []}
        output.append(item)
    return {
        "id": draw(text),
        "object": "response",
        "created_at": draw(st.integers(0, 2**40)),
        "status": draw(st.sampled_from(["completed", "incomplete", "failed"])),
        "error": None,
        "incomplete_details": None,
        "model": draw(text),
        "output": output,
        "usage": draw(st.none() | st.just({"input_tokens": 1, "output_tokens": 2})),
    }


@settings(max_examples=80, deadline=None)
@given(chat_answer())
def test_any_chat_object_round_trips(answer: JSON) -> None:
    chunks = payloads(converted(CHAT, answer))
    assert assemble_chat(chunks) == answer
    assert choices_finished(chunks)
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    for chunk in chunks:
        for part in chunk["choices"]:
            calls = part["delta"].get("tool_calls") or ()
            # A tool call's first chunk names it; its arguments come in a later one.
            assert all(("id" in c) == (c["function"].get("arguments") == "") for c in calls)


@settings(max_examples=80, deadline=None)
@given(completion_answer())
def test_any_completion_object_round_trips(answer: JSON) -> None:
    chunks = payloads(converted(COMPLETIONS, answer))
    assert assemble_completion(chunks) == answer
    assert choices_finished(chunks)


@settings(max_examples=80, deadline=None)
@given(response_answer())
def test_any_response_object_round_trips(answer: JSON) -> None:
    events = payloads(converted(RESPONSES, answer))
    assert assemble_response(events) == answer
    assert_item_events_rebuild(events, answer)
    assert events[-1]["type"] == f"response.{answer['status']}"


# -- the SDK's own stream accumulators ------------------------------------------------------------


@pytest.mark.parametrize("body", CHAT_BODIES.values(), ids=CHAT_BODIES.keys())
def test_the_sdk_accumulates_the_chat_stream_into_the_object(body: JSON) -> None:
    choices, usage = plan_chat(body, FakeSettings(tokens=5))
    whole = chat_object(CHAT_META, choices, usage)
    state: ChatCompletionStreamState[None] = ChatCompletionStreamState()
    for chunk in payloads(converted(CHAT, whole)):
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    # The snapshot, not get_final_completion(): that one raises on finish_reason "length".
    final = state.current_completion_snapshot.model_dump(mode="json", exclude_none=True)
    expected = ChatCompletion.model_validate(whole).model_dump(mode="json", exclude_none=True)
    for choice in final["choices"]:
        choice["message"].pop("parsed", None)  # the SDK's own additions
        for call in choice["message"].get("tool_calls") or ():
            call.pop("index", None)
            call["function"].pop("parsed_arguments", None)
    assert final == expected


def test_the_sdk_accumulates_the_responses_stream_into_the_object() -> None:
    plan, usage = plan_response({"input": "Say hello"}, FakeSettings(tokens=5))
    whole = response_object(RESPONSE_META, "msg_1", plan, usage)
    state: ResponseStreamState[None] = ResponseStreamState(input_tools=omit, text_format=omit)
    for event in payloads(converted(RESPONSES, whole)):
        # Built as the SDK builds what it reads off the wire: loosely, not validated.
        state.handle_event(
            cast(ResponseStreamEvent, construct_type(type_=ResponseStreamEvent, value=event))
        )
    snapshot = state._completed_response  # set by the terminal event
    assert snapshot is not None
    assert snapshot.output_text == "".join(plan.pieces)


def test_dialect_fields_go_where_their_upstreams_stream_them() -> None:
    # vLLM puts `stop_reason` on the choice; Azure adds content filter results to it and
    # prompt filter results to the top. A choice's own fields ride on its finish chunk,
    # top-level ones on every chunk, as each dialect streams them.
    answer: JSON = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "prompt_filter_results": [{"prompt_index": 0}],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi"},
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": None,
                "content_filter_results": {"hate": {"filtered": False}},
            }
        ],
        "usage": None,
    }
    chunks = payloads(converted(CHAT, answer))
    assert [c["choices"][0].get("stop_reason", "absent") for c in chunks] == [
        "absent",
        "absent",
        None,
    ]
    assert chunks[-1]["choices"][0]["content_filter_results"] == {"hate": {"filtered": False}}
    assert all(c["prompt_filter_results"] == [{"prompt_index": 0}] for c in chunks)
    assert converted(CHAT, answer).usage_event is None  # no usage, no usage chunk
