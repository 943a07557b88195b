"""The upstream stage: one call to the upstream, its events into the stream.

The upstream slot bounds concurrent upstream calls, the expensive and
rate-limited resource. It is held for the whole upstream response and
released when it ends. `open_call` is one attempt, returning once response
headers arrive (or raising a ProxyError): the unit a retry or fallback
loop wraps. It asks in the leader's own mode with the leader's own bytes: a
plain call for `stream: false`, a stream (with usage) for `stream: true`.
`relay_into` then logs the response into the stream, parsing nothing: a
reader of the other mode converts it on first use (`proxy.convert`).
"""

from __future__ import annotations

import aiohttp
import orjson

from proxy.classify import Ending, EventClassifier
from proxy.convert import PlainAnswer
from proxy.endpoint import Endpoint
from proxy.errors import ProxyError, UpstreamBroken
from proxy.headers import downstream_response_headers
from proxy.intake import Intake
from proxy.prepare import Outgoing
from proxy.runtime import Runtime
from proxy.sse import SSEDecoder
from proxy.stream import Head, Stream
from proxy.upstream import open_upstream, read_chunks, upstream_url


async def call(rt: Runtime, stream: Stream, intake: Intake, outgoing: Outgoing) -> None:
    """Under an upstream slot: send `outgoing`, log the answer into `stream`."""
    route = intake.route
    async with rt.stages.upstream.slot(intake.request_id):
        with rt.pool.lease(route.upstream_name, route.upstream) as session:
            response = await open_call(rt, session, intake, outgoing)
            await relay_into(stream, outgoing.endpoint, response, route.upstream.idle_timeout)


async def open_call(
    rt: Runtime, session: aiohttp.ClientSession, intake: Intake, outgoing: Outgoing
) -> aiohttp.ClientResponse:
    route = intake.route
    config = route.upstream
    headers = outgoing.headers
    headers["Content-Type"] = "application/json"
    # The caller's own bytes unless a prepare step replaced the body.
    raw = intake.raw if outgoing.body is intake.body else orjson.dumps(outgoing.body)
    data = outgoing.endpoint.upstream_bytes(outgoing.body, raw, intake.wants_stream)
    url = upstream_url(config, outgoing.path, intake.query)
    try:
        response = await open_upstream(session, config, "POST", url, headers, data)
    except ProxyError:
        rt.metrics.upstream_call(route.index, None)
        raise
    rt.metrics.upstream_call(route.index, response.status)
    return response


async def relay_into(
    stream: Stream, endpoint: Endpoint, response: aiohttp.ClientResponse, idle_timeout: float
) -> None:
    """The response's head, events and end into `stream`; the response is released."""
    clean = False
    try:
        down = downstream_response_headers(response.headers)
        is_sse = response.content_type == "text/event-stream"
        if response.status >= 300 or not is_sse:
            chunks = [chunk async for chunk in read_chunks(response, idle_timeout)]
            head = Head(response.status, down, is_sse=False, body=b"".join(chunks))
            if 200 <= response.status < 300:
                stream.open(head)
                stream.plain = PlainAnswer(endpoint, head.body or b"")
                stream.end(complete=True)
            else:
                stream.fail_before_head(head)
        else:
            stream.open(Head(response.status, down, is_sse=True))
            await _events_into(stream, endpoint, response, idle_timeout)
        clean = True
    finally:
        if clean:
            response.release()
        else:
            response.close()  # a connection broken mid-exchange is never reused


async def _events_into(
    stream: Stream, endpoint: Endpoint, response: aiohttp.ClientResponse, idle_timeout: float
) -> None:
    decoder = SSEDecoder()
    classifier = EventClassifier(endpoint)
    async for chunk in read_chunks(response, idle_timeout):
        stream.append([classifier.feed(event) for event in decoder.feed(chunk)])
    outcome = classifier.finish()
    if outcome.ending is Ending.TRUNCATED:
        raise UpstreamBroken("llm-sidecar: the upstream stream ended before it was complete")
    stream.assembly = outcome.assembly
    error = None
    if outcome.ending is Ending.UPSTREAM_ERROR:
        error = UpstreamBroken("llm-sidecar: the upstream sent an error")
    stream.end(complete=outcome.ending is Ending.COMPLETE, error=error)
