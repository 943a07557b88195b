"""Intake: the first step of every request.

Reads the body under the size limit, parses it once, matches the route,
derives the tenant and the request key, and reads the caller's cache
directives. Produces one frozen `Intake` that the later stages read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from proxy.endpoint import Endpoint
from proxy.errors import BadRequest, BodyTooLarge, NotFound
from proxy.headers import first_credential
from proxy.keys import SHARED_TENANT, request_key, tenant_of
from proxy.routing import CompiledRoute, Snapshot


@dataclass(frozen=True, slots=True)
class Intake:
    """A coalescible request, read and parsed; relayed requests never get one."""

    request_id: str
    path: str
    query: str
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


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as it passes `limit`."""
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge(f"llm-sidecar: the request body is over the {limit}-byte limit")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.content.iter_any():
        total += len(chunk)
        if total > limit:
            raise BodyTooLarge(f"llm-sidecar: the request body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


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


def route_of(snapshot: Snapshot, request: web.Request) -> CompiledRoute:
    route = snapshot.match(request.method, request.path)
    if route is None:
        raise NotFound(f"llm-sidecar: no route for {request.method} {request.path}")
    return route


def coalescible_intake(
    request: web.Request, route: CompiledRoute, endpoint: Endpoint, raw: bytes, request_id: str
) -> Intake:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"llm-sidecar: the request body is not valid JSON ({exc})") from exc
    if not isinstance(body, dict):
        raise BadRequest("llm-sidecar: the request body must be a JSON object")
    config = route.config
    if config.share_across_tenants:
        tenant = SHARED_TENANT
    elif config.tenant_header is not None:
        tenant = tenant_of(request.headers.get(config.tenant_header))
    else:
        tenant = tenant_of(first_credential(request.headers))
    key = request_key(
        tenant, route.upstream_name, request.method, request.path, body, config.ignore_fields
    )
    cache_read, cache_write = _cache_directives(request)
    cache = config.cache
    if cache is None or cache.ttl <= 0 or (cache.only_deterministic and not _deterministic(body)):
        cache_read = cache_write = False
    options = body.get("stream_options")
    return Intake(
        request_id=request_id,
        path=request.path,
        query=request.query_string,
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
