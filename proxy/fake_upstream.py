"""A fake OpenAI-compatible upstream: a real aiohttp server for tests and benchmarks.

It speaks the OpenAI wire format closely enough for the official SDK to parse
every answer (chat and text completions, stream and not; embeddings; models;
the Responses API) and its answers are deterministic: the content is a
function of the prompt, so identical requests get identical answers and the
same request streamed or not gets the same content, tool calls, logprobs and
usage. Every answer is planned once and then either framed as SSE or folded
into one JSON object, which is what keeps the two shapes equal.

Tests drive it in-process (`settings`, `hold_after`/`release`, `calls`);
an out-of-process fake is driven by `x-fake-*` request headers and the
`/_fake/*` control endpoints.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import itertools
import json
import multiprocessing
import multiprocessing.queues
import queue
import random
import secrets
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import orjson
from aiohttp import web

__all__ = ["FakeSettings", "FakeUpstream", "RecordedRequest", "main"]

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
    drop_after: int | None = None  # stream: abort the connection after N events
    require_key: str | None = None  # when set, 401 unless `Authorization: Bearer <key>`
    embedding_dims: int = 8

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


_FIELD_KINDS: dict[str, type | tuple[type, ...]] = {
    "tokens": int,
    "token_delay": (int, float),
    "ttft": (int, float),
    "header_delay": (int, float),
    "error_status": int,
    "drop_after": int,
    "require_key": str,
    "embedding_dims": int,
}
_OPTIONAL_FIELDS = frozenset({"error_status", "drop_after", "require_key"})
# Per-request overrides, so an out-of-process fake can be driven by its caller.
_HEADER_FIELDS: dict[str, tuple[str, Callable[[str], int | float]]] = {
    "x-fake-tokens": ("tokens", int),
    "x-fake-token-delay": ("token_delay", float),
    "x-fake-ttft": ("ttft", float),
    "x-fake-header-delay": ("header_delay", float),
    "x-fake-status": ("error_status", int),
    "x-fake-drop-after": ("drop_after", int),
}


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lowercased names; repeated headers joined with ", "
    body: bytes


class _Reject(Exception):
    """An answer decided before any work: mapped to a response in one place."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def canonical(body: Mapping[str, Any]) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def _canonical_raw(raw: bytes) -> bytes:
    try:
        return canonical(orjson.loads(raw))
    except (orjson.JSONDecodeError, TypeError):
        return raw  # not a JSON object: counted by its exact bytes


# -- the pure core: plans and their two framings ------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Choice:
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
            raise _Reject(400, f"'{name}' must be an integer >= {low}", "invalid_value")
        return value
    return default


def _n(body: JSON) -> int:
    n = _int_param(body, "n", default=1, low=1)
    assert n is not None
    if n > _MAX_N:
        raise _Reject(400, f"'n' must be at most {_MAX_N}", "invalid_value")
    return n


def _text_plan(seed: bytes, index: int, settings: FakeSettings, limit: int | None) -> _Choice:
    count = settings.tokens if limit is None else min(settings.tokens, limit)
    rng = _rng(seed, index)
    pieces = tuple(f"tok{rng.randrange(1000)} " for _ in range(count))
    logprobs = tuple(-round(rng.random() * 2, 4) for _ in range(count))
    finish = "length" if limit is not None and limit < settings.tokens else "stop"
    return _Choice(index, pieces, logprobs, finish)


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


def _plan_chat(body: JSON, settings: FakeSettings) -> tuple[list[_Choice], JSON]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _Reject(400, "'messages' must be an array", "invalid_value")
    n = _n(body)
    limit = _int_param(body, "max_completion_tokens", "max_tokens")
    seed = _seed(messages)
    tool = _tool_to_call(body)
    choices: list[_Choice] = []
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
        choices.append(_Choice(index, pieces, None, "tool_calls", (call_id, name)))
    return choices, _usage(_words(messages), choices)


def _usage(prompt: int, choices: list[_Choice]) -> JSON:
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


def _chat_chunks(
    meta: JSON, choices: list[_Choice], usage: JSON, include_usage: bool
) -> list[JSON]:
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


