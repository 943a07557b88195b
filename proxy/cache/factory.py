"""Builds the cache the policy asks for: a `CacheLane` over one backend.

Nothing here connects anywhere: a Redis that is down at start-up costs
misses, not the start-up. What can be wrong in the configuration itself (a
password variable that is not set, a malformed URL) is found by
`cache_problems`, which `compile_policy` runs too, so `llm-sidecar check`
fails exactly where `serve` would.
"""

from __future__ import annotations

from collections.abc import Mapping

from proxy.cache.breaker import CircuitBreaker
from proxy.cache.lane import WRITE_BYTES_PER_SECOND, Backend, CacheLane
from proxy.cache.memory import MemoryBackend
from proxy.cache.redis import RedisBackend
from proxy.policy import Policy, PolicyError
from proxy.redis_client import url_problem


def cache_problems(policy: Policy, environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """What keeps the policy's cache from being built: (path, reason) pairs."""
    config = policy.cache
    if config.backend != "redis":
        return []
    problems = []
    if config.password_env is not None and not environ.get(config.password_env):
        problems.append(
            ("cache.password_env", f"environment variable {config.password_env} is not set")
        )
    problem = url_problem(config.url, config.mode)
    if problem is not None:
        problems.append(("cache.url", problem))
    return problems


def build_cache(
    policy: Policy, environ: Mapping[str, str], *, source: str = "(policy)"
) -> CacheLane:
    """`source` names the policy file in a PolicyError."""
    config = policy.cache
    backend: Backend
    if config.backend == "memory":
        backend = MemoryBackend(config.max_bytes)
    else:
        problems = cache_problems(policy, environ)
        if problems:
            raise PolicyError.of(source, problems)
        password = environ.get(config.password_env) if config.password_env else None
        lane = policy.stages.cache
        backend = RedisBackend(
            config.url,
            password=password,
            timeout=config.timeout,
            key_prefix=config.key_prefix,
            mode=config.mode,
            # Every lookup worker and every write the lane allows (its default
            # bound, workers + max_queue) may be on one node at once: a cluster
            # node's pool must not refuse a call a single Redis would take.
            max_connections=2 * lane.workers + lane.max_queue,
            write_timeout=config.timeout + config.max_entry_bytes / WRITE_BYTES_PER_SECOND,
        )
    local = None
    local_max_ttl = None
    if config.backend == "redis" and config.local_tier is not None:
        local = MemoryBackend(config.local_tier.max_bytes)
        local_max_ttl = config.local_tier.max_ttl
    return CacheLane(
        backend,
        workers=policy.stages.cache.workers,
        max_queue=policy.stages.cache.max_queue,
        timeout=config.timeout,
        breaker=CircuitBreaker(config.breaker.failures, config.breaker.reset_after),
        max_entry_bytes=config.max_entry_bytes,
        local=local,
        local_max_ttl=local_max_ttl,
    )
