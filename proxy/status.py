"""Operator endpoints: `/metrics` (Prometheus text) and `/status` (a live view).

Neither touches the upstream or the cache backend: both read counters the
process already keeps. `/status` names a stream by an opaque id, a keyed
hash of its key under a secret drawn when the process starts: stable while
the stream lives, and no help to an outsider who guesses a prompt (a key
prefix would be, since a key is computable from a prompt and a known or
absent credential). Neither shows a key, a credential or the policy's path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import secrets
from typing import Any

import orjson
from aiohttp import web

from proxy.attempts import targets_status
from proxy.cache.base import Cache
from proxy.cluster.report import status_of
from proxy.runtime import RUNTIME

# Per process, never shown: what makes a stream's id opaque.
_STREAM_ID_SECRET = secrets.token_bytes(32)


def stream_id(key: str) -> str:
    """The opaque id `/status` shows for the stream of `key`."""
    return hashlib.blake2b(key.encode(), key=_STREAM_ID_SECRET, digest_size=8).hexdigest()


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
            "id": stream_id(stream.key),
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
        "policy": {"version": rt.snapshot.version},
        "draining": rt.draining,
        "stages": stages,
        "streams": streams,
        "pumps": len(rt.pumps),
        "tasks": len(asyncio.all_tasks()),
        "cache": _cache_stats(rt.cache),
        "targets": targets_status(rt),
        "retries_in_flight": rt.retries.budget.in_flight,
        "cluster": status_of(rt),
    }
    return web.Response(
        body=orjson.dumps(body, default=str), headers={"Content-Type": "application/json"}
    )


def _cache_stats(cache: Cache) -> dict[str, Any] | None:
    stats = cache.stats()
    return None if stats is None else dataclasses.asdict(stats)
