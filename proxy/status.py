"""Operator endpoints: `/metrics` (Prometheus text) and `/status` (a live view).

Neither touches the upstream or the cache backend: both read counters the
process already keeps. `/status` shows a stream by the first 12 hex
characters of its key only; keys are hashes, but the whole key would let a
caller who knows a prompt confirm it is in flight.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import orjson
from aiohttp import web

from proxy.cache.base import Cache
from proxy.cluster.report import status_of
from proxy.runtime import RUNTIME

KEY_PREFIX_CHARS = 12


async def metrics_endpoint(request: web.Request) -> web.Response:
    body, content_type = request.app[RUNTIME].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def status_endpoint(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    now = asyncio.get_running_loop().time()
    stages = {}
    for limiter in rt.stages.all():
        stats = limiter.stats()
        stages[stats.name] = {
            "in_use": stats.in_use,
            "queued": stats.queued,
            "max_concurrency": stats.max_concurrency,
            "max_queue": stats.max_queue,
            "queue_timeout": limiter.queue_timeout,
        }
    streams = [
        {
            "key": stream.key[:KEY_PREFIX_CHARS],
            "state": stream.state,
            "readers": stream.readers,
            "events": len(stream.events),
            "bytes": stream.size,
            "age_s": round(now - stream.created_at, 3),
            "role": stream.role,
            "mirrors": stream.mirrors,
        }
        for stream in rt.table
    ]
    body: dict[str, Any] = {
        "policy": {"version": rt.snapshot.version, "source": rt.snapshot.loaded.source},
        "draining": rt.draining,
        "stages": stages,
        "streams": streams,
        "pumps": len(rt.pumps),
        "tasks": len(asyncio.all_tasks()),
        "cache": _cache_stats(rt.cache),
        "cluster": status_of(rt),
    }
    return web.Response(
        body=orjson.dumps(body, default=str), headers={"Content-Type": "application/json"}
    )


def _cache_stats(cache: Cache) -> dict[str, Any] | None:
    stats = cache.stats()
    return None if stats is None else dataclasses.asdict(stats)
