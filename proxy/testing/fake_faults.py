"""Answers the fake upstream gives instead of a well-formed one: pure, no I/O.

Two knobs of `FakeSettings`, each the shape real servers were seen to send:

* `inband_error` (a status, e.g. 429): the stream starts well, then carries
  the upstream's own error inside its 200 and ends, with no `[DONE]` or
  terminal event. A chat or completion stream sends a chunk with `error`
  and `finish_reason: "error"` (OpenRouter, LiteLLM); a Responses stream a
  `type: "error"` event (OpenAI). A non-stream call gets the same error
  object with that status, as the server would have answered it whole.
* `bad_body`: a 200 that is not the endpoint's answer: `text` (text/plain),
  `json` (application/json that does not parse), `event` (a stream whose
  second event is not JSON; a non-stream call gets `json`).
"""

from __future__ import annotations

from proxy.testing.fake_answers import JSON

__all__ = [
    "BAD_BODIES",
    "NOT_JSON",
    "bad_answer",
    "chunk_error",
    "error_chunk",
    "error_event",
    "response_error",
]

BAD_BODIES = ("text", "json", "event")
NOT_JSON = b"upstream says hello, not in JSON"
_CUT_JSON = b'{"id": "cut", "choices": ['


def chunk_error(status: int) -> JSON:
    """The error object of a chat or completion stream's error chunk."""
    return {"code": status, "message": f"The fake upstream failed mid-stream ({status})."}


def response_error(status: int) -> JSON:
    """The fields of a Responses `error` event: its code says the status in words."""
    code = "rate_limit_exceeded" if status == 429 else "server_error"
    message = f"The fake upstream failed mid-stream ({status})."
    return {"code": code, "message": message, "param": None}


def error_chunk(first: JSON, status: int, text: bool) -> JSON:
    """The chunk that ends a chat (or, `text`, completion) stream with an error."""
    names = ("id", "object", "created", "model")
    head: JSON = {name: first[name] for name in names if name in first}
    part: JSON = {"index": 0, "finish_reason": "error"}
    part.update({"text": ""} if text else {"delta": {"content": ""}})
    return {**head, "error": chunk_error(status), "choices": [part]}


def error_event(status: int, sequence_number: int) -> JSON:
    return {"type": "error", **response_error(status), "sequence_number": sequence_number}


def bad_answer(kind: str) -> tuple[str, bytes]:
    """(Content-Type, body) of a 200 that is not the endpoint's answer."""
    if kind == "text":
        return "text/plain; charset=utf-8", NOT_JSON
    return "application/json", _CUT_JSON
