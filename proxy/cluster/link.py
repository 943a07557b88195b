"""One replica's link to the shared Redis: client, scripts, breaker, counters, tasks.

Every Redis call of the cross-replica path goes through `call`: bounded by
`cluster.timeout` (a blocking read by its block time plus that), counted
when it fails, and fed to a circuit breaker. Any fault makes the flight that
met it fall back to the single-process path; `cache.breaker.failures` faults
in a row stop new flights from trying Redis at all until
`cache.breaker.reset_after` has passed, then one probe decides (a breaker of
its own, with the cache's settings: `proxy.cache.breaker`).

The client is built the way the cache's is (`proxy.cache.redis`): nothing
connects at construction, no retries, and a command cancelled by its
timeout disconnects its connection, so a late reply is never read as the
answer to the next command.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from proxy.cache.breaker import BreakerState, CircuitBreaker, Permit
from proxy.cluster.lease import Claim, Leases
from proxy.cluster.names import FlightNames
from proxy.policy import Policy, PolicyError, RedisMode
from proxy.redis_client import RedisClient, url_problem

log = logging.getLogger("llm_sidecar.cluster")

T = TypeVar("T")

# Connections per Redis node. A mirror holds one while it waits for news, so
# this bounds the keys one replica mirrors at full speed at once.
MAX_CONNECTIONS = 1024
# Between two tries of a call Redis did not answer (a flight already under way
# tries again, within its lease, rather than failing its readers).
RETRY_PAUSE = 0.05
# How long a closing link lets its writers flush their last entries.
CLOSE_GRACE = 1.0
# Claim outcomes, Redis operations and mirror ends, as counted and labelled.
CLAIM_OUTCOMES = ("won", "lost", "fault", "skipped")
OPS = ("claim", "append", "renew", "release", "read")
MIRROR_ENDS = ("complete", "failed", "lapsed", "cut", "took_over", "fell_back")


class LinkFault(Exception):
    """A Redis call of the cross-replica path failed or timed out (already counted)."""


@dataclass(frozen=True, slots=True)
class Settings:
    """`policy.cluster`, resolved: its Redis, in milliseconds where Redis wants them."""

    url: str
    password: str | None = field(repr=False)  # compared on reload, never shown
    cluster_mode: bool
    key_prefix: str
    lease: float
    stream_ttl: float
    max_stream_bytes: int
    timeout: float
    breaker_failures: int  # `cache.breaker`'s settings, for a breaker of its own
    breaker_reset: float

    @property
    def lease_ms(self) -> int:
        return max(1, round(self.lease * 1000))

    @property
    def stream_ttl_ms(self) -> int:
        return max(1, round(self.stream_ttl * 1000))

    @property
    def block(self) -> float:
        """How long a mirror waits for news before it looks at the lease: a
        lapsed owner is noticed within its lease plus this."""
        return min(max(self.lease / 4, 0.05), 0.5)


@dataclass(frozen=True, slots=True)
class ClusterStats:
    """The counters at one instant, for `/status` and `/metrics`."""

    claims: Mapping[str, int]  # outcome -> count
    faults: Mapping[str, int]  # operation -> count
    mirror_ends: Mapping[str, int]  # how mirrors ended -> count
    fallbacks: int  # flights that ran single-process after a fault or with the breaker open
    fenced: int  # owners told their lease was no longer theirs
    overflows: int  # owned logs cut at max_stream_bytes
    breaker_state: BreakerState
    breaker_opened: int


def _redis_of(policy: Policy) -> tuple[str, str | None, RedisMode, str]:
    """The Redis the cross-replica path uses: url, password variable, mode, and
    the policy section naming them (its own `url`, else the cache's Redis)."""
    config = policy.cluster
    if config.url is not None:
        return config.url, config.password_env, config.mode, "cluster"
    cache = policy.cache
    return cache.url, cache.password_env, cache.mode, "cache"


def cluster_problems(policy: Policy, environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """What keeps the cross-replica path from being built: (path, reason) pairs.

    The model already refuses a policy with no Redis to use; this checks what
    only the environment or the client can tell.
    """
    config = policy.cluster
    if not config.coalesce_across_replicas:
        return []
    url, password_env, mode, section = _redis_of(policy)
    problems = []
    if password_env is not None and not environ.get(password_env):
        problems.append(
            (f"{section}.password_env", f"environment variable {password_env} is not set")
        )
    problem = url_problem(url, mode)
    if problem is not None:
        problems.append((f"{section}.url", problem))
    if config.lease < 2 * config.timeout:
        # Renewals go every lease/3 and may take a whole timeout: they must land in time.
        problems.append(("cluster.timeout", "must be at most half of cluster.lease"))
    return problems


def settings_of(policy: Policy, environ: Mapping[str, str], source: str) -> Settings | None:
    """The resolved settings; None when cross-replica coalescing is off."""
    config = policy.cluster
    if not config.coalesce_across_replicas:
        return None
    problems = cluster_problems(policy, environ)
    if problems:
        raise PolicyError.of(source, problems)
    url, password_env, mode, _ = _redis_of(policy)
    return Settings(
        url=url,
        password=environ.get(password_env) if password_env else None,
        cluster_mode=mode == "cluster",
        key_prefix=policy.cache.key_prefix,
        lease=config.lease,
        stream_ttl=config.stream_ttl,
        max_stream_bytes=config.max_stream_bytes,
        timeout=config.timeout,
        breaker_failures=policy.cache.breaker.failures,
        breaker_reset=policy.cache.breaker.reset_after,
    )


def build_link(
    policy: Policy, environ: Mapping[str, str], *, source: str = "(policy)"
) -> RedisLink | None:
    """The link the policy asks for (not connected yet); None when the feature is off."""
    settings = settings_of(policy, environ, source)
    return None if settings is None else RedisLink(settings)


def _client(settings: Settings) -> RedisClient:
    options: dict[str, Any] = {
        "max_connections": MAX_CONNECTIONS,
        "password": settings.password,
        "decode_responses": False,
        # No socket read timeout: a mirror's XREAD BLOCK waits on purpose;
        # every call is bounded by `call`'s asyncio.timeout instead.
        "socket_timeout": None,
        "socket_connect_timeout": settings.timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if settings.cluster_mode:
        return RedisCluster.from_url(settings.url, **options)
    # A caller past the bound waits for a connection (up to the timeout)
    # rather than failing at once, as redis-py's default pool would.
    pool = BlockingConnectionPool.from_url(
        settings.url, timeout=settings.timeout, health_check_interval=0, **options
    )
    return Redis.from_pool(pool)  # owns the pool: closing the client closes it


class RedisLink:
    # All fields are touched only from the event loop thread.
    def __init__(self, settings: Settings, client: RedisClient | None = None) -> None:
        self.settings = settings
        self.client = client if client is not None else _client(settings)
        self.leases = Leases(self.client, settings.lease_ms, settings.stream_ttl_ms)
        self.breaker = CircuitBreaker(
            settings.breaker_failures,
            settings.breaker_reset,
            subject="cross-replica Redis",
            consequence="flights run on one replica",
            logger=log,
        )
        self.claims: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.mirror_ends: Counter[str] = Counter()
        self.fallbacks = 0
        self.fenced = 0
        self.overflows = 0
        self._scripts: dict[str, AsyncScript] = {}
        # Flights and log writers using this link (a writer outlives its pump
        # by a flush and a release); a link replaced by a reload closes after them.
        self._tasks: set[asyncio.Task[None]] = set()

    def script(self, text: str) -> AsyncScript:
        """`text` registered on this link's client, once (EVALSHA, loaded on NOSCRIPT)."""
        script = self._scripts.get(text)
        if script is None:
            script = self._scripts[text] = self.client.register_script(text)
        return script

    def names(self, key: str) -> FlightNames:
        return FlightNames(self.settings.key_prefix, key)

    async def call(
        self, op: str, make: Callable[[], Awaitable[T]], bound: float | None = None
    ) -> T:
        """One Redis call, bounded by `bound` seconds (default `cluster.timeout`);
        a fault is counted, fed to the breaker and raised as LinkFault."""
        try:
            async with asyncio.timeout(self.settings.timeout if bound is None else bound):
                await self._ready()
                result = await make()
        except (redis_errors.RedisError, OSError, TimeoutError) as exc:
            self.faults[op] += 1
            self.breaker.record("call", False)
            log.debug("cross-replica Redis %s failed (%s)", op, type(exc).__name__)
            raise LinkFault(op) from exc
        self.breaker.record("call", True)
        return result

    async def claim(self, names: FlightNames, plain: bool) -> Claim | None:
        """Try to own the key for a call in this mode (`plain`: not streamed);
        None when Redis is not to be used now (fault, breaker open)."""
        permit: Permit | None = self.breaker.allow()
        if permit is None:
            self.claims["skipped"] += 1
            return None
        try:
            async with asyncio.timeout(self.settings.timeout):
                await self._ready()
                claim = await self.leases.claim(names, plain)
        except (redis_errors.RedisError, OSError, TimeoutError) as exc:
            log.debug("cross-replica Redis claim failed (%s)", type(exc).__name__)
            self.claims["fault"] += 1
            self.faults["claim"] += 1
            self.breaker.record(permit, False)
            return None
        except BaseException:
            self.breaker.release(permit)
            raise
        self.breaker.record(permit, True)
        self.claims["won" if claim.won else "lost"] += 1
        return claim

    async def _ready(self) -> None:
        """A cluster client learns the slot map before its first command.

        redis-py's cluster client does that by itself on first use, but a
        blocking read started while another command's first use rebuilds the
        node table has its connection closed under it: every caller asks
        first, behind the client's own lock (a no-op once it has the map).
        """
        if isinstance(self.client, RedisCluster):
            await self.client.initialize()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a log writer as a task this link owns."""
        self.adopt(asyncio.create_task(coro))

    def adopt(self, task: asyncio.Task[None]) -> None:
        """Count `task` (a flight or a writer) as a user of this link until it ends."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stats(self) -> ClusterStats:
        return ClusterStats(
            claims={name: self.claims[name] for name in CLAIM_OUTCOMES},
            faults={name: self.faults[name] for name in OPS},
            mirror_ends={name: self.mirror_ends[name] for name in MIRROR_ENDS},
            fallbacks=self.fallbacks,
            fenced=self.fenced,
            overflows=self.overflows,
            breaker_state=self.breaker.state,
            breaker_opened=self.breaker.opened,
        )

    async def close(self, grace: float | None = CLOSE_GRACE) -> None:
        """Wait up to `grace` (None: as long as it takes) for the flights and
        writers using this link, cancel what is left, then close the client."""
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel("llm-sidecar is stopping")
            await asyncio.gather(*pending, return_exceptions=True)
        await self.client.aclose()
