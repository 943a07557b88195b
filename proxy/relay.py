"""The plain relay: requests that are not coalesced go upstream as they are.

Bodies stream both ways; an SSE response passes through chunk by chunk.
Used for GET /v1/models, files, unknown endpoints and routes with
`coalesce: false`.

Content codings, like nginx: a response body passes through as the upstream
encoded it, with its `Content-Encoding` and `Content-Length` untouched (the
caller's `Accept-Encoding` is what the upstream is asked). A request body is
decoded by the server as it arrives (aiohttp), so it goes upstream decoded,
without `Content-Encoding` and without the caller's encoded `Content-Length`.

The upstream's bounds hold here too: the exchange ends at `max_duration`
and the body at `max_response_bytes` (an SSE body with an error event, any
other body cut). A caller whose socket does not drain within
`write_timeout` is dropped, and the upstream connection with it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.http_writer import StreamWriter

from proxy.backpressure import drain_within, write_deadline
from proxy.errors import BodyTooLarge, ProxyError, UpstreamBroken
from proxy.headers import SERVED_BY, Served, downstream_response_headers
from proxy.intake import body_chunks
from proxy.policy import Limits, StreamSettings
from proxy.routing import CompiledRoute
from proxy.runtime import Runtime
from proxy.trail import trail_of
from proxy.upstream import (
    check_declared_size,
    deadline,
    open_upstream,
    read_chunks,
    upstream_url,
)


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
    settings: StreamSettings,
    read: bytes | None = None,
) -> web.StreamResponse:
    """Relay `request`; `read` is its body when intake already read it."""
    # The session is held until the response is relayed: a reload that
    # replaces the upstream closes it only after.
    with rt.pool.lease(route.upstream_name, route.upstream) as session:
        config = route.upstream
        limit = limits.max_body_bytes
        started = asyncio.get_running_loop().time()
        headers = route.upstream_headers(request.headers, request_id)
        accept = request.headers.get("Accept-Encoding")
        if accept is not None:
            headers["Accept-Encoding"] = accept
        body: _LimitedBody | None = None
        # A body intake `read` was read whole, under the limit and decoded: sent as bytes.
        if read is None and request.body_exists:
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
            async with deadline(config, started):
                upstream = await open_upstream(
                    session,
                    config,
                    request.method,
                    url,
                    headers,
                    read if read is not None else body.chunks() if body else None,
                    passthrough=True,
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
            check_declared_size(upstream, config)  # before the head: the caller gets a 502
            out_headers = downstream_response_headers(upstream.headers)
            encoding = upstream.headers.get("Content-Encoding")
            if encoding is not None:
                out_headers["Content-Encoding"] = encoding  # the bytes below are still encoded
            out_headers["X-Request-Id"] = request_id
            out_headers[SERVED_BY] = Served.BYPASS
            response = web.StreamResponse(status=upstream.status, headers=out_headers)
            is_sse = upstream.content_type == "text/event-stream"
            if upstream.content_length is not None and not is_sse:
                response.content_length = upstream.content_length
            writer = await response.prepare(request)
            assert isinstance(writer, StreamWriter)
            transport = writer.transport
            if transport is None:
                raise ConnectionResetError("the client went away")
            high_water, write_timeout = settings.write_high_water, settings.write_timeout
            transport.set_write_buffer_limits(high=high_water)
            if trail is not None:
                trail.first_byte_at = time.perf_counter()
            try:
                async with deadline(config, started):
                    async for chunk in read_chunks(upstream, config):
                        # No timer per chunk: only a full socket is waited on, bounded.
                        await writer.write(chunk, drain=False)
                        if transport.get_write_buffer_size() > high_water:
                            await drain_within(writer, write_timeout)
            except UpstreamBroken as exc:  # cut, idle, or past a bound
                if not is_sse or encoding is not None:
                    # A cut body must look cut to the caller, not complete (and an
                    # encoded stream cannot take a plain error event).
                    transport.close()
                    return response
                async with write_deadline(transport, write_timeout):
                    await response.write(exc.sse_event())
            async with write_deadline(transport, write_timeout):
                await response.write_eof()
            clean = True
            return response
        except ConnectionResetError:
            return response  # the caller left or stopped reading: only this exchange ends
        finally:
            if trail is not None:
                trail.bytes_out = upstream.content.total_bytes  # what was read is what was sent
            if clean:
                upstream.release()
            else:
                upstream.close()
