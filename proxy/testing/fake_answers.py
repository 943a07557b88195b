"""What the fake upstream answers: OpenAI-shaped bodies planned from a request body.

It owns the fake's content and wire shapes, with no I/O: each answer is a
deterministic function of the prompt and `FakeSettings`, planned once (`plan_*`)
and then either framed as stream chunks (`chat_chunks`, `completion_chunks`,
`response_events`, with `sse` framing) or folded into one JSON object
(`chat_object`, `completion_object`, `response_object`). Both framings come from
the same plan, which is what keeps a streamed and a whole answer equal. A body
the fake refuses raises `Reject`; the server maps it to an error response.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import random
import struct
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import orjson

__all__ = [
    "DONE",
    "JSON",
    "MODELS",
    "Choice",
    "FakeSettings",
    "Reject",
    "canonical",
    "chat_chunks",
    "chat_object",
    "completion_chunks",
    "completion_object",
    "embeddings_object",
    "model_object",
    "plan_chat",
    "plan_completion",
    "plan_response",
    "refusal",
    "response_events",
    "response_object",
    "sse",
    "sse_typed",
    "usage_requested",
]

JSON = dict[str, Any]

MODELS = ("fake-model", "gpt-4o-mini", "text-embedding-3-small")
_CITIES = ("Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Quito", "Perth", "Turin")
_ARGUMENT_PIECE = 6  # characters per streamed tool-call argument fragment
_MAX_N = 128


@dataclass(frozen=True, slots=True)
class FakeSettings:
    tokens: int = 8  # content tokens per choice
    token_delay: float = 0.0  # seconds between two stream events
    ttft: float = 0.0  # seconds after response headers before the first event
    header_delay: float = 0.0  # seconds before sending response headers at all
    error_status: int | None = None  # answer every coalescible POST with this status
    error_times: int | None = None  # with error_status: only the first N such POSTs get it
    retry_after: str | None = None  # Retry-After on error answers (a 429's default is "1")
    retry_after_ms: int | None = None  # retry-after-ms on error answers, as OpenAI sends
    drop_after: int | None = None  # stream: abort the connection after N events
    require_key: str | None = None  # when set, 401 unless `Authorization: Bearer <key>`
    embedding_dims: int = 8
    token_padding: int = 0  # characters added to every content token, for large answers
    # A hostile upstream: "events" repeats a stream's content events (a whole
    # answer: its body) without end; "line" sends a stream that is one line
    # (`data: xxx...`), never ended.
    endless: str | None = None
    # "stream": 400 for `stream: true` (a model that may not stream); "stream_options":
    # 400 for a body with `stream_options` (older Azure api-versions).
    refuse: str | None = None

    def __post_init__(self) -> None:
        for field in fields(self):
            name, value, kind = field.name, getattr(self, field.name), _FIELD_KINDS[field.name]
            if value is None and name in _OPTIONAL_FIELDS:
                continue
            # bool is an int to isinstance, never a valid setting here.
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(f"{name}: {value!r} is not a valid value")
            if isinstance(value, int | float) and value < 0:
                raise ValueError(f"{name} must not be negative")
        if self.error_status is not None and not 400 <= self.error_status <= 599:
            raise ValueError("error_status must be between 400 and 599")
        if self.embedding_dims < 1:
            raise ValueError("embedding_dims must be at least 1")
        if self.endless not in (None, *ENDLESS):
            raise ValueError(f"endless must be one of {ENDLESS}")
        if self.refuse not in (None, "stream", "stream_options"):
            raise ValueError("refuse must be 'stream' or 'stream_options'")


_FIELD_KINDS: dict[str, type | tuple[type, ...]] = {
    "tokens": int,
    "token_delay": (int, float),
    "ttft": (int, float),
    "header_delay": (int, float),
    "error_status": int,
    "error_times": int,
    "retry_after": str,
    "retry_after_ms": int,
    "drop_after": int,
    "require_key": str,
    "embedding_dims": int,
    "token_padding": int,
    "endless": str,
    "refuse": str,
}
_OPTIONAL_FIELDS = frozenset(
    {
        "error_status",
        "error_times",
        "retry_after",
        "retry_after_ms",
        "drop_after",
        "require_key",
        "endless",
        "refuse",
    }
)
ENDLESS = ("events", "line")


class Reject(Exception):
    """A body the fake refuses, decided before any work; the server maps it to a response."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def canonical(body: Mapping[str, Any]) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


