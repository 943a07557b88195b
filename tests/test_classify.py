"""The sans-IO event classifier and the endpoint table, fed input split at every byte."""

from __future__ import annotations

import orjson
import pytest

from proxy.classify import Ending, EventClassifier, Outcome
from proxy.endpoint import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, Endpoint, endpoint_of
from proxy.sse import SSEDecoder
from proxy.stream import LogEvent


def _sse(*payloads: object) -> bytes:
    out = b""
    for payload in payloads:
        data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        out += b"data: " + data + b"\n\n"
    return out


def _chunk(content: str | None, finish: str | None = None) -> dict[str, object]:
    delta = {} if content is None else {"content": content}
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


USAGE = {"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": {"total_tokens": 3}}
CHAT_WHOLE = _sse(_chunk("Hel"), _chunk("lo", "stop"), USAGE, b"[DONE]")


def _classify(endpoint: Endpoint, parts: list[bytes]) -> tuple[list[LogEvent], Outcome]:
    # As the upstream stage does: the decoder's end of input, then the verdict.
    decoder = SSEDecoder()
    classifier = EventClassifier(endpoint)
    events = [classifier.feed(e) for part in parts for e in decoder.feed(part)]
    events += [classifier.feed(e) for e in decoder.finish()]
    return events, classifier.finish(truncated=decoder.truncated)


def _every_split(stream: bytes) -> list[list[bytes]]:
    return [[stream[:i], stream[i:]] for i in range(len(stream) + 1)] + [
        [stream[i : i + 1] for i in range(len(stream))]
    ]


@pytest.mark.parametrize(
    ("endpoint", "stream", "ending"),
    [
        (CHAT, CHAT_WHOLE, Ending.COMPLETE),
        (CHAT, _sse(_chunk("Hel"), _chunk("lo"), b"[DONE]"), Ending.INCOMPLETE),
        # No [DONE], but every choice finished and the input ended cleanly: whole.
        (CHAT, _sse(_chunk("Hel"), _chunk("lo", "stop")), Ending.COMPLETE),
        (CHAT, _sse(_chunk("Hel"), _chunk("lo", "stop"), USAGE), Ending.COMPLETE),
        (CHAT, _sse(_chunk("Hel"), _chunk("lo")), Ending.TRUNCATED),
        # Every choice finished, then an event begun and never ended: cut.
        (CHAT, _sse(_chunk("Hel"), _chunk("lo", "stop")) + b'data: {"id"', Ending.TRUNCATED),
        (CHAT, CHAT_WHOLE.replace(b"\n", b"\r"), Ending.COMPLETE),
        (CHAT, _sse(_chunk("Hel"), _chunk("lo", "stop")).replace(b"\n", b"\r\n"), Ending.COMPLETE),
        (CHAT, _sse(_chunk("Hel"), {"error": {"message": "boom"}}), Ending.UPSTREAM_ERROR),
        (CHAT, _sse(_chunk("Hel"), b"not json", _chunk("lo", "stop"), b"[DONE]"), Ending.MALFORMED),
        (CHAT, _sse(_chunk("Hel"), b"[1, 2]", _chunk("lo", "stop"), b"[DONE]"), Ending.MALFORMED),
        (
            RESPONSES,
            _sse(
                {"type": "response.created", "response": {"status": "in_progress"}},
                {"type": "response.completed", "response": {"id": "r", "status": "completed"}},
            ),
            Ending.COMPLETE,
        ),
        (
            RESPONSES,
            _sse({"type": "response.incomplete", "response": {"id": "r", "status": "incomplete"}}),
            Ending.INCOMPLETE,
        ),
        (RESPONSES, _sse({"type": "response.created"}, b"[DONE]"), Ending.TRUNCATED),
        (RESPONSES, _sse({"type": "response.created"}), Ending.TRUNCATED),
        (
            RESPONSES,
            _sse({"type": "response.created"}, {"type": "error", "code": "x", "message": "m"}),
            Ending.UPSTREAM_ERROR,
        ),
        (EMBEDDINGS, _sse({"data": []}, b"[DONE]"), Ending.COMPLETE),
    ],
)
def test_outcome_is_the_same_at_every_byte_split(
    endpoint: Endpoint, stream: bytes, ending: Ending
) -> None:
    whole_events, whole = _classify(endpoint, [stream])
    assert whole.ending is ending
    for parts in _every_split(stream):
        events, outcome = _classify(endpoint, parts)
        assert outcome == whole
        assert events == whole_events
        logged = b"".join(e.raw for e in events)
        # What a cut left unfinished is not an event: it is never logged.
        assert logged == stream or (ending is Ending.TRUNCATED and stream.startswith(logged))


