"""The app object: everything mutable that lives as long as the server.

One `Runtime` per server, reached through `RUNTIME` on the aiohttp app.
Holds the current policy snapshot (swapped whole on reload), the stage
limiters, the in-flight table, the upstream pools, the cache and the pump
tasks it owns.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from proxy.cache.base import Cache, NullCache
from proxy.limiter import StageEvent, StageLimiter
from proxy.metrics import Metrics
from proxy.policy import Stages
from proxy.retry import RetryState
from proxy.routing import Snapshot
from proxy.table import InflightTable
from proxy.upstream import UpstreamPool


class StageRecorder:
    """Keeps every stage event and flags any holder with two slots at once."""

    def __init__(self) -> None:
        self.events: list[StageEvent] = []
        self.violations: list[StageEvent] = []
        self._held: dict[str, str] = {}

    def __call__(self, event: StageEvent) -> None:
        self.events.append(event)
        if event.kind == "acquire":
            if event.holder in self._held:
                self.violations.append(event)
            self._held[event.holder] = event.stage
        elif event.kind == "release":
            self._held.pop(event.holder, None)


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

    def observe(self, observer: StageRecorder | None) -> None:
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
    # Pump tasks belong to their streams; the runtime keeps them so that
    # shutdown can wait for or cancel every one.
    pumps: set[asyncio.Task[None]] = field(default_factory=set)
    # Caches replaced by a reload, still closing; awaited at shutdown.
    retiring: set[asyncio.Task[None]] = field(default_factory=set)
    draining: bool = False
    _id_prefix: str = field(default_factory=lambda: secrets.token_hex(8))
    _id_counter: Iterator[int] = field(default_factory=itertools.count)
    recorder: StageRecorder | None = None
    # This app's own registry: tests and apps in one process never share one.
    metrics: Metrics = field(default_factory=Metrics)
    # Retry budget, target ejections and the draws between targets.
    retries: RetryState = field(default_factory=RetryState)

    def record_stages(self) -> StageRecorder:
        self.recorder = StageRecorder()
        self.stages.observe(self.recorder)
        return self.recorder

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

    def spawn_pump(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self.pumps.add(task)
        task.add_done_callback(self.pumps.discard)
        return task


RUNTIME = web.AppKey("runtime", Runtime)