# -- the pure core: plans and their two framings ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Choice:
    index: int
    pieces: tuple[str, ...]  # content tokens, or tool-call argument fragments
    logprobs: tuple[float, ...] | None  # one per content token when asked for
    finish: str
    tool: tuple[str, str] | None = None  # (call id, function name) for a tool-call answer


def _rng(seed: bytes, index: int) -> random.Random:
    # Random seeded with bytes is stable across processes and runs, unlike hash().
    return random.Random(seed + index.to_bytes(4, "big"))


def _seed(*parts: Any) -> bytes:
    return hashlib.blake2b(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).digest()


def _words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(item) for item in value)
    if isinstance(value, dict):
        return sum(_words(item) for item in value.values())
    return 1 if isinstance(value, int) else 0  # token arrays count one per token


def _int_param(body: JSON, *names: str, default: int | None = None, low: int = 0) -> int | None:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise Reject(400, f"'{name}' must be an integer >= {low}", "invalid_value")
        return value
    return default


def _n(body: JSON) -> int:
    n = _int_param(body, "n", default=1, low=1)
    assert n is not None
    if n > _MAX_N:
        raise Reject(400, f"'n' must be at most {_MAX_N}", "invalid_value")
    return n


def _text_plan(seed: bytes, index: int, settings: FakeSettings, limit: int | None) -> Choice:
    count = settings.tokens if limit is None else min(settings.tokens, limit)
    rng = _rng(seed, index)
    pad = "." * settings.token_padding
    pieces = tuple(f"tok{rng.randrange(1000)}{pad} " for _ in range(count))
    logprobs = tuple(-round(rng.random() * 2, 4) for _ in range(count))
    finish = "length" if limit is not None and limit < settings.tokens else "stop"
    return Choice(index, pieces, logprobs, finish)