def test_chat_events_are_logged_parsed_with_the_usage_chunk_marked() -> None:
    events, outcome = _classify(CHAT, [CHAT_WHOLE])
    assert [e.usage_only for e in events] == [False, False, True, False]
    assert events[-1].data is None  # [DONE] is not JSON
    assert outcome.assembled is not None
    body = orjson.loads(outcome.assembled)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == "Hello"
    assert body["usage"] == {"total_tokens": 3}


def test_a_responses_stream_assembles_to_its_terminal_object() -> None:
    final = {"id": "r", "status": "completed", "output": []}
    _, outcome = _classify(RESPONSES, [_sse({"type": "response.completed", "response": final})])
    assert outcome == Outcome(Ending.COMPLETE, orjson.dumps(final))


def test_an_upstream_error_is_never_assembled() -> None:
    error = {"code": 429, "message": "slow down"}
    _, outcome = _classify(CHAT, [_sse(_chunk("a", "stop"), {"error": error}, b"[DONE]")])
    assert outcome == Outcome(Ending.UPSTREAM_ERROR, None, error)


def test_an_in_band_error_is_the_upstreams_own_error_object() -> None:
    # A chunk with `error` and finish_reason "error" (OpenRouter, LiteLLM), no [DONE].
    failing = {**_chunk("", "error"), "error": {"code": 429, "message": "Rate limited"}}
    _, outcome = _classify(CHAT, [_sse(_chunk("Hel"), failing)])
    assert outcome.ending is Ending.UPSTREAM_ERROR
    assert outcome.error == {"code": 429, "message": "Rate limited"}
    # A Responses `error` event: its own fields are the error, not its type or number.
    event = {"type": "error", "code": "rate_limit_exceeded", "message": "m", "param": None}
    _, outcome = _classify(RESPONSES, [_sse({**event, "sequence_number": 3})])
    assert outcome.error == {"code": "rate_limit_exceeded", "message": "m", "param": None}


def test_an_error_key_the_sdk_would_not_raise_on_is_no_error() -> None:
    # The SDK raises only on a truthy `error`; `"error": null` is just a field.
    _, outcome = _classify(CHAT, [_sse({**_chunk("a", "stop"), "error": None}, b"[DONE]")])
    assert outcome.ending is Ending.COMPLETE


@pytest.mark.parametrize(
    "choices",
    [
        [],  # OpenAI
        [{"index": 0, "delta": {}}],  # LiteLLM
        [{"index": 0, "delta": {}, "finish_reason": None, "logprobs": None}],
        [{"text": "", "index": 0}],  # LiteLLM, a text completion
    ],
)
def test_the_usage_chunk_is_marked_whatever_its_choices(choices: list[object]) -> None:
    usage = {**USAGE, "choices": choices}
    events, outcome = _classify(CHAT, [_sse(_chunk("Hel"), _chunk("lo", "stop"), usage)])
    assert [e.usage_only for e in events] == [False, False, True]
    assert outcome.ending is Ending.COMPLETE


def test_a_chunk_with_content_or_a_finish_is_never_the_usage_chunk() -> None:
    # llama.cpp's last completion chunk carries usage with its finish reason.
    finishing = {**_chunk("lo", "stop"), "usage": {"total_tokens": 3}}
    events, _ = _classify(CHAT, [_sse(_chunk("Hel"), finishing, b"[DONE]")])
    assert [e.usage_only for e in events] == [False, False, False]
    # Nor does a Responses event carrying usage count: that endpoint adds none.
    done = {"type": "response.completed", "response": {"status": "completed"}, "usage": {}}
    events, _ = _classify(RESPONSES, [_sse(done)])
    assert [e.usage_only for e in events] == [False]


@pytest.mark.parametrize(
    ("method", "path", "endpoint"),
    [
        ("POST", "/v1/chat/completions", CHAT),
        ("POST", "/v1/completions", COMPLETIONS),
        ("POST", "/v1/embeddings", EMBEDDINGS),
        ("POST", "/v1/responses", RESPONSES),
        ("GET", "/v1/chat/completions", None),
        ("POST", "/v1/models", None),
        ("POST", "/v1/chat/completions/", None),
    ],
)
def test_endpoint_of(method: str, path: str, endpoint: Endpoint | None) -> None:
    assert endpoint_of(method, path) is endpoint


def test_upstream_body_asks_for_a_stream_with_usage_only_where_the_endpoint_says() -> None:
    body = {"model": "m", "stream_options": {"x": 1}}
    assert CHAT.upstream_body(body) == {
        "model": "m",
        "stream": True,
        "stream_options": {"x": 1, "include_usage": True},
    }
    assert RESPONSES.upstream_body(body) == {**body, "stream": True}
    assert EMBEDDINGS.upstream_body(body) is body
