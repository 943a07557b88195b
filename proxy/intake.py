"""Intake: the first step of every request.

Confines the path (`proxy.paths`), reads the body under the size limit and
the body timeout, parses it once, matches the route, derives the tenant and
the request key, and reads the caller's cache directives. Produces one
frozen `Intake` that the later stages read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from yarl import URL

from proxy import jsonbody
from proxy.endpoint import Endpoint
from proxy.errors import BadPath, BadRequest, BodyTooLarge, NotFound, RequestTimeout
from proxy.headers import credentials_of
from proxy.keys import (
    SHARED_TENANT,
    request_key,
    split_query,
    tenant_of,
    tenant_of_credentials,
)
from proxy.paths import PathRejected, confine
from proxy.policy import Limits
from proxy.routing import CompiledRoute, Snapshot
from proxy.server import stop_lingering


@dataclass(frozen=True, slots=True)
class Intake:
    """A coalescible request, read and parsed; relayed requests never get one."""

    request_id: str
    path: str  # canonical and still percent-encoded: sent upstream as is
    query: str  # raw, as the caller sent it
    route: CompiledRoute
    endpoint: Endpoint  # chosen once here; later stages never look at the path for it
    body: dict[str, Any]  # parsed once
    raw: bytes  # the body as the caller sent it: what goes upstream unless prepared
    key: str
    wants_stream: bool
    wants_usage: bool
    cache_read: bool
    cache_write: bool


def request_id_of(request: web.Request, new_id: Callable[[], str]) -> str:
    given = request.headers.get("x-request-id")
    if given and len(given) <= 200 and given.isprintable():
        return given
    return new_id()


def confined(request: web.Request) -> web.Request:
    """The request with its path in canonical form (`proxy.paths`); a path
    that is malformed or leaves the API (/v1, or Azure's /openai) is a 400
    and goes nowhere."""
    raw = request.rel_url.raw_path
    try:
        path = confine(raw)
    except PathRejected as exc:
        raise BadPath(f"llm-sidecar: the request path is not allowed: {exc}") from exc
    if path == raw:
        return request
    query = request.rel_url.raw_query_string
    return request.clone(rel_url=URL.build(path=path, query_string=query, encoded=True))


async def body_chunks(request: web.Request, limits: Limits) -> AsyncIterator[bytes]:
    """The body as it arrives: 413 past `max_body_bytes`, 408 when it is not
    all there `body_timeout` after the read began, 400 when it is malformed."""
    limit = limits.max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge(f"llm-sidecar: the request body is over the {limit}-byte limit")
    content = request.content
    deadline = asyncio.get_running_loop().time() + limits.body_timeout
    total = 0
    while True:
        try:
            if content.is_eof():
                chunk = await content.readany()  # all here already: no timer needed
            else:
                async with asyncio.timeout_at(deadline):
                    chunk = await content.readany()
        except TimeoutError as exc:
            stop_lingering(request)  # a stalled caller is not waited on any longer
            raise RequestTimeout(
                f"llm-sidecar: the request body did not arrive within {limits.body_timeout:g}s"
            ) from exc
        except web.RequestPayloadError as exc:
            raise BadRequest(
                f"llm-sidecar: the request body is malformed ({type(exc.__cause__).__name__})"
            ) from exc
        if not chunk:
            return
        total += len(chunk)
        if total > limit:
            if request.headers.get("Content-Encoding", "identity").lower() != "identity":
                # Discarding the rest would mean decompressing it: a small
                # compressed body can cost seconds of CPU (a gzip bomb).
                stop_lingering(request)
            raise BodyTooLarge(f"llm-sidecar: the request body is over the {limit}-byte limit")
        yield chunk


async def read_body(request: web.Request, limits: Limits) -> bytes:
    """The whole body, under the limits of `body_chunks`."""
    return b"".join([chunk async for chunk in body_chunks(request, limits)])


def _cache_directives(request: web.Request) -> tuple[bool, bool]:
    value = request.headers.get("cache-control")
    if not value:
        return True, True
    tokens = {t.strip().lower() for t in value.split(",")}
    if "no-store" in tokens:
        return False, False
    if "no-cache" in tokens:
        return False, True
    return True, True


def _deterministic(body: dict[str, Any]) -> bool:
    return body.get("temperature") == 0 or body.get("seed") is not None


def _keyed(body: dict[str, Any], ignore: tuple[str, ...]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The body and ignored fields the key is made of.

    An ignored `stream_options` ignores only `include_usage`, which the
    proxy normalises (it asks for usage on every streamed call and withholds
    the usage chunk from readers who did not). Its other members change
    every chunk (vLLM's `continuous_usage_stats` puts usage on each), so
    they stay in the key: a reader without them must not share the stream.
    """
    options = body.get("stream_options")
    if "stream_options" not in ignore or not isinstance(options, dict):
        return body, ignore
    rest = {name: value for name, value in options.items() if name != "include_usage"}
    if not rest:
        return body, ignore  # keyed as before: entries already cached stay reachable
    return {**body, "stream_options": rest}, tuple(n for n in ignore if n != "stream_options")


def route_of(snapshot: Snapshot, request: web.Request) -> CompiledRoute:
    route = snapshot.match(request.method, request.rel_url.raw_path)
    if route is None:
        raise NotFound(f"llm-sidecar: no route for {request.method} {request.path}")
    return route


def coalescible_intake(
    request: web.Request, route: CompiledRoute, endpoint: Endpoint, raw: bytes, request_id: str
) -> Intake:
    try:
        body = jsonbody.loads(raw)
    except ValueError as exc:
        raise BadRequest(f"llm-sidecar: the request body is not valid JSON ({exc})") from exc
    if not isinstance(body, dict):
        raise BadRequest("llm-sidecar: the request body must be a JSON object")
    config = route.config
    path = request.rel_url.raw_path
    raw_query = request.rel_url.raw_query_string
    query, query_credential = split_query(raw_query)
    if config.share_across_tenants:
        tenant = SHARED_TENANT
    elif config.tenant_header is not None:
        tenant = tenant_of(request.headers.get(config.tenant_header))
    else:
        tenant = tenant_of_credentials(
            credentials_of(request.headers, config.credential_headers), query_credential
        )
    keyed, ignored = _keyed(body, config.ignore_fields)
    try:
        key = request_key(
            tenant,
            route.upstream_name,
            request.method,
            path,
            keyed,
            ignored,
            query=query,
            vary=[
                ",".join(request.headers.getall(name, ())) or None for name in config.vary_headers
            ],
        )
        # The ignored fields are sent upstream too: they must be writable as well.
        jsonbody.dumps([body[name] for name in config.ignore_fields if name in body])
    except TypeError as exc:  # orjson writes less deeply nested JSON than it reads
        raise BadRequest(f"llm-sidecar: the request body cannot be re-encoded ({exc})") from exc
    cache_read, cache_write = _cache_directives(request)
    cache = config.cache
    if cache is None or cache.ttl <= 0 or (cache.only_deterministic and not _deterministic(body)):
        cache_read = cache_write = False
    options = body.get("stream_options")
    return Intake(
        request_id=request_id,
        path=path,
        query=raw_query,
        route=route,
        endpoint=endpoint,
        body=body,
        raw=raw,
        key=key,
        wants_stream=body.get("stream") is True,
        wants_usage=isinstance(options, dict) and options.get("include_usage") is True,
        cache_read=cache_read,
        cache_write=cache_write,
    )
