"""The request path for the API: intake, cache lane, table, stages, reply.

Join-or-lead happens here in one synchronous step: after the last await
(the cache lookup) the table is read and, when the key is absent, a new
stream is published and its pump spawned before anything else can run.
"""

from __future__ import annotations

from aiohttp import web

from proxy.errors import ProxyError
from proxy.intake import (
    Intake,
    coalescible_intake,
    confined,
    read_body,
    request_id_of,
    route_of,
)
from proxy.policy import StreamSettings
from proxy.pump import pump
from proxy.relay import relay
from proxy.reply import error_response, serve_answer, serve_from_stream
from proxy.runtime import RUNTIME, Runtime
from proxy.stream import Stream
from proxy.trail import trail_of


async def handle_api(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    snapshot = rt.snapshot  # one policy for the whole request, whatever reloads
    request_id = request_id_of(request, rt.new_request_id)
    trail = trail_of(request)
    if trail is not None:
        trail.request_id = request_id
    try:
        request = confined(request)  # the one canonical path from here on, or a 400
        route = route_of(snapshot, request)
        if trail is not None:
            trail.route = route.index
        policy = snapshot.loaded.policy
        if not route.coalesces(request.method, request.path):
            return await relay(request, route, request_id, rt, policy.limits)
        raw = await read_body(request, policy.limits)
        intake = coalescible_intake(request, route, raw, request_id)
        return await coalesce(request, intake, rt, policy.stream)
    except ProxyError as exc:
        return error_response(exc, request_id)


async def coalesce(
    request: web.Request, intake: Intake, rt: Runtime, settings: StreamSettings
) -> web.StreamResponse:
    assert intake.key is not None
    if intake.cache_read:
        answer = await rt.cache.lookup(intake.key)
        if answer is not None:
            return await serve_answer(request, intake, answer)
    # No await from here to the spawn: this is the single-flight step.
    existing = rt.table.get(intake.key)
    if existing is not None and existing.joinable:
        return await serve_from_stream(request, intake, existing, rt, "follow", rt.stages.follower)
    stream = Stream(intake.key, settings)
    stream.cancel_on_abandon = intake.route.config.on_abandon == "cancel"
    if existing is None:
        rt.table.publish(stream)
    # else: the live stream is past its log cap; this one runs unpublished.
    headers = intake.route.upstream_headers(request.headers, intake.request_id)
    stream.pump = rt.spawn_pump(pump(rt, stream, intake, headers))
    return await serve_from_stream(request, intake, stream, rt, "lead", None)
