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
    decoder = SSEDecoder()
    classifier = EventClassifier(endpoint)
    events = [classifier.feed(e) for part in parts for e in decoder.feed(part)]
    return events, classifier.finish()


def _every_split(stream: bytes) -> list[list[bytes]]:
    return [[stream[:i], stream[i:]] for i in range(len(stream) + 1)] + [
        [stream[i : i + 1] for i in range(len(stream))]
    ]


def _typed(payload: dict[str, object]) -> bytes:
    return b"event: " + str(payload["type"]).encode() + b"\n" + _sse(payload)


def _summary(outcome: Outcome) -> tuple[Ending, bytes | None, bool | None]:
    assembly = outcome.assembly
    if assembly is None:
        return outcome.ending, None, None
    return outcome.ending, assembly.body(), assembly.whole()


@pytest.mark.parametrize(
    ("endpoint", "stream", "ending", "whole"),
    [
        (CHAT, CHAT_WHOLE, Ending.COMPLETE, True),
        (CHAT, _sse(_chunk("Hel"), _chunk("lo"), b"[DONE]"), Ending.COMPLETE, False),
        (CHAT, _sse(_chunk("Hel"), _chunk("lo", "stop")), Ending.TRUNCATED, None),
        (CHAT, _sse(_chunk("Hel"), {"error": {"message": "boom"}}), Ending.UPSTREAM_ERROR, None),
        (
            RESPONSES,
            _sse(
                {"type": "response.created", "response": {"status": "in_progress"}},
                {"type": "response.completed", "response": {"id": "r", "status": "completed"}},
            ),
            Ending.COMPLETE,
            True,
        ),
        (
            RESPONSES,
            _typed({"type": "response.created", "response": {"status": "in_progress"}})
            + _typed(
                {"type": "response.completed", "response": {"id": "r", "status": "completed"}}
            ),
            Ending.COMPLETE,
            True,
        ),
        (
            RESPONSES,
            _sse({"type": "response.incomplete", "response": {"id": "r", "status": "incomplete"}}),
            Ending.COMPLETE,
            False,
        ),
        (RESPONSES, _sse({"type": "response.created"}, b"[DONE]"), Ending.TRUNCATED, None),
        (EMBEDDINGS, _sse({"data": []}, b"[DONE]"), Ending.COMPLETE, True),
    ],
)
def test_outcome_is_the_same_at_every_byte_split(
    endpoint: Endpoint, stream: bytes, ending: Ending, whole: bool | None
) -> None:
    whole_events, outcome = _classify(endpoint, [stream])
    expected = _summary(outcome)
    assert expected[0] is ending and expected[2] is whole
    for parts in _every_split(stream):
        events, outcome = _classify(endpoint, parts)
        assert _summary(outcome) == expected
        assert events == whole_events
        assert b"".join(e.raw for e in events) == stream


def test_chat_events_are_logged_with_the_usage_chunk_marked() -> None:
    events, outcome = _classify(CHAT, [CHAT_WHOLE])
    assert [e.usage_only for e in events] == [False, False, True, False]
    assert outcome.assembly is not None
    body = orjson.loads(outcome.assembly.body() or b"null")
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == "Hello"
    assert body["usage"] == {"total_tokens": 3}


def test_a_usage_chunk_is_found_whatever_its_spacing() -> None:
    spaced = b'{"id": "c1", "choices" : [ ], "usage": {"total_tokens": 3}}'
    events, _ = _classify(CHAT, [_sse(_chunk("Hi", "stop"), spaced, b"[DONE]")])
    assert [e.usage_only for e in events] == [False, True, False]
    # Not a usage chunk: no usage, or choices that are not empty.
    events, _ = _classify(CHAT, [_sse({"choices": [], "usage": None}, b"[DONE]")])
    assert [e.usage_only for e in events] == [False, False]


def test_a_stream_ends_on_its_marker_whatever_its_data() -> None:
    # Not JSON, but ended by [DONE]: logging and ending never parse the data.
    decoder = SSEDecoder()
    classifier = EventClassifier(CHAT)
    for event in decoder.feed(b"data: {not json\n\ndata: [DONE]\n\n"):
        classifier.feed(event)
    outcome = classifier.finish()
    assert outcome.ending is Ending.COMPLETE and outcome.assembly is not None
    assert outcome.assembly.whole() is False  # parsed now: nothing in it finished


def test_a_responses_stream_assembles_to_its_terminal_object() -> None:
    final = {"id": "r", "status": "completed", "output": []}
    _, outcome = _classify(RESPONSES, [_sse({"type": "response.completed", "response": final})])
    assert _summary(outcome) == (Ending.COMPLETE, orjson.dumps(final), True)


def test_an_upstream_error_is_never_assembled() -> None:
    _, outcome = _classify(CHAT, [_sse(_chunk("a", "stop"), {"error": {}}, b"[DONE]")])
    assert outcome == Outcome(Ending.UPSTREAM_ERROR, None)


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


BIG = 2**70  # past 64 bits: parsed, it would come back a float


@pytest.mark.parametrize("endpoint", [CHAT, COMPLETIONS, RESPONSES, EMBEDDINGS])
def test_a_plain_call_goes_upstream_as_the_callers_bytes(endpoint: Endpoint) -> None:
    raw = b'{"model": "m", "seed": %d, "stream": false}' % BIG
    assert endpoint.upstream_bytes(orjson.loads(raw), raw, wants_stream=False) is raw


def test_a_streamed_call_asks_for_usage_only_where_the_endpoint_says() -> None:
    raw = b' {"model": "m", "seed": %d, "stream": true}' % BIG
    body = orjson.loads(raw)
    sent = CHAT.upstream_bytes(body, raw, wants_stream=True)
    assert b"%d" % BIG in sent  # spliced in, not re-serialised
    assert orjson.loads(sent) == {**body, "stream_options": {"include_usage": True}}
    assert COMPLETIONS.upstream_bytes(body, raw, wants_stream=True) == sent
    assert RESPONSES.upstream_bytes(body, raw, wants_stream=True) is raw
    asked = b'{"stream": true, "stream_options": {"include_usage": true}}'
    assert CHAT.upstream_bytes(orjson.loads(asked), asked, wants_stream=True) is asked
    other = {"model": "m", "stream": True, "stream_options": {"x": 1}}
    assert orjson.loads(CHAT.upstream_bytes(other, orjson.dumps(other), wants_stream=True)) == {
        **other,
        "stream_options": {"x": 1, "include_usage": True},
    }
    null = {"model": "m", "stream": True, "stream_options": None}
    assert orjson.loads(CHAT.upstream_bytes(null, orjson.dumps(null), wants_stream=True)) == {
        **null,
        "stream_options": {"include_usage": True},
    }