def _tool_to_call(body: JSON) -> tuple[str, str] | None:
    """(function name, argument name) when the answer must be a tool call."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not isinstance(tools, list) or choice == "none":
        return None
    functions = [
        t["function"]
        for t in tools
        if isinstance(t, dict) and isinstance(t.get("function"), dict)
        if isinstance(t["function"].get("name"), str)
    ]
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        named = [f for f in functions if f["name"] == choice["function"].get("name")]
        functions = named or functions
    if not functions:
        return None
    function = functions[0]
    parameters = function.get("parameters")
    properties = parameters.get("properties") if isinstance(parameters, dict) else None
    argument = next(iter(properties), "location") if isinstance(properties, dict) else "location"
    return function["name"], str(argument)


def plan_chat(body: JSON, settings: FakeSettings) -> tuple[list[Choice], JSON]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise Reject(400, "'messages' must be an array", "invalid_value")
    n = _n(body)
    limit = _int_param(body, "max_completion_tokens", "max_tokens")
    seed = _seed(messages)
    tool = _tool_to_call(body)
    choices: list[Choice] = []
    for index in range(n):
        if tool is None:
            plan = _text_plan(seed, index, settings, limit)
            if body.get("logprobs") is not True:
                plan = replace(plan, logprobs=None)
            choices.append(plan)
            continue
        name, argument = tool
        value = _CITIES[_rng(seed, index).randrange(len(_CITIES))]
        arguments = json.dumps({argument: value})  # OpenAI's own spacing: {"location": "Paris"}
        pieces = tuple(
            arguments[i : i + _ARGUMENT_PIECE] for i in range(0, len(arguments), _ARGUMENT_PIECE)
        )
        call_id = "call_" + hashlib.blake2b(seed + bytes([index % 256]), digest_size=12).hexdigest()
        choices.append(Choice(index, pieces, None, "tool_calls", (call_id, name)))
    return choices, _usage(_words(messages), choices)


def _usage(prompt: int, choices: list[Choice]) -> JSON:
    completion = sum(len(c.pieces) for c in choices)
    prompt = max(prompt, 1)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _interleave(per_choice: list[list[JSON]]) -> list[JSON]:
    # Round robin, like OpenAI: every chunk carries one choice.
    return [
        part for step in itertools.zip_longest(*per_choice) for part in step if part is not None
    ]


def _token_logprobs(token: str, logprob: float) -> JSON:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": []}


def chat_chunks(meta: JSON, choices: list[Choice], usage: JSON, include_usage: bool) -> list[JSON]:
    head = {"id": meta["id"], "object": "chat.completion.chunk", **meta}
    per_choice: list[list[JSON]] = []
    for c in choices:
        # A tool-call answer has no content at all, so its message content is null.
        role = {"role": "assistant", "content": None if c.tool else "", "refusal": None}
        parts = [_chat_part(c.index, role)]
        if c.tool is not None:
            call_id, name = c.tool
            opening = {"index": 0, "id": call_id, "type": "function"}
            function = {"name": name, "arguments": ""}
            parts.append(_chat_part(c.index, {"tool_calls": [{**opening, "function": function}]}))
        for i, piece in enumerate(c.pieces):
            delta: JSON = (
                {"content": piece}
                if c.tool is None
                else {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
            )
            part = _chat_part(c.index, delta)
            if c.logprobs is not None:
                entry = _token_logprobs(piece, c.logprobs[i])
                part["logprobs"] = {"content": [entry], "refusal": None}
            parts.append(part)
        parts.append({"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.finish})
        per_choice.append(parts)
    tail = {"usage": None} if include_usage else {}
    chunks = [{**head, "choices": [part], **tail} for part in _interleave(per_choice)]
    if include_usage:
        chunks.append({**head, "choices": [], "usage": usage})
    return chunks


def _chat_part(index: int, delta: JSON) -> JSON:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}


def chat_object(meta: JSON, choices: list[Choice], usage: JSON) -> JSON:
    out: list[JSON] = []
    for c in choices:
        message: JSON = {"role": "assistant", "content": None, "refusal": None}
        if c.tool is None:
            message["content"] = "".join(c.pieces)
        else:
            call_id, name = c.tool
            function = {"name": name, "arguments": "".join(c.pieces)}
            message["tool_calls"] = [{"id": call_id, "type": "function", "function": function}]
        logprobs = None
        if c.logprobs is not None:
            content = [_token_logprobs(p, lp) for p, lp in zip(c.pieces, c.logprobs, strict=True)]
            logprobs = {"content": content, "refusal": None}
        out.append(
            {"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": c.finish}
        )
    return {"id": meta["id"], "object": "chat.completion", **meta, "choices": out, "usage": usage}


def plan_completion(body: JSON, settings: FakeSettings) -> tuple[list[Choice], JSON]:
    prompt = body.get("prompt", "")
    # A string, a token array, or a list of either: one group of n choices per prompt.
    prompts: list[Any]
    if isinstance(prompt, str) or (
        isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)
    ):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt:
        prompts = prompt
    else:
        raise Reject(400, "'prompt' must be a string or an array", "invalid_value")
    n = _n(body)
    limit = _int_param(body, "max_tokens")
    choices = [
        replace(_text_plan(_seed(p), j, settings, limit), index=i * n + j, logprobs=None)
        for i, p in enumerate(prompts)
        for j in range(n)
    ]
    return choices, _usage(_words(prompts), choices)


def completion_chunks(
    meta: JSON, choices: list[Choice], usage: JSON, include_usage: bool
) -> list[JSON]:
    head = {"id": meta["id"], "object": "text_completion", **meta}
    per_choice = [
        [{"text": p, "index": c.index, "logprobs": None, "finish_reason": None} for p in c.pieces]
        + [{"text": "", "index": c.index, "logprobs": None, "finish_reason": c.finish}]
        for c in choices
    ]
    tail = {"usage": None} if include_usage else {}
    chunks = [{**head, "choices": [part], **tail} for part in _interleave(per_choice)]
    if include_usage:
        chunks.append({**head, "choices": [], "usage": usage})
    return chunks


def completion_object(meta: JSON, choices: list[Choice], usage: JSON) -> JSON:
    out = [
        {"text": "".join(c.pieces), "index": c.index, "logprobs": None, "finish_reason": c.finish}
        for c in choices
    ]
    return {"id": meta["id"], "object": "text_completion", **meta, "choices": out, "usage": usage}


def embeddings_object(body: JSON, settings: FakeSettings) -> JSON:
    raw = body.get("input")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
        inputs: list[Any] = [raw]
    elif isinstance(raw, list) and raw:
        inputs = raw
    else:
        raise Reject(400, "'input' must be a string or a non-empty array", "invalid_value")
    dims = _int_param(body, "dimensions", default=settings.embedding_dims, low=1)
    assert dims is not None
    as_base64 = body.get("encoding_format") == "base64"
    data: list[JSON] = []
    for index, item in enumerate(inputs):
        rng = _rng(_seed(item), 0)
        raw_vector = [rng.uniform(-1.0, 1.0) for _ in range(dims)]
        norm = sum(v * v for v in raw_vector) ** 0.5 or 1.0
        # Packed as float32 either way, so both encodings carry the same values.
        packed = struct.pack(f"<{dims}f", *(v / norm for v in raw_vector))
        vector: Any = (
            base64.b64encode(packed).decode()
            if as_base64
            else list(struct.unpack(f"<{dims}f", packed))
        )
        data.append({"object": "embedding", "index": index, "embedding": vector})
    tokens = max(_words(inputs), 1)
    return {
        "object": "list",
        "data": data,
        "model": body.get("model") or MODELS[2],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def plan_response(body: JSON, settings: FakeSettings) -> tuple[Choice, JSON]:
    given = body.get("input")
    if not isinstance(given, str | list):
        raise Reject(400, "'input' must be a string or an array", "invalid_value")
    limit = _int_param(body, "max_output_tokens")
    plan = _text_plan(_seed(given, body.get("instructions")), 0, settings, limit)
    words = max(_words(given) + _words(body.get("instructions")), 1)
    usage = {
        "input_tokens": words,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": len(plan.pieces),
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": words + len(plan.pieces),
    }
    return plan, usage


def response_events(meta: JSON, item_id: str, plan: Choice, usage: JSON) -> list[JSON]:
    """The Responses API stream; the last event carries the whole response object."""
    text = "".join(plan.pieces)
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    item = {"id": item_id, "type": "message", "status": "in_progress", "role": "assistant"}
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    events: list[JSON] = [
        {"type": "response.created", "response": _response(meta, "in_progress", [], None)},
        {"type": "response.in_progress", "response": _response(meta, "in_progress", [], None)},
        {"type": "response.output_item.added", "output_index": 0, "item": {**item, "content": []}},
        {"type": "response.content_part.added", **where, "part": part},
    ]
    events += [
        {"type": "response.output_text.delta", **where, "delta": p, "logprobs": []}
        for p in plan.pieces
    ]
    final = response_object(meta, item_id, plan, usage)
    done_part = {**part, "text": text}
    events += [
        {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **where, "part": done_part},
        {"type": "response.output_item.done", "output_index": 0, "item": final["output"][0]},
        {"type": f"response.{final['status']}", "response": final},
    ]
    return [{**event, "sequence_number": seq} for seq, event in enumerate(events)]


def response_object(meta: JSON, item_id: str, plan: Choice, usage: JSON) -> JSON:
    status = "completed" if plan.finish == "stop" else "incomplete"
    part = {"type": "output_text", "text": "".join(plan.pieces), "annotations": [], "logprobs": []}
    item = {"id": item_id, "type": "message", "status": status, "role": "assistant"}
    return _response(meta, status, [{**item, "content": [part]}], usage)


def _response(meta: JSON, status: str, output: list[JSON], usage: JSON | None) -> JSON:
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {
        **meta,
        "object": "response",
        "status": status,
        "error": None,
        "incomplete_details": incomplete,
        "output": output,
        "usage": usage,
    }


def sse(payload: JSON) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def sse_typed(payload: JSON) -> bytes:
    kind: str = payload["type"]
    return b"event: " + kind.encode() + b"\n" + sse(payload)


DONE = b"data: [DONE]\n\n"


def refusal(body: JSON, settings: FakeSettings) -> Reject | None:
    """What an upstream that cannot stream, or knows no `stream_options`, answers."""
    if settings.refuse == "stream_options" and "stream_options" in body:
        return Reject(400, "Unrecognized request argument supplied: stream_options")
    if settings.refuse == "stream" and body.get("stream") is True:
        return Reject(400, "This model does not support streaming.", "unsupported_value")
    return None


def usage_requested(body: JSON) -> bool:
    """The caller asked for a final usage chunk: `stream_options.include_usage` on a stream."""
    options = body.get("stream_options")
    return (
        body.get("stream") is True
        and isinstance(options, dict)
        and options.get("include_usage") is True
    )


def model_object(name: str) -> JSON:
    return {"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "llm-sidecar"}
