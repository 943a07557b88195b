"""The pump: the task that owns one stream's upstream call.

It holds the leader slot while it prepares the request, releases it, and
only then asks for an upstream slot, which it holds for the whole upstream
response; it never holds both. It appends every upstream event to the
stream's log, and on a complete answer hands a record to the cache.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDict

from proxy.assemble import (
    RESPONSE_TERMINAL,
    assemble_chat,
    assemble_completion,
    assemble_response,
    choices_finished,
)
from proxy.attempts import call_with_retries
from proxy.cache.base import CachedAnswer
from proxy.errors import ProxyError, ShuttingDown, UpstreamBroken
from proxy.headers import downstream_response_headers
from proxy.intake import Intake
from proxy.prepare import Outgoing, run_steps
from proxy.reply import ATTEMPTS_HEADER
from proxy.runtime import Runtime
from proxy.sse import DONE, SSEDecoder
from proxy.stream import Head, LogEvent, Stream
from proxy.upstream import read_chunks

log = logging.getLogger("llm_sidecar.pump")

_STREAMED_UPSTREAM = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})
_WITH_USAGE = frozenset({"/v1/chat/completions", "/v1/completions"})


def upstream_body(path: str, body: dict[str, Any]) -> dict[str, Any]:
    """Ask for a stream (with usage) so stream and non-stream callers share one call."""
    if path not in _STREAMED_UPSTREAM:
        return body
    out = {**body, "stream": True}
    if path in _WITH_USAGE:
        options = body.get("stream_options")
        out["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
    return out


async def pump(rt: Runtime, stream: Stream, intake: Intake, headers: CIMultiDict[str]) -> None:
    try:
        await _run(rt, stream, intake, headers)
        await _store(rt, stream, intake)
    finally:
        rt.table.unpublish(stream)


async def _store(rt: Runtime, stream: Stream, intake: Intake) -> None:
    """Hand a complete answer to the cache; stay published until it lands.

    A finished, complete stream is still joinable, so an identical request
    arriving before the write is visible follows it instead of calling the
    upstream again.
    """
    config = intake.route.config.cache
    if not (stream.complete and intake.cache_write and intake.key is not None):
        return
    if config is None or config.ttl <= 0:
        return
    pending = rt.cache.store(intake.key, answer_of(stream), config.ttl)
    if pending is not None:
        # wait, not await: a cancelled pump must not cancel the cache's write.
        await asyncio.wait((pending,))


async def _run(rt: Runtime, stream: Stream, intake: Intake, headers: CIMultiDict[str]) -> None:
    holder = intake.request_id
    try:
        async with rt.stages.leader.slot(holder):
            if intake.cache_read and intake.key is not None:
                # The answer may have landed while we queued for the slot.
                answer = await rt.cache.lookup(intake.key)
                if answer is not None:
                    replay_answer(stream, answer)
                    return
            assert intake.body is not None
            outgoing = await run_steps(
                intake.route.steps, Outgoing(intake.path, intake.body, headers)
            )
        # The leader slot is released here: a long stream never blocks the
        # preparation of the next request.
        async with rt.stages.upstream.slot(holder):
            await _call_upstream(rt, stream, intake, outgoing)
    except ProxyError as exc:
        _fail(stream, exc)
    except asyncio.CancelledError:
        if rt.draining:  # cancelled at the drain deadline: tell readers why
            _fail(stream, ShuttingDown("llm-sidecar: shutting down; the stream was cut"))
        else:
            _fail(stream, UpstreamBroken("llm-sidecar: the upstream call was cancelled"))
        raise
    except Exception as exc:
        log.exception("pump failed")
        _fail(stream, ProxyError(f"llm-sidecar: internal error ({type(exc).__name__})"))


def _fail(stream: Stream, error: ProxyError) -> None:
    if not stream.head.done():
        stream.fail_before_head(error)
    elif stream.state != "done":
        stream.append([LogEvent(error.sse_event(), None)])
        stream.end(complete=False, error=error)


async def _call_upstream(rt: Runtime, stream: Stream, intake: Intake, outgoing: Outgoing) -> None:
    headers = outgoing.headers
    headers["Content-Type"] = "application/json"
    body = upstream_body(outgoing.path, outgoing.body)
    # Retries and fallbacks happen in here, before the head is published.
    opened = await call_with_retries(
        rt, stream, intake.route, outgoing.path, intake.query, headers, body
    )
    response, config = opened.response, opened.upstream
    clean = False
    try:
        down = downstream_response_headers(response.headers)
        down[ATTEMPTS_HEADER] = str(len(stream.attempts))
        is_sse = response.content_type == "text/event-stream"
        if response.status >= 300 or not is_sse:
            chunks = [chunk async for chunk in read_chunks(response, config.idle_timeout)]
            head = Head(response.status, down, is_sse=False, body=b"".join(chunks))
            if 200 <= response.status < 300:
                stream.open(head)
                stream.assembled = head.body
                stream.end(complete=True)
            else:
                stream.fail_before_head(head)
        else:
            stream.open(Head(response.status, down, is_sse=True))
            await _pump_events(stream, outgoing.path, response, config.idle_timeout)
        clean = True
    finally:
        if clean:
            response.release()
        else:
            response.close()  # a connection broken mid-exchange is never reused


async def _pump_events(
    stream: Stream, path: str, response: aiohttp.ClientResponse, idle_timeout: float
) -> None:
    decoder = SSEDecoder()
    payloads: list[dict[str, Any]] = []
    seen_done = False
    terminal = False
    upstream_error = False
    async for chunk in read_chunks(response, idle_timeout):
        batch: list[LogEvent] = []
        for event in decoder.feed(chunk):
            parsed: Any = None
            if event.data == DONE:
                seen_done = True
            else:
                try:
                    parsed = orjson.loads(event.data)
                except orjson.JSONDecodeError:
                    parsed = None
            usage_only = False
            if isinstance(parsed, dict):
                payloads.append(parsed)
                if "error" in parsed:
                    upstream_error = True
                elif parsed.get("type") in RESPONSE_TERMINAL:
                    terminal = True
                usage_only = parsed.get("choices") == [] and parsed.get("usage") is not None
            batch.append(LogEvent(event.raw, parsed, usage_only))
        stream.append(batch)
    whole = terminal if path == "/v1/responses" else seen_done
    if not whole and not upstream_error:
        raise UpstreamBroken("llm-sidecar: the upstream stream ended before it was complete")
    complete = not upstream_error
    if complete:
        if path == "/v1/chat/completions":
            complete = choices_finished(payloads)
            stream.assembled = orjson.dumps(assemble_chat(payloads))
        elif path == "/v1/completions":
            complete = choices_finished(payloads)
            stream.assembled = orjson.dumps(assemble_completion(payloads))
        elif path == "/v1/responses":
            final = assemble_response(payloads)
            complete = final is not None and final.get("status") == "completed"
            stream.assembled = orjson.dumps(final) if final is not None else None
    error = (
        None if not upstream_error else UpstreamBroken("llm-sidecar: the upstream sent an error")
    )
    stream.end(complete=complete, error=error)


def answer_of(stream: Stream) -> CachedAnswer:
    head = stream.head.result()
    usage = next((i for i, e in enumerate(stream.events) if e.usage_only), None)
    return CachedAnswer(
        status=head.status,
        content_type=head.headers.get("Content-Type", "application/json"),
        is_sse=head.is_sse,
        events=tuple(e.raw for e in stream.events),
        usage_event=usage,
        body=stream.assembled,
        stored_at=time.time(),
    )


def replay_answer(stream: Stream, answer: CachedAnswer) -> None:
    headers: CIMultiDict[str] = CIMultiDict({"Content-Type": answer.content_type})
    stream.open(Head(answer.status, headers, is_sse=answer.is_sse, body=answer.body))
    stream.assembled = answer.body
    stream.append(
        [
            LogEvent(raw, None, index == answer.usage_event)
            for index, raw in enumerate(answer.events)
        ]
    )
    stream.end(complete=False)  # already cached: nothing to write back
