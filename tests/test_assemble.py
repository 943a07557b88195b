"""Assembly rules, each pinned on the smallest input that showed its fault (issue 11)."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.assemble import assemble_chat, assemble_completion, assemble_response, is_usage_chunk

HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def _chunk(delta: dict[str, Any], index: int = 0, finish: str | None = None) -> dict[str, Any]:
    return {**HEAD, "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}


def _message(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    message: dict[str, Any] = assemble_chat(chunks)["choices"][0]["message"]
    return message


def test_every_string_field_streamed_in_pieces_is_concatenated() -> None:
    message = _message(
        [
            _chunk({"role": "assistant", "content": ""}),
            _chunk({"reasoning_content": "The user "}),
            _chunk({"reasoning_content": "wants a greeting."}),
            _chunk({"function_call": {"name": "f", "arguments": '{"a"'}}),
            _chunk({"function_call": {"arguments": ": 1}"}}),
            _chunk({"audio": {"id": "audio_1", "transcript": "Hel", "data": "AAA"}}),
            _chunk({"audio": {"transcript": "lo", "data": "BBB", "expires_at": 7}}),
            _chunk({"some_future_text": "a"}),
            _chunk({"some_future_text": "b", "content": "Hi"}),
            _chunk({}, finish="stop"),
        ]
    )
    assert message["reasoning_content"] == "The user wants a greeting."
    assert message["function_call"] == {"name": "f", "arguments": '{"a": 1}'}
    assert message["audio"] == {
        "id": "audio_1",
        "transcript": "Hello",
        "data": "AAABBB",
        "expires_at": 7,
    }
    assert message["some_future_text"] == "ab"
    assert message["content"] == "Hi"


def test_a_list_of_objects_streamed_in_pieces_is_merged_element_by_element() -> None:
    text = {"type": "reasoning.text", "format": "anthropic-claude-v1"}
    message = _message(
        [
            # OpenRouter: each detail says its `index`.
            _chunk({"reasoning_details": [{**text, "text": "Plan", "index": 0}]}),
            _chunk({"reasoning_details": [{**text, "text": " it", "index": 0}]}),
            _chunk({"reasoning_details": [{**text, "signature": "S", "index": 0}]}),
            _chunk(
                {"reasoning_details": [{"type": "reasoning.encrypted", "data": "E", "index": 1}]}
            ),
            # LiteLLM: no index; a piece continues the last block of its type.
            _chunk({"thinking_blocks": [{"thinking": "Let me "}]}),
            _chunk({"thinking_blocks": [{"thinking": "think."}]}),
            _chunk({"thinking_blocks": [{"thinking": "", "signature": "SIG=="}]}),
            _chunk({"thinking_blocks": [{"type": "redacted_thinking", "data": "R"}]}),
            # Two elements in one delta are two elements.
            _chunk({"citations": [{"type": "url", "url": "a"}, {"type": "url", "url": "b"}]}),
            _chunk({}, finish="stop"),
        ]
    )
    assert message["reasoning_details"] == [
        {**text, "text": "Plan it", "signature": "S", "index": 0},
        {"type": "reasoning.encrypted", "data": "E", "index": 1},
    ]
    assert message["thinking_blocks"] == [
        {"thinking": "Let me think.", "signature": "SIG=="},
        {"type": "redacted_thinking", "data": "R"},
    ]
    assert message["citations"] == [{"type": "url", "url": "a"}, {"type": "url", "url": "b"}]


def test_inside_a_nested_object_only_the_known_text_positions_are_pieces() -> None:
    psf = {"reasoning_details": "r1", "region": "eu"}
    message = _message(
        [
            _chunk({"role": "assistant", "provider_specific_fields": psf}),
            _chunk({"content": "Hi", "provider_specific_fields": psf}),
            _chunk({"provider_specific_fields": {**psf, "region": "us"}}, finish="stop"),
        ]
    )
    # Repeated whole in every chunk: the latest value, not "r1r1r1".
    assert message["provider_specific_fields"] == {"reasoning_details": "r1", "region": "us"}


def test_a_tool_call_answer_whose_only_content_was_the_role_chunks_is_null() -> None:
    call = {"index": 0, "id": "c1", "type": "function", "function": {"name": "f"}}
    more = {"index": 0, "function": {"arguments": "{}"}}
    # vLLM: `content: ""` on the role chunk, null in its own answer (and OpenAI's).
    vllm = _message(
        [
            _chunk({"role": "assistant", "content": ""}),
            _chunk({"tool_calls": [call]}),
            _chunk({"tool_calls": [more]}, finish="tool_calls"),
        ]
    )
    assert vllm["content"] is None
    # Ollama says "" beside each call, and in its whole answer too.
    whole = {**call, "function": {"name": "f", "arguments": "{}"}}
    ollama = _message(
        [
            _chunk({"role": "assistant", "content": "", "tool_calls": [whole]}),
            _chunk({"role": "assistant", "content": ""}, finish="tool_calls"),
        ]
    )
    assert ollama["content"] == ""
    # Text before the calls is content, whoever sends it.
    spoken = _message(
        [
            _chunk({"role": "assistant", "content": ""}),
            _chunk({"content": "Let me check."}),
            _chunk({"tool_calls": [call]}, finish="tool_calls"),
        ]
    )
    assert spoken["content"] == "Let me check."


def test_other_fields_keep_their_latest_value_that_is_not_null_or_empty() -> None:
    folded = assemble_chat(
        [
            # Azure's content-filter chunk: blank identity, no choices.
            {"id": "", "object": "", "created": 0, "model": "", "choices": [], "pf": [1]},
            {**HEAD, "choices": [{"index": 0, "delta": {"content": "a", "n": 1}, "cf": {"x": 1}}]},
            {
                **HEAD,
                "choices": [{"index": 0, "delta": {"n": None}, "cf": {}}],
                "timings": {"t": 2},
            },
            {"id": "", "object": "", "created": 0, "model": "", "choices": [], "usage": None},
        ]
    )
    assert (folded["id"], folded["created"], folded["model"]) == ("chatcmpl-1", 1, "m")
    assert (folded["pf"], folded["timings"], folded["usage"]) == ([1], {"t": 2}, None)
    choice = folded["choices"][0]
    assert (choice["cf"], choice["message"]["n"]) == ({"x": 1}, 1)


def test_a_tool_call_name_repeated_in_every_delta_is_set_once() -> None:
    # llama.cpp server (before ggml-org/llama.cpp#13800) repeats the name in every delta.
    def piece(arguments: str) -> dict[str, Any]:
        call = {"index": 0, "id": "call_1", "type": "function"}
        function = {"name": "get_weather", "arguments": arguments}
        return _chunk({"tool_calls": [{**call, "function": function}]})

    message = _message(
        [
            piece('{"location": '),
            piece('"Paris"}'),
            _chunk({}, finish="tool_calls"),
        ]
    )
    assert message["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'},
        }
    ]


def test_a_new_id_at_an_occupied_index_opens_a_new_call() -> None:
    # Ollama sends parallel calls whole, each at index 0, told apart by their ids.
    def whole(call_id: str, city: str) -> dict[str, Any]:
        function = {"name": "get_weather", "arguments": f'{{"location": "{city}"}}'}
        call = {"id": call_id, "index": 0, "type": "function", "function": function}
        return _chunk({"role": "assistant", "content": "", "tool_calls": [call]})

    message = _message(
        [whole("call_a", "Paris"), whole("call_b", "Lima"), _chunk({}, 0, "tool_calls")]
    )
    assert [(c["id"], c["function"]["arguments"]) for c in message["tool_calls"]] == [
        ("call_a", '{"location": "Paris"}'),
        ("call_b", '{"location": "Lima"}'),
    ]
    # The same id again continues its call; calls without any index are told apart by id too.
    again = _message(
        [
            _chunk({"tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{"}}]}),
            _chunk({"tool_calls": [{"id": "c1", "function": {"arguments": "}"}}]}),
            _chunk({"tool_calls": [{"id": "c2", "function": {"name": "g", "arguments": "[]"}}]}),
        ]
    )
    assert [(c["id"], c["function"]) for c in again["tool_calls"]] == [
        ("c1", {"name": "f", "arguments": "{}"}),
        ("c2", {"name": "g", "arguments": "[]"}),
    ]


def test_openai_parallel_calls_by_index_still_fold_in_index_order() -> None:
    opening = [
        {
            "index": i,
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": n, "arguments": ""},
        }
        for i, n in ((0, "a"), (1, "b"))
    ]
    message = _message(
        [
            _chunk({"tool_calls": [opening[0]]}),
            _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
            _chunk({"tool_calls": [opening[1]]}),
            _chunk({"tool_calls": [{"index": 1, "function": {"arguments": "[]"}}]}),
        ]
    )
    assert [(c["id"], c["function"]["arguments"]) for c in message["tool_calls"]] == [
        ("call_0", "{}"),
        ("call_1", "[]"),
    ]


USAGE = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


@pytest.mark.parametrize(
    ("chunk", "usage_chunk"),
    [
        ({**HEAD, "choices": [], "usage": USAGE}, True),  # OpenAI, vLLM, Ollama, llama.cpp
        ({**HEAD, "choices": [{"index": 0, "delta": {}}], "usage": USAGE}, True),  # LiteLLM
        ({**HEAD, "choices": [{"index": 0, "delta": {"content": ""}}], "usage": USAGE}, True),
        ({**HEAD, "choices": [{"text": "", "index": 0}], "usage": USAGE}, True),  # completions
        ({**HEAD, "choices": [], "usage": None}, False),
        ({"id": "", "choices": [], "prompt_filter_results": []}, False),  # Azure's filter chunk
        # Usage riding on a chunk that says something is not withheld.
        (
            {
                **HEAD,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                "usage": USAGE,
            },
            False,
        ),
        ({**HEAD, "choices": [{"index": 0, "delta": {"content": "Hi"}}], "usage": USAGE}, False),
        # OpenRouter's usage chunk repeats the role: it says nothing.
        ({**HEAD, "choices": [{"index": 0, "delta": {"role": "assistant"}}], "usage": USAGE}, True),
        (
            {
                **HEAD,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
                "usage": USAGE,
            },
            True,
        ),
        ({**HEAD, "choices": [{"index": 0, "delta": {"refusal": "No"}}], "usage": USAGE}, False),
        (
            {
                **HEAD,
                "choices": [{"index": 0, "delta": {"reasoning_content": "Hm"}}],
                "usage": USAGE,
            },
            False,
        ),
        ({**HEAD, "choices": [{"index": 0, "delta": {"tool_calls": [{}]}}], "usage": USAGE}, False),
        ({**HEAD, "choices": [{"text": "Hi", "index": 0}], "usage": USAGE}, False),
    ],
    ids=[
        "empty_choices",
        "litellm_empty_delta",
        "empty_content",
        "completion_empty_text",
        "null_usage",
        "azure_filter",
        "finish",
        "content",
        "role",
        "role_empty_content",
        "refusal",
        "reasoning",
        "tool_call",
        "completion_text",
    ],
)
def test_the_usage_chunk_is_known_by_what_it_carries(
    chunk: dict[str, Any], usage_chunk: bool
) -> None:
    assert is_usage_chunk(chunk) is usage_chunk


def test_completion_choices_keep_unknown_fields() -> None:
    folded = assemble_completion(
        [
            {
                **HEAD,
                "choices": [{"text": "a", "index": 0, "logprobs": None, "finish_reason": None}],
            },
            {
                **HEAD,
                "choices": [{"text": "b", "index": 0, "finish_reason": "stop", "stop_reason": 7}],
            },
        ]
    )
    assert folded["choices"] == [
        {"text": "ab", "index": 0, "logprobs": None, "finish_reason": "stop", "stop_reason": 7}
    ]


def _item(n: int) -> dict[str, Any]:
    part = {"type": "output_text", "text": f"t{n}", "annotations": []}
    return {"id": f"msg_{n}", "type": "message", "status": "completed", "content": [part]}


def test_a_responses_object_is_rebuilt_from_its_items_when_the_snapshot_has_none() -> None:
    response: dict[str, Any] = {"id": "resp_1", "object": "response", "status": "completed"}
    response["output"] = []
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": {**response, "status": "in_progress"}},
        {"type": "response.output_item.done", "output_index": 1, "item": _item(1)},
        {"type": "response.output_item.done", "output_index": 0, "item": _item(0)},
        {"type": "response.completed", "response": response},
    ]
    assert assemble_response(events) == {**response, "output": [_item(0), _item(1)]}
    # Without output_index (llama.cpp), the order of arrival is the order.
    bare = [{k: v for k, v in e.items() if k != "output_index"} for e in events]
    assert assemble_response(bare) == {**response, "output": [_item(1), _item(0)]}


def test_a_responses_snapshot_with_output_is_kept_as_sent() -> None:
    response: dict[str, Any] = {"id": "resp_1", "status": "completed", "output": [_item(9)]}
    events: list[dict[str, Any]] = [
        {"type": "response.output_item.done", "output_index": 0, "item": _item(0)},
        {"type": "response.completed", "response": response},
    ]
    assert assemble_response(events) == response
    assert assemble_response(events[:1]) is None  # no terminal event: not a whole answer


def test_a_folded_chat_answer_leaves_out_the_chunks_obfuscation() -> None:
    from proxy.assemble import assemble_chat

    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    chunks = [
        {**base, "obfuscation": "Zx", "choices": [{"index": 0, "delta": {"role": "assistant"}}]},
        {**base, "obfuscation": "q1", "choices": [{"index": 0, "delta": {"content": "hi"}}]},
        {
            **base,
            "obfuscation": "k",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        },
    ]
    folded = assemble_chat(chunks)
    assert "obfuscation" not in folded
    assert folded["choices"][0]["message"]["content"] == "hi"
