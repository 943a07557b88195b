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


@pytest.mark.parametrize(
    ("endpoint", "stream", "ending"),
    [
        (CHAT, CHAT_WHOLE, Ending.COMPLETE),
        (CHAT, _sse(_chunk("Hel"), _chunk("lo"), b"[DONE]"), Ending.INCOMPLETE),
        (CHAT, _sse(_chunk("Hel"), _chunk("lo", "stop")), Ending.TRUNCATED),
        (CHAT, _sse(_chunk("Hel"), {"error": {"message": "boom"}}), Ending.UPSTREAM_ERROR),
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
        assert b"".join(e.raw for e in events) == stream


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


def test_upstream_body_asks_for_a_stream_with_usage_only_where_the_endpoint_says() -> None:
    body = {"model": "m", "stream_options": {"x": 1}}
    assert CHAT.upstream_body(body) == {
        "model": "m",
        "stream": True,
        "stream_options": {"x": 1, "include_usage": True},
    }
    assert RESPONSES.upstream_body(body) == {**body, "stream": True}
    assert EMBEDDINGS.upstream_body(body) is body
