"""The app object: everything mutable that lives as long as the server.

One `Runtime` per server, reached through `RUNTIME` on the aiohttp app.
Holds the current policy snapshot (swapped whole on reload), the stage
limiters, the in-flight table, the upstream pools, the cache, the
cross-replica link and the pump tasks it owns.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import secrets
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from proxy.budget import BodyBudget
from proxy.cache.base import Cache, NullCache
from proxy.cluster.link import RedisLink
from proxy.errors import ShuttingDown, UpstreamBroken
from proxy.limiter import StageEvent, StageLimiter
from proxy.metrics import Metrics
from proxy.policy import Stages
from proxy.retry import RetryState
from proxy.routing import Snapshot
from proxy.stream import Stream
from proxy.table import InflightTable
from proxy.upstream import UpstreamPool


@dataclass(eq=False)
class StageSet:
    leader: StageLimiter
    follower: StageLimiter
    upstream: StageLimiter

    @classmethod
    def from_policy(cls, stages: Stages) -> StageSet:
        def make(name: str) -> StageLimiter:
            limit = getattr(stages, name)
            return StageLimiter(name, limit.max_concurrency, limit.max_queue, limit.queue_timeout)

        return cls(make("leader"), make("follower"), make("upstream"))

    def all(self) -> tuple[StageLimiter, StageLimiter, StageLimiter]:
        return (self.leader, self.follower, self.upstream)

    def resize(self, stages: Stages) -> None:
        for limiter in self.all():
            limit = getattr(stages, limiter.name)
            limiter.resize(limit.max_concurrency, limit.max_queue, limit.queue_timeout)

    def observe(self, observer: Callable[[StageEvent], None] | None) -> None:
        """Report every slot event to `observer` (tests use it to check invariants)."""
        for limiter in self.all():
            limiter.observer = observer


class HookSession:
    """The client for prepare hooks, opened on first use."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


@dataclass(eq=False)
class Runtime:
    snapshot: Snapshot
    stages: StageSet
    table: InflightTable = field(default_factory=InflightTable)
    pool: UpstreamPool = field(default_factory=UpstreamPool)
    hooks: HookSession = field(default_factory=HookSession)
    cache: Cache = field(default_factory=NullCache)
    # Cross-replica coalescing's Redis link; None when the policy leaves it off.
    cluster: RedisLink | None = None
    # Pump tasks belong to their streams; the runtime keeps them so that
    # shutdown can wait for or cancel every one.
    pumps: set[asyncio.Task[None]] = field(default_factory=set)
    # Caches and cluster links replaced by a reload, still closing; awaited at shutdown.
    retiring: set[asyncio.Task[None]] = field(default_factory=set)
    draining: bool = False
    _id_prefix: str = field(default_factory=lambda: secrets.token_hex(8))
    _id_counter: Iterator[int] = field(default_factory=itertools.count)
    # This app's own registry: tests and apps in one process never share one.
    metrics: Metrics = field(default_factory=Metrics)
    # Retry budget, target ejections and the draws between targets.
    retries: RetryState = field(default_factory=RetryState)
    bodies: BodyBudget = field(default_factory=BodyBudget)

    def new_request_id(self) -> str:
        """A unique id: a random per-process prefix and a counter.

        uuid4 reads the OS's random source on every request, which showed in
        profiles; ids need to be unique, not secret.
        """
        return f"{self._id_prefix}{next(self._id_counter):016x}"

    def retire_cache(self, old: Cache) -> None:
        """Close a cache replaced by a reload, off the request path."""
        task = asyncio.create_task(old.close())
        self.retiring.add(task)
        task.add_done_callback(self.retiring.discard)

    def retire_cluster(self, old: RedisLink) -> None:
        """Close a link replaced by a reload once its flights are done, off the request path."""
        task = asyncio.create_task(old.close(grace=None))
        self.retiring.add(task)
        task.add_done_callback(self.retiring.discard)

    def start_pump(self, stream: Stream, coro: Coroutine[Any, Any, None]) -> None:
        """Run `stream`'s pump as a task the runtime owns.

        The stream's end does not rest on the coroutine reaching its own
        cleanup: a task cancelled before its first step never runs any of
        it. The done-callback ends whatever the pump left open and
        unpublishes the stream, however the task ended.
        """
        task = asyncio.create_task(coro)
        stream.pump = task
        self.pumps.add(task)
        task.add_done_callback(functools.partial(self._pump_ended, stream))

    def _pump_ended(self, stream: Stream, task: asyncio.Task[None]) -> None:
        self.pumps.discard(task)
        if stream.state != "done":
            if self.draining:  # cancelled at the drain deadline: tell readers why
                stream.fail(ShuttingDown("llm-sidecar: shutting down; the stream was cut"))
            else:
                stream.fail(UpstreamBroken("llm-sidecar: the upstream call was cancelled"))
        self.table.unpublish(stream)


RUNTIME = web.AppKey("runtime", Runtime)
