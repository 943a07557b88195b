"""The plain relay: requests that are not coalesced go upstream as they are.

Bodies stream both ways; an SSE response passes through chunk by chunk.
Used for GET /v1/models, files, unknown endpoints and routes with
`coalesce: false`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from proxy.errors import BodyTooLarge, ProxyError, UpstreamBroken
from proxy.headers import SERVED_BY, Served, downstream_response_headers
from proxy.intake import body_chunks
from proxy.policy import Limits
from proxy.routing import CompiledRoute
from proxy.runtime import Runtime
from proxy.trail import trail_of
from proxy.upstream import open_upstream, read_chunks, upstream_url


def _too_large(limit: int) -> str:
    return f"llm-sidecar: the request body is over the {limit}-byte limit"


class _LimitedBody:
    """The caller's body streamed upstream as it arrives, under the intake's
    limits (size, time, framing).

    aiohttp reports an exception raised while uploading as a connection
    error; `failure` lets the relay answer the caller's fault (413, 408,
    400) instead of 502.
    """

    def __init__(self, request: web.Request, limits: Limits) -> None:
        self._request = request
        self._limits = limits
        self.failure: ProxyError | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in body_chunks(self._request, self._limits):
                yield chunk
        except ProxyError as exc:
            self.failure = exc
            raise


async def relay(
    request: web.Request,
    route: CompiledRoute,
    request_id: str,
    rt: Runtime,
    limits: Limits,
) -> web.StreamResponse:
    # The session is held until the response is relayed: a reload that
    # replaces the upstream closes it only after.
    with rt.pool.lease(route.upstream_name, route.upstream) as session:
        return await _relay(request, route, request_id, rt, limits, session)


async def _relay(
    request: web.Request,
    route: CompiledRoute,
    request_id: str,
    rt: Runtime,
    limits: Limits,
    session: aiohttp.ClientSession,
) -> web.StreamResponse:
    config = route.upstream
    limit = limits.max_body_bytes
    headers = route.upstream_headers(request.headers, request_id)
    body: _LimitedBody | None = None
    if request.body_exists:
        length = request.content_length
        if length is not None:
            if length > limit:
                raise BodyTooLarge(_too_large(limit))
            if request.headers.get("Content-Encoding", "identity").lower() == "identity":
                # Known length: the upstream gets it too, rather than a chunked
                # upload. (aiohttp decodes a compressed body, whose length is
                # then another: an upstream told the wire length would wait.)
                headers["Content-Length"] = str(length)
        body = _LimitedBody(request, limits)
    # Confined at intake: canonical, still encoded, and sent exactly so.
    url = upstream_url(config, request.rel_url.raw_path, request.rel_url.raw_query_string)
    try:
        upstream = await open_upstream(
            session, config, request.method, url, headers, body.chunks() if body else None
        )
    except ProxyError as exc:
        rt.metrics.upstream_call(route.index, None)
        if body is not None and body.failure is not None:
            raise body.failure from exc
        raise
    rt.metrics.upstream_call(route.index, upstream.status)
    trail = trail_of(request)
    if trail is not None:
        trail.served, trail.upstream = Served.BYPASS, upstream.status
    clean = False
    try:
        out_headers = downstream_response_headers(upstream.headers)
        out_headers["X-Request-Id"] = request_id
        out_headers[SERVED_BY] = Served.BYPASS
        response = web.StreamResponse(status=upstream.status, headers=out_headers)
        is_sse = upstream.content_type == "text/event-stream"
        if upstream.content_length is not None and not is_sse:
            response.content_length = upstream.content_length
        await response.prepare(request)
        if trail is not None:
            trail.first_byte_at = time.perf_counter()
        try:
            async for chunk in read_chunks(upstream, config.idle_timeout):
                await response.write(chunk)
        except UpstreamBroken as exc:
            if not is_sse:
                # A cut body must look cut to the caller, not complete.
                if request.transport is not None:
                    request.transport.close()
                return response
            await response.write(exc.sse_event())
        await response.write_eof()
        clean = True
        return response
    finally:
        if trail is not None:
            trail.bytes_out = upstream.content.total_bytes  # what was read is what was sent
        if clean:
            upstream.release()
        else:
            upstream.close()
