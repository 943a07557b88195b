"""The upstream stage: one call to the upstream, its events into the stream.

The upstream slot bounds concurrent upstream calls, the expensive and
rate-limited resource. It is held for the whole upstream response and
released when it ends. `call_with_retries` (`proxy.attempts`) opens the
response inside that slot: one attempt per target tried, retries and
fallbacks only before the head, so a retry is never a new call for the
stage limit. `relay_into` then logs the response into the stream.

Every call is bounded by its upstream's `max_duration`, `max_response_bytes`
and `max_event_bytes`: past one, the call ends with an error (the stream's
readers get it, nothing is cached), its connection is closed and its slot
released, whether or not anyone is still reading.

The call asks in the leader's own mode with the leader's own bytes: a
plain call for `stream: false`, a stream (with usage) for `stream: true`.
`relay_into` logs the response parsing nothing: a reader of the other
mode converts it on first use (`proxy.convert`).
"""

from __future__ import annotations

import aiohttp

from proxy import jsonbody
from proxy.attempts import body_done, body_failed, call_with_retries
from proxy.classify import Ending, EventClassifier
from proxy.convert import PlainAnswer
from proxy.endpoint import Endpoint
from proxy.errors import InBandError, UpstreamBroken, UpstreamEventTooLarge
from proxy.headers import ATTEMPTS_HEADER, SHOULD_RETRY_HEADER, downstream_response_headers
from proxy.intake import Intake
from proxy.keys import split_query
from proxy.policy import Upstream
from proxy.prepare import Outgoing
from proxy.runtime import Runtime
from proxy.sse import EventTooLarge, SSEDecoder
from proxy.stream import Head, Stream
from proxy.upstream import deadline, read_chunks


async def call(rt: Runtime, stream: Stream, intake: Intake, outgoing: Outgoing) -> None:
    """Under an upstream slot: send `outgoing`, log the answer into `stream`."""
    headers = outgoing.headers
    headers["Content-Type"] = "application/json"
    # The caller's own bytes unless a prepare step replaced the body.
    raw = intake.raw if outgoing.body is intake.body else jsonbody.dumps(outgoing.body)
    endpoint, streams = outgoing.endpoint, intake.wants_stream

    def payload(model: str | None) -> bytes:
        """What goes to a target: with its model rewrite, re-serialised."""
        if model is None:
            return endpoint.upstream_bytes(outgoing.body, raw, streams)
        body = {**outgoing.body, "model": model}
        return endpoint.upstream_bytes(body, jsonbody.dumps(body), streams)

    # max_duration counts from the slot: retries and their waits included.
    async with rt.stages.upstream.slot(intake.request_id), deadline(intake.route.upstream):
        # Each attempt is recorded on the stream and counted in the metrics there.
        opened = await call_with_retries(
            rt, stream, intake.route, outgoing.path, _query(intake), headers, payload
        )
        with opened.lease:
            # The answering target's bounds and idle timeout: a fallback may differ.
            try:
                await relay_into(stream, outgoing.endpoint, opened.response, opened.upstream)
            except UpstreamBroken as exc:
                body_failed(rt, stream, opened, exc)  # too late to retry; still its failure
                raise
            body_done(rt, opened)


def _query(intake: Intake) -> str:
    """The caller's query; without its credentials when inject_key replaces them."""
    return split_query(intake.query)[0] if intake.route.injects_key else intake.query


async def relay_into(
    stream: Stream, endpoint: Endpoint, response: aiohttp.ClientResponse, config: Upstream
) -> None:
    """The response's head, events and end into `stream`; the response is released."""
    clean = False
    try:
        down = downstream_response_headers(response.headers)
        down[ATTEMPTS_HEADER] = str(len(stream.attempts))
        if stream.retries_spent:
            down[SHOULD_RETRY_HEADER] = "false"
        is_sse = response.content_type == "text/event-stream"
        if response.status >= 300 or not is_sse:
            chunks = [chunk async for chunk in read_chunks(response, config)]
            head = Head(response.status, down, is_sse=False, body=b"".join(chunks))
            if 200 <= response.status < 300:
                stream.open(head)
                stream.plain = PlainAnswer(endpoint, head.body or b"")
                stream.end(complete=True)
            else:
                stream.fail_before_head(head)
        else:
            stream.open(Head(response.status, down, is_sse=True))
            await _events_into(stream, endpoint, response, config)
        clean = True
    finally:
        if clean:
            response.release()
        else:
            response.close()  # a connection broken mid-exchange is never reused


async def _events_into(
    stream: Stream, endpoint: Endpoint, response: aiohttp.ClientResponse, config: Upstream
) -> None:
    decoder = SSEDecoder(config.max_event_bytes)
    classifier = EventClassifier(endpoint)
    async for chunk in read_chunks(response, config):
        try:
            events = decoder.feed(chunk)
        except EventTooLarge as exc:
            stream.append([classifier.feed(event) for event in exc.events])
            raise UpstreamEventTooLarge(
                f"llm-sidecar: an upstream event is over {config.max_event_bytes} bytes"
            ) from exc
        stream.append([classifier.feed(event) for event in events])
    # The input ended cleanly: a held CR ends its event; an event begun is a cut.
    stream.append([classifier.feed(event) for event in decoder.finish()])
    outcome = classifier.finish(truncated=decoder.truncated)
    if outcome.ending is Ending.TRUNCATED:
        raise UpstreamBroken("llm-sidecar: the upstream stream ended before it was complete")
    stream.assembly = outcome.assembly
    # The upstream's own error: streaming readers got its event, and no other.
    error = None
    if outcome.ending is Ending.UPSTREAM_ERROR and outcome.error is not None:
        error = InBandError(outcome.error)
    stream.end(complete=outcome.ending is Ending.COMPLETE, error=error)
