"""The upstream stage: one call to the upstream, its events into the stream.

The upstream slot bounds concurrent upstream calls, the expensive and
rate-limited resource. It is held for the whole upstream response and
released when it ends. `call_with_retries` (`proxy.attempts`) opens the
response inside that slot: one attempt per target tried, retries and
fallbacks only before the head, so a retry is never a new call for the
stage limit. `relay_into` then logs the response into the stream.
"""

from __future__ import annotations

import aiohttp

from proxy.attempts import call_with_retries
from proxy.classify import Ending, EventClassifier
from proxy.endpoint import Endpoint
from proxy.errors import UpstreamBroken
from proxy.headers import ATTEMPTS_HEADER, downstream_response_headers
from proxy.intake import Intake
from proxy.prepare import Outgoing
from proxy.runtime import Runtime
from proxy.sse import SSEDecoder
from proxy.stream import Head, Stream
from proxy.upstream import read_chunks


async def call(rt: Runtime, stream: Stream, intake: Intake, outgoing: Outgoing) -> None:
    """Under an upstream slot: send `outgoing`, log the answer into `stream`."""
    headers = outgoing.headers
    headers["Content-Type"] = "application/json"
    body = outgoing.endpoint.upstream_body(outgoing.body)
    async with rt.stages.upstream.slot(intake.request_id):
        # Each attempt is recorded on the stream and counted in the metrics there.
        opened = await call_with_retries(
            rt, stream, intake.route, outgoing.path, intake.query, headers, body
        )
        with opened.lease:
            # The answering target's idle timeout: a fallback may be slower.
            await relay_into(
                stream, outgoing.endpoint, opened.response, opened.upstream.idle_timeout
            )


async def relay_into(
    stream: Stream, endpoint: Endpoint, response: aiohttp.ClientResponse, idle_timeout: float
) -> None:
    """The response's head, events and end into `stream`; the response is released."""
    clean = False
    try:
        down = downstream_response_headers(response.headers)
        down[ATTEMPTS_HEADER] = str(len(stream.attempts))
        is_sse = response.content_type == "text/event-stream"
        if response.status >= 300 or not is_sse:
            chunks = [chunk async for chunk in read_chunks(response, idle_timeout)]
            head = Head(response.status, down, is_sse=False, body=b"".join(chunks))
            if 200 <= response.status < 300:
                stream.open(head)
                stream.assembled = head.body
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
    stream.assembled = outcome.assembled
    error = None
    if outcome.ending is Ending.UPSTREAM_ERROR:
        error = UpstreamBroken("llm-sidecar: the upstream sent an error")
    stream.end(complete=outcome.ending is Ending.COMPLETE, error=error)
