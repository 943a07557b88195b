"""What the fake upstream answers: the content of each answer, planned from a request body.

It owns the fake's content and settings, with no I/O: each answer is a
deterministic function of the prompt and `FakeSettings`, planned once
(`plan_*`: the tokens, tool calls, finish reasons and usage of every choice).
How a plan goes on the wire, as stream chunks or as one JSON object, is the
chosen dialect's business (`proxy.testing.dialects`); both framings come from
the same plan, which is what keeps a streamed and a whole answer equal.
Embeddings and models have one shape for every dialect and live here. A body
the fake refuses raises `Reject`; the server maps it to an error response.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import struct
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import orjson

__all__ = [
    "DIALECTS",
    "JSON",
    "LINE_ENDINGS",
    "MODELS",
    "Choice",
    "FakeSettings",
    "Reject",
    "ToolCall",
    "canonical",
    "embeddings_object",
    "model_object",
    "plan_chat",
    "plan_completion",
    "plan_response",
    "refusal",
    "usage_requested",
]

JSON = dict[str, Any]

MODELS = ("fake-model", "gpt-4o-mini", "text-embedding-3-small")
_CITIES = ("Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Quito", "Perth", "Turin")
_ARGUMENT_PIECE = 6  # characters per streamed tool-call argument fragment
_MAX_N = 128
# The upstreams whose wire quirks the fake can speak (see proxy.testing.dialects).
DIALECTS = ("openai", "azure", "vllm", "llamacpp", "ollama", "litellm", "no_done")
LINE_ENDINGS = {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r"}


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
    dialect: str = "openai"  # whose wire quirks to speak: one of DIALECTS
    line_ending: str = "lf"  # how SSE lines end: one of LINE_ENDINGS
    compress: str | None = None  # "gzip": JSON answers compressed when the caller accepts it
    inband_error: int | None = None  # a stream ends with this error inside its 200 (fake_faults)
    bad_body: str | None = None  # a 200 that is not the endpoint's answer (fake_faults)
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
        if self.dialect not in DIALECTS:
            raise ValueError(f"dialect must be one of {', '.join(DIALECTS)}")
        if self.line_ending not in LINE_ENDINGS:
            raise ValueError(f"line_ending must be one of {', '.join(LINE_ENDINGS)}")
        if self.compress not in (None, "gzip", "deflate"):
            raise ValueError("compress must be gzip or deflate")
        if self.inband_error is not None and not 400 <= self.inband_error <= 599:
            raise ValueError("inband_error must be between 400 and 599")
        if self.bad_body not in (None, "text", "json", "event"):
            raise ValueError("bad_body must be text, json or event")
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
    "dialect": str,
    "line_ending": str,
    "compress": str,
    "inband_error": int,
    "bad_body": str,
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
        "compress",
        "inband_error",
        "bad_body",
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
class ToolCall:
    id: str
    name: str
    pieces: tuple[str, ...]  # the arguments, as streamed

    @property
    def arguments(self) -> str:
        return "".join(self.pieces)


@dataclass(frozen=True, slots=True)
class Choice:
    index: int
    pieces: tuple[str, ...]  # content tokens; empty for a tool-call answer
    logprobs: tuple[float, ...] | None  # one per content token when asked for
    finish: str
    calls: tuple[ToolCall, ...] = ()  # a tool-call answer's calls, in order

    @property
    def tokens(self) -> int:
        return len(self.pieces) + sum(len(call.pieces) for call in self.calls)


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


def _tools_to_call(body: JSON) -> list[tuple[str, str]]:
    """(function name, argument name) for each call the answer must make."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not isinstance(tools, list) or choice == "none":
        return []
    functions = [
        t["function"]
        for t in tools
        if isinstance(t, dict) and isinstance(t.get("function"), dict)
        if isinstance(t["function"].get("name"), str)
    ]
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        named = [f for f in functions if f["name"] == choice["function"].get("name")]
        functions = named[:1] or functions
    # Two tools or more: two calls at once, unless the caller forbids parallel calls.
    count = 1 if body.get("parallel_tool_calls") is False else 2
    calls: list[tuple[str, str]] = []
    for function in functions[:count]:
        parameters = function.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, dict) else None
        argument = next(iter(properties), None) if isinstance(properties, dict) else None
        calls.append((function["name"], str(argument or "location")))
    return calls


def plan_chat(body: JSON, settings: FakeSettings) -> tuple[list[Choice], JSON]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise Reject(400, "'messages' must be an array", "invalid_value")
    n = _n(body)
    limit = _int_param(body, "max_completion_tokens", "max_tokens")
    seed = _seed(messages)
    tools = _tools_to_call(body)
    choices: list[Choice] = []
    for index in range(n):
        if not tools:
            plan = _text_plan(seed, index, settings, limit)
            if body.get("logprobs") is not True:
                plan = replace(plan, logprobs=None)
            choices.append(plan)
            continue
        calls: list[ToolCall] = []
        for k, (name, argument) in enumerate(tools):
            value = _CITIES[_rng(seed, index * 16 + k).randrange(len(_CITIES))]
            arguments = json.dumps({argument: value})  # OpenAI's own spacing
            pieces = tuple(
                arguments[i : i + _ARGUMENT_PIECE]
                for i in range(0, len(arguments), _ARGUMENT_PIECE)
            )
            tag = bytes([index % 256]) if k == 0 else bytes([index % 256, k])
            call_id = "call_" + hashlib.blake2b(seed + tag, digest_size=12).hexdigest()
            calls.append(ToolCall(call_id, name, pieces))
        choices.append(Choice(index, (), None, "tool_calls", tuple(calls)))
    return choices, _usage(_words(messages), choices)


def _usage(prompt: int, choices: list[Choice]) -> JSON:
    completion = sum(c.tokens for c in choices)
    prompt = max(prompt, 1)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


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
