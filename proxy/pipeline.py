"""The request path for the API: intake, cache lane, in-flight table, stages.

Each box of DESIGN's diagram has its own module; this one only routes a
request between them. Join-or-lead is one synchronous step: after the last
await (the cache lookup) the table either hands back a live stream to follow
or publishes a new one, whose pump starts before anything else can run.
With cross-replica coalescing on, the new stream's producer first asks Redis
who owns the key (`proxy.cluster.flight`).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from proxy.backpressure import send_whole
from proxy.cluster.flight import start_flight
from proxy.errors import ProxyError
from proxy.intake import (
    Intake,
    coalescible_intake,
    confined,
    read_body,
    request_id_of,
    route_of,
)
from proxy.pump import pump
from proxy.relay import relay
from proxy.reply import AskPlain, Outcome, error_response, serve_answer
from proxy.runtime import RUNTIME, Runtime
from proxy.stages.follower import follow
from proxy.stages.leader import lead
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
        endpoint = route.endpoint(request.method, request.path)
        if endpoint is None:
            return await relay(request, route, request_id, rt, policy.limits, policy.stream)
        limits = policy.limits
        raw = await read_body(request, limits)
        budget = limits.max_body_bytes_in_flight or 4 * limits.max_body_bytes
        with rt.bodies.hold(len(raw), budget):  # parsing may cost ~30x the bytes
            intake = coalescible_intake(request, route, endpoint, raw, request_id)
            if endpoint.stateful(intake.body):
                # Each call changes state upstream: it must reach it every time, as sent.
                return await relay(request, route, request_id, rt, limits, policy.stream, raw)
            return await send_whole(request, await coalesce(request, intake, rt), policy.stream)
    except ProxyError as exc:
        return error_response(exc, request_id)


async def coalesce(request: web.Request, intake: Intake, rt: Runtime) -> web.StreamResponse:
    if intake.cache_read:
        answer = await rt.cache.lookup(intake.key)
        if answer is not None:
            return await serve_answer(request, intake, answer)
    outcome = await _join_or_lead(request, intake, rt, plain_only=False)
    if isinstance(outcome, AskPlain):
        # A plain caller that shared a streamed call the upstream refused:
        # asked plain, as direct, it may be served. Plain readers of the
        # refused call coalesce onto the first one's plain call.
        outcome = await _join_or_lead(request, intake, rt, plain_only=True)
    return outcome.fallback if isinstance(outcome, AskPlain) else outcome


async def _join_or_lead(
    request: web.Request, intake: Intake, rt: Runtime, *, plain_only: bool
) -> Outcome:
    settings = rt.snapshot.loaded.policy.stream
    cancel = intake.route.config.on_abandon == "cancel"
    # No await from here to the pump's start: this is the single-flight step.
    plain = plain_only or not intake.wants_stream
    stream, joined = rt.table.join_or_publish(
        intake.key,
        lambda: Stream(intake.key, settings, cancel_on_abandon=cancel, plain_call=plain),
        plain_only,
    )
    if joined:
        return await follow(request, intake, stream, rt)
    headers = intake.route.upstream_headers(request.headers, intake.request_id)
    link = rt.cluster
    if link is None:
        rt.start_pump(stream, pump(rt, stream, intake, headers))
        return await lead(request, intake, stream)
    # Another replica may already be calling the upstream for this key.
    role = start_flight(rt, link, stream, intake, headers)
    if await asyncio.shield(role) == "mirror":
        return await follow(request, intake, stream, rt)
    return await lead(request, intake, stream)
