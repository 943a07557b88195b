"""A fake OpenAI-compatible upstream: a real aiohttp server for tests and benchmarks.

It speaks the OpenAI wire format closely enough for the official SDK to parse
every answer (chat and text completions, stream and not; embeddings; models;
the Responses API). What it answers lives in `proxy.testing.fake_answers`, pure and
deterministic; this module owns the server around it: timing, holding and
faults, the request record, the control endpoints and the command line.

Tests drive it in-process (`settings`, `hold_after`/`release`, `calls`);
an out-of-process fake is driven by `x-fake-*` request headers and the
`/_fake/*` control endpoints.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, NoReturn

import orjson
from aiohttp import web

from proxy.testing.fake_answers import (
    DONE,
    JSON,
    MODELS,
    FakeSettings,
    Reject,
    canonical,
    chat_chunks,
    chat_object,
    completion_chunks,
    completion_object,
    embeddings_object,
    model_object,
    plan_chat,
    plan_completion,
    plan_response,
    refusal,
    response_events,
    response_object,
    sse,
    sse_typed,
    usage_requested,
)

__all__ = ["FakeSettings", "FakeUpstream", "RecordedRequest"]

# Per-request overrides, so an out-of-process fake can be driven by its caller.
_HEADER_FIELDS: dict[str, tuple[str, Callable[[str], int | float | str]]] = {
    "x-fake-tokens": ("tokens", int),
    "x-fake-token-delay": ("token_delay", float),
    "x-fake-ttft": ("ttft", float),
    "x-fake-header-delay": ("header_delay", float),
    "x-fake-status": ("error_status", int),
    "x-fake-error-times": ("error_times", int),
    "x-fake-retry-after": ("retry_after", str),
    "x-fake-retry-after-ms": ("retry_after_ms", int),
    "x-fake-token-padding": ("token_padding", int),
    "x-fake-endless": ("endless", str),
    "x-fake-drop-after": ("drop_after", int),
}
# With `x-fake-error-times`, errors are counted per request body: a caller
# that retries the same request sees the first N fail, whatever else the
# fake is serving at the time.
_ERROR_TIMES_HEADER = "x-fake-error-times"


def header_knobs() -> dict[str, str]:
    """Each `x-fake-*` request header and the `FakeSettings` field it overrides."""
    return {header: name for header, (name, _) in _HEADER_FIELDS.items()}


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lowercased names; repeated headers joined with ", "
    body: bytes
    target: str = ""  # the request-target as it arrived: path and query, still encoded


def _canonical_raw(raw: bytes) -> bytes:
    try:
        return canonical(orjson.loads(raw))
    except (orjson.JSONDecodeError, TypeError):
        return raw  # not a JSON object: counted by its exact bytes


def _error_response(
    status: int, message: str, code: str | None = None, settings: FakeSettings | None = None
) -> web.Response:
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
    if settings is not None and settings.retry_after is not None:
        headers["Retry-After"] = settings.retry_after
    if settings is not None and settings.retry_after_ms is not None:
        headers["retry-after-ms"] = str(settings.retry_after_ms)
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
        self.errors_sent = 0  # error_status answers, counted for error_times
        # Error answers per canonical body, for the x-fake-error-times header.
        self.errors_by_body: collections.Counter[bytes] = collections.Counter()
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
        self.errors_sent = 0
        self.errors_by_body.clear()
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
            valid = [f.name for f in fields(FakeSettings)]
            unknown = set(changes) - set(valid)
            if unknown:
                raise TypeError(f"unknown settings {sorted(unknown)}; valid: {', '.join(valid)}")
            self.settings = replace(self.settings, **changes)
        except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
            return _error_response(400, str(exc), "invalid_settings")
        if "error_times" in changes or "error_status" in changes:
            self.errors_sent = 0  # a new error budget counts from now
        return web.json_response(asdict(self.settings))

    # -- the API

    async def _api(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        # Recorded before anything can wait, so a test sees arrivals while answers are held.
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        self.requests.append(
            RecordedRequest(request.method, request.path, headers, raw, request.raw_path)
        )
        post = self._posts.get(request.path) if request.method == "POST" else None
        body_key = _canonical_raw(raw)
        if post is not None:
            self.calls[body_key] += 1
            self.calls_by_path[request.path] += 1
        self.in_flight += 1
        try:
            return await self._answer(request, raw, body_key, post)
        except Reject as exc:
            return _error_response(exc.status, exc.message, exc.code)
        except asyncio.CancelledError:
            self.disconnects += 1
            raise
        finally:
            self.in_flight -= 1

    async def _answer(
        self, request: web.Request, raw: bytes, key: bytes, post: _Handler | None
    ) -> web.StreamResponse:
        settings = _with_overrides(self.settings, request.headers)
        required = settings.require_key
        if required is not None and request.headers.get("Authorization") != f"Bearer {required}":
            # Never echo the presented key back.
            raise Reject(401, "Incorrect API key provided.", "invalid_api_key")
        if settings.header_delay > 0:
            await asyncio.sleep(settings.header_delay)
        if post is None:
            return self._get(request)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise Reject(400, "We could not parse the JSON body of your request.") from exc
        if not isinstance(body, dict):
            raise Reject(400, "The request body must be a JSON object.")
        refused = refusal(body, settings)
        if refused is not None:
            raise refused
        if settings.error_status is not None and self._errs(settings, request, key):
            # Counted before any wait, so concurrent calls see it.
            self.errors_sent += 1
            self.errors_by_body[key] += 1
            await self._hold_whole()
            status = settings.error_status
            return _error_response(status, f"The fake upstream answers {status}.", None, settings)
        return await post(request, body, settings)

    def _errs(self, settings: FakeSettings, request: web.Request, key: bytes) -> bool:
        """Whether this call gets `error_status`: every one, or the first `error_times`."""
        times = settings.error_times
        if times is None:
            return True
        if _ERROR_TIMES_HEADER in request.headers:
            return self.errors_by_body[key] < times
        return self.errors_sent < times

    def _get(self, request: web.Request) -> web.Response:
        if request.method == "GET" and request.path == "/v1/models":
            data = [model_object(name) for name in MODELS]
            return _json(request, {"object": "list", "data": data})
        if request.method == "GET" and request.path.startswith("/v1/models/"):
            # Any model exists: the fake answers for whatever model it is asked.
            return _json(request, model_object(request.path.removeprefix("/v1/models/")))
        raise Reject(404, f"Invalid URL ({request.method} {request.path})", "unknown_url")

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
        choices, usage = plan_chat(body, settings)
        meta = self._meta(body, "chatcmpl-")
        events = [sse(c) for c in chat_chunks(meta, choices, usage, usage_requested(body))]
        if body.get("stream") is True:
            return await self._stream(request, settings, [*events, DONE])
        return await self._whole(request, settings, len(events), chat_object(meta, choices, usage))

    async def _completions(
        self, request: web.Request, body: JSON, settings: FakeSettings
    ) -> web.StreamResponse:
        choices, usage = plan_completion(body, settings)
        meta = self._meta(body, "cmpl-")
        del meta["service_tier"]
        chunks = completion_chunks(meta, choices, usage, usage_requested(body))
        events = [sse(c) for c in chunks]
        if body.get("stream") is True:
            return await self._stream(request, settings, [*events, DONE])
        whole = completion_object(meta, choices, usage)
        return await self._whole(request, settings, len(events), whole)

    async def _embeddings(
        self, request: web.Request, body: JSON, settings: FakeSettings
    ) -> web.StreamResponse:
        return await self._whole(request, settings, 1, embeddings_object(body, settings))

    async def _responses(
        self, request: web.Request, body: JSON, settings: FakeSettings
    ) -> web.StreamResponse:
        plan, usage = plan_response(body, settings)
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
            events = response_events(meta, item_id, plan, usage)
            return await self._stream(request, settings, [sse_typed(e) for e in events])
        whole = response_object(meta, item_id, plan, usage)
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
            if settings.endless is not None:
                await self._endless(response, settings, events)
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

    async def _endless(
        self, response: web.StreamResponse, settings: FakeSettings, events: list[bytes]
    ) -> NoReturn:
        """The first events, then a content event (or one line) forever;
        `hold_after` counts its writes as events."""
        if settings.endless == "line":
            head, piece = b"data: ", b"x" * 65536
        else:
            head, piece = b"".join(events[:2]), events[1]
        await self._hold(0)
        await response.write(head)
        for number in itertools.count(1):
            # sleep(0) still yields: a test's proxy shares this loop.
            await asyncio.sleep(settings.token_delay)
            await self._hold(number)
            await response.write(piece)
        raise AssertionError("unreachable")

    async def _whole(
        self, request: web.Request, settings: FakeSettings, events: int, payload: JSON
    ) -> web.StreamResponse:
        # A non-stream answer arrives when the stream would have ended.
        delay = settings.ttft + settings.token_delay * max(events - 1, 0)
        if delay > 0:
            await asyncio.sleep(delay)
        await self._hold_whole()
        if settings.endless is not None:
            await _endless_body(request, settings)
        if settings.drop_after is not None:
            _abort(request)
        return _json(request, payload)


async def _endless_body(request: web.Request, settings: FakeSettings) -> NoReturn:
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    await response.write(b'{"object": "list", "data": [')
    piece = b"0, " * 16384
    while True:
        await asyncio.sleep(settings.token_delay)
        await response.write(piece)


def _abort(request: web.Request) -> None:
    # aiohttp treats the ConnectionError of writing to a closed transport as a
    # client that left, so returning the response afterwards is quiet.
    if request.transport is not None:
        request.transport.close()


def _request_id(request: web.Request) -> dict[str, str]:
    return {"x-request-id": request.headers.get("x-request-id") or f"req_{secrets.token_hex(8)}"}


def _json(request: web.Request, payload: JSON) -> web.Response:
    headers = {"Content-Type": "application/json", **_request_id(request)}
    return web.Response(body=orjson.dumps(payload), headers=headers)


def _with_overrides(settings: FakeSettings, headers: Mapping[str, str]) -> FakeSettings:
    changes: dict[str, int | float | str] = {}
    for header, (name, parse) in _HEADER_FIELDS.items():
        value = headers.get(header)
        if value is None:
            continue
        try:
            changes[name] = parse(value)
        except ValueError as exc:
            kind = "an integer" if parse is int else "a number"
            raise Reject(400, f"{header}: {value!r} is not {kind}", "invalid_value") from exc
    if not changes:
        return settings
    try:
        return replace(settings, **changes)  # type: ignore[arg-type]
    except ValueError as exc:
        raise Reject(400, f"x-fake-*: {exc}", "invalid_value") from exc