def _chat_object(meta: JSON, choices: list[_Choice], usage: JSON) -> JSON:
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


def _plan_completion(body: JSON, settings: FakeSettings) -> tuple[list[_Choice], JSON]:
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
        raise _Reject(400, "'prompt' must be a string or an array", "invalid_value")
    n = _n(body)
    limit = _int_param(body, "max_tokens")
    choices = [
        replace(_text_plan(_seed(p), j, settings, limit), index=i * n + j, logprobs=None)
        for i, p in enumerate(prompts)
        for j in range(n)
    ]
    return choices, _usage(_words(prompts), choices)


def _completion_chunks(
    meta: JSON, choices: list[_Choice], usage: JSON, include_usage: bool
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


def _completion_object(meta: JSON, choices: list[_Choice], usage: JSON) -> JSON:
    out = [
        {"text": "".join(c.pieces), "index": c.index, "logprobs": None, "finish_reason": c.finish}
        for c in choices
    ]
    return {"id": meta["id"], "object": "text_completion", **meta, "choices": out, "usage": usage}


def _embeddings_object(body: JSON, settings: FakeSettings) -> JSON:
    raw = body.get("input")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
        inputs: list[Any] = [raw]
    elif isinstance(raw, list) and raw:
        inputs = raw
    else:
        raise _Reject(400, "'input' must be a string or a non-empty array", "invalid_value")
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


def _plan_response(body: JSON, settings: FakeSettings) -> tuple[_Choice, JSON]:
    given = body.get("input")
    if not isinstance(given, str | list):
        raise _Reject(400, "'input' must be a string or an array", "invalid_value")
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


def _response_events(meta: JSON, item_id: str, plan: _Choice, usage: JSON) -> list[JSON]:
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
    final = _response_object(meta, item_id, plan, usage)
    done_part = {**part, "text": text}
    events += [
        {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **where, "part": done_part},
        {"type": "response.output_item.done", "output_index": 0, "item": final["output"][0]},
        {"type": f"response.{final['status']}", "response": final},
    ]
    return [{**event, "sequence_number": seq} for seq, event in enumerate(events)]


def _response_object(meta: JSON, item_id: str, plan: _Choice, usage: JSON) -> JSON:
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


def _sse(payload: JSON) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _sse_typed(payload: JSON) -> bytes:
    kind: str = payload["type"]
    return b"event: " + kind.encode() + b"\n" + _sse(payload)


_DONE = b"data: [DONE]\n\n"


def _error_response(status: int, message: str, code: str | None = None) -> web.Response:
    kind = "requests" if status == 429 else "server_error" if status >= 500 else None
    if status == 429:
        code = code or "rate_limit_exceeded"
    body = {
        "error": {
            "message": message,
            "type": kind or "invalid_request_error",
            "param": None,
            "code": code,
        }
    }
    headers = {"Content-Type": "application/json"}
    if status == 429:
        headers["Retry-After"] = "1"
        headers["x-ratelimit-remaining-requests"] = "0"
    return web.Response(status=status, body=orjson.dumps(body), headers=headers)


# -- the aiohttp edge ---------------------------------------------------------------------------

_Handler = Callable[[web.Request, JSON, FakeSettings], Awaitable[web.StreamResponse]]


class FakeUpstream:
    """One fake upstream server. All state is touched only from its event loop."""

    def __init__(self, settings: FakeSettings | None = None) -> None:
        # Read once per request: replacing it affects requests that arrive afterwards.
        self.settings = settings or FakeSettings()
        # Read at every event, so a test may set it while a stream is running.
        self.hold_after: int | None = None
        self.release = asyncio.Event()
        self.reached_hold = asyncio.Event()
        self.calls: collections.Counter[bytes] = collections.Counter()
        self.calls_by_path: collections.Counter[str] = collections.Counter()
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.disconnects = 0  # handlers ended because their client went away
        self.port = 0
        self._base_url = ""
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._posts: dict[str, _Handler] = {
            "/v1/chat/completions": self._chat,
            "/v1/completions": self._completions,
            "/v1/embeddings": self._embeddings,
            "/v1/responses": self._responses,
        }

    # -- inspection

    def calls_for(self, body: Mapping[str, Any]) -> int:
        return self.calls[canonical(body)]

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def base_url(self) -> str:
        """What start() returned."""
        return self._base_url

    def reset(self) -> None:
        """Forget what was received; settings and the hold gate stay as they are."""
        self.calls.clear()
        self.calls_by_path.clear()
        self.requests.clear()
        self.disconnects = 0

    # -- lifetime

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/_fake/stats", self._stats)
        app.router.add_post("/_fake/reset", self._reset)
        app.router.add_post("/_fake/settings", self._change_settings)
        app.router.add_route("*", "/{tail:.*}", self._api)
        return app

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, *, reuse_port: bool = False
    ) -> str:
        # handler_cancellation: a client that disconnects cancels its handler, so a
        # test sees an upstream call the proxy abandoned leave `in_flight`. A short
        # shutdown timeout keeps close() from waiting on held or slow streams.
        runner = web.AppRunner(
            self.make_app(), handler_cancellation=True, access_log=None, shutdown_timeout=0.5
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True, reuse_port=reuse_port or None)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        shown = "127.0.0.1" if host in ("", "0.0.0.0") else host
        self._base_url = f"http://{shown}:{self.port}/v1"
        return self._base_url

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- control endpoints

    async def _stats(self, request: web.Request) -> web.Response:
        stats = {
            "total": self.total_calls,
            "by_path": dict(self.calls_by_path),
            "in_flight": self.in_flight,
            "requests": len(self.requests),
        }
        return web.json_response(stats, dumps=lambda v: orjson.dumps(v).decode())

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"reset": True})

    async def _change_settings(self, request: web.Request) -> web.Response:
        try:
            changes = orjson.loads(await request.read())
            if not isinstance(changes, dict):
                raise TypeError("expected a JSON object")
            unknown = set(changes) - {f.name for f in fields(FakeSettings)}
            if unknown:
                raise TypeError(f"unknown settings: {sorted(unknown)}")
            self.settings = replace(self.settings, **changes)
        except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
            return _error_response(400, str(exc), "invalid_settings")
        return web.json_response(asdict(self.settings))

    # -- the API

    async def _api(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        # Recorded before anything can wait, so a test sees arrivals while answers are held.
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        self.requests.append(RecordedRequest(request.method, request.path, headers, raw))
        post = self._posts.get(request.path) if request.method == "POST" else None
        if post is not None:
            self.calls[_canonical_raw(raw)] += 1
            self.calls_by_path[request.path] += 1
        self.in_flight += 1
        try:
            return await self._answer(request, raw, post)
        except _Reject as exc:
            return _error_response(exc.status, exc.message, exc.code)
        except asyncio.CancelledError:
            self.disconnects += 1
            raise
        finally:
            self.in_flight -= 1

    async def _answer(
        self, request: web.Request, raw: bytes, post: _Handler | None
    ) -> web.StreamResponse:
        settings = _with_overrides(self.settings, request.headers)
        key = settings.require_key
        if key is not None and request.headers.get("Authorization") != f"Bearer {key}":
            # Never echo the presented key back.
            raise _Reject(401, "Incorrect API key provided.", "invalid_api_key")
        if settings.header_delay > 0:
            await asyncio.sleep(settings.header_delay)
        if post is None:
            return self._get(request)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _Reject(400, "We could not parse the JSON body of your request.") from exc
        if not isinstance(body, dict):
            raise _Reject(400, "The request body must be a JSON object.")
        if settings.error_status is not None:
            await self._hold_whole()
            status = settings.error_status
            return _error_response(status, f"The fake upstream answers {status}.")
        return await post(request, body, settings)

    def _get(self, request: web.Request) -> web.Response:
        if request.method == "GET" and request.path == "/v1/models":
            data = [_model(name) for name in MODELS]
            return _json(request, {"object": "list", "data": data})
        if request.method == "GET" and request.path.startswith("/v1/models/"):
            # Any model exists: the fake answers for whatever model it is asked.
            return _json(request, _model(request.path.removeprefix("/v1/models/")))
        raise _Reject(404, f"Invalid URL ({request.method} {request.path})", "unknown_url")

    def _meta(self, body: JSON, prefix: str) -> JSON:
        return {
            "id": f"{prefix}{next(self._ids)}",
            "created": int(time.time()),
            "model": body.get("model") or MODELS[0],
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }

    async def _chat(
        self, request: web.Request, body: JSON, settings: FakeSettings
    ) -> web.StreamResponse:
        choices, usage = _plan_chat(body, settings)
        meta = self._meta(body, "chatcmpl-")
        events = [_sse(c) for c in _chat_chunks(meta, choices, usage, _include_usage(body))]
        if body.get("stream") is True:
            return await self._stream(request, settings, [*events, _DONE])
        return await self._whole(request, settings, len(events), _chat_object(meta, choices, usage))

    async def _completions(
        self, request: web.Request, body: JSON, settings: FakeSettings
    ) -> web.StreamResponse:
        choices, usage = _plan_completion(body, settings)
        meta = self._meta(body, "cmpl-")
        del meta["service_tier"]
        chunks = _completion_chunks(meta, choices, usage, _include_usage(body))
        events = [_sse(c) for c in chunks]
        if body.get("stream") is True:
            return await self._stream(request, settings, [*events, _DONE])
        whole = _completion_object(meta, choices, usage)
        return await self._whole(request, settings, len(events), whole)

    async def _embeddings(
        self, request: web.Request, body: JSON, settings: FakeSettings
    ) -> web.StreamResponse:
        return await self._whole(request, settings, 1, _embeddings_object(body, settings))

    async def _responses(
        self, request: web.Request, body: JSON, settings: FakeSettings
    ) -> web.StreamResponse:
        plan, usage = _plan_response(body, settings)
        number = next(self._ids)
        meta = {
            "id": f"resp_{number}",
            "created_at": int(time.time()),
            "model": body.get("model") or MODELS[0],
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "parallel_tool_calls": True,
            "previous_response_id": body.get("previous_response_id"),
            "temperature": body.get("temperature", 1.0),
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": body.get("top_p", 1.0),
            "truncation": "disabled",
            "metadata": body.get("metadata") or {},
        }
        item_id = f"msg_{number}"
        if body.get("stream") is True:
            events = _response_events(meta, item_id, plan, usage)
            return await self._stream(request, settings, [_sse_typed(e) for e in events])
        whole = _response_object(meta, item_id, plan, usage)
        # The stream frames the deltas with four events before and four after.
        return await self._whole(request, settings, len(plan.pieces) + 8, whole)

    # -- timing, holding and faults

    async def _hold(self, event: int) -> None:
        if self.hold_after is not None and event == self.hold_after:
            self.reached_hold.set()
            await self.release.wait()

    async def _hold_whole(self) -> None:
        # An answer without events holds before it is sent, whatever the event number.
        if self.hold_after is not None:
            self.reached_hold.set()
            await self.release.wait()

    async def _stream(
        self, request: web.Request, settings: FakeSettings, events: list[bytes]
    ) -> web.StreamResponse:
        headers = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
        response = web.StreamResponse(headers={**headers, **_request_id(request)})
        drop = settings.drop_after
        try:
            await response.prepare(request)
            for number, event in enumerate(events if drop is None else events[:drop]):
                delay = settings.ttft if number == 0 else settings.token_delay
                if delay > 0:
                    await asyncio.sleep(delay)
                await self._hold(number)
                await response.write(event)  # one write per event: clients see them one by one
            if drop is not None:
                _abort(request)  # no terminating chunk: the client sees a truncated body
                return response
            await response.write_eof()
        except ConnectionError:
            self.disconnects += 1
        return response

    async def _whole(
        self, request: web.Request, settings: FakeSettings, events: int, payload: JSON
    ) -> web.StreamResponse:
        # A non-stream answer arrives when the stream would have ended.
        delay = settings.ttft + settings.token_delay * max(events - 1, 0)
        if delay > 0:
            await asyncio.sleep(delay)
        await self._hold_whole()
        if settings.drop_after is not None:
            _abort(request)
        return _json(request, payload)


def _abort(request: web.Request) -> None:
    # aiohttp treats the ConnectionError of writing to a closed transport as a
    # client that left, so returning the response afterwards is quiet.
    if request.transport is not None:
        request.transport.close()


def _include_usage(body: JSON) -> bool:
    options = body.get("stream_options")
    return (
        body.get("stream") is True
        and isinstance(options, dict)
        and options.get("include_usage") is True
    )


def _request_id(request: web.Request) -> dict[str, str]:
    return {"x-request-id": request.headers.get("x-request-id") or f"req_{secrets.token_hex(8)}"}


def _json(request: web.Request, payload: JSON) -> web.Response:
    headers = {"Content-Type": "application/json", **_request_id(request)}
    return web.Response(body=orjson.dumps(payload), headers=headers)


def _model(name: str) -> JSON:
    return {"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "llm-sidecar"}


def _with_overrides(settings: FakeSettings, headers: Mapping[str, str]) -> FakeSettings:
    changes: dict[str, int | float] = {}
    for header, (name, parse) in _HEADER_FIELDS.items():
        value = headers.get(header)
        if value is None:
            continue
        try:
            changes[name] = parse(value)
        except ValueError as exc:
            raise _Reject(400, f"{header}: {value!r} is not a number", "invalid_value") from exc
    if not changes:
        return settings
    try:
        return replace(settings, **changes)  # type: ignore[arg-type]
    except ValueError as exc:
        raise _Reject(400, f"x-fake-*: {exc}", "invalid_value") from exc


# -- the command line ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-sidecar fake-upstream", description="Run the fake OpenAI-compatible upstream."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds between events")
    parser.add_argument("--ttft", type=float, default=0.0, help="seconds before the first event")
    parser.add_argument("--header-delay", type=float, default=0.0)
    parser.add_argument("--require-key", default=None)
    parser.add_argument(
        "--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = FakeSettings(
            tokens=args.tokens,
            token_delay=args.token_delay,
            ttft=args.ttft,
            header_delay=args.header_delay,
            require_key=args.require_key,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.workers <= 1:
        import uvloop

        uvloop.run(_serve(args.host, args.port, settings, reuse_port=False, ready=None))
        return 0
    return _run_workers(args.host, args.port, settings, args.workers)


async def _serve(
    host: str,
    port: int,
    settings: FakeSettings,
    *,
    reuse_port: bool,
    ready: multiprocessing.queues.Queue[str] | None,
) -> None:
    fake = FakeUpstream(settings)
    url = await fake.start(host, port, reuse_port=reuse_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is None:
        print(f"fake upstream listening on {url}", flush=True)
    else:
        ready.put(url)
    try:
        await stop.wait()
    finally:
        await fake.close()


def _worker(
    host: str, port: int, settings: FakeSettings, ready: multiprocessing.queues.Queue[str]
) -> None:
    import uvloop

    uvloop.run(_serve(host, port, settings, reuse_port=True, ready=ready))


def _run_workers(host: str, port: int, settings: FakeSettings, workers: int) -> int:
    # Port 0 must become one concrete port every worker shares: a bound socket
    # that never listens reserves it without taking any connections.
    reserve = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserve.bind((host, port))
    except OSError as exc:
        reserve.close()
        print(f"error: cannot bind {host}:{port}: {exc}", file=sys.stderr)
        return 1
    port = reserve.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    ready: multiprocessing.queues.Queue[str] = context.Queue()
    procs = [
        context.Process(target=_worker, args=(host, port, settings, ready), daemon=True)
        for _ in range(workers)
    ]
    stopping = threading.Event()
    # Signal handlers only set the flag; the loop below does the work.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    for proc in procs:
        proc.start()
    try:
        started: list[str] = []
        while len(started) < workers and not stopping.is_set():
            try:
                started.append(ready.get(timeout=0.2))
            except queue.Empty:
                if not all(proc.is_alive() for proc in procs):
                    print("error: a worker did not start", file=sys.stderr)
                    return 1
        reserve.close()
        if started:
            print(f"fake upstream listening on {started[0]} ({workers} workers)", flush=True)
        while not stopping.wait(0.5):
            if not all(proc.is_alive() for proc in procs):
                break
    finally:
        reserve.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
    return 0 if stopping.is_set() else 1


if __name__ == "__main__":
    raise SystemExit(main())
