"""Builds the cache the policy asks for: a `CacheLane` over one backend.

Nothing here connects anywhere: a Redis that is down at start-up costs
misses, not the start-up. What can be wrong in the configuration itself (a
password variable that is not set, a malformed URL) fails here, as a
PolicyError.
"""

from __future__ import annotations

from collections.abc import Mapping

from proxy.cache.breaker import CircuitBreaker
from proxy.cache.lane import Backend, CacheLane
from proxy.cache.memory import MemoryBackend
from proxy.cache.redis import RedisBackend
from proxy.policy import Policy, PolicyError


def build_cache(
    policy: Policy, environ: Mapping[str, str], *, source: str = "(policy)"
) -> CacheLane:
    """`source` names the policy file in a PolicyError."""
    config = policy.cache
    backend: Backend
    if config.backend == "memory":
        backend = MemoryBackend(config.max_bytes)
    else:
        password = None
        if config.password_env is not None:
            password = environ.get(config.password_env)
            if not password:
                raise PolicyError(
                    source,
                    "cache.password_env",
                    f"environment variable {config.password_env} is not set",
                )
        try:
            backend = RedisBackend(
                config.url, password=password, timeout=config.timeout, key_prefix=config.key_prefix
            )
        except ValueError as exc:  # a malformed URL; redis-py's message omits credentials
            raise PolicyError(source, "cache.url", str(exc)) from exc
    local = None
    if config.backend == "redis" and config.local_tier is not None:
        local = MemoryBackend(config.local_tier.max_bytes)
    return CacheLane(
        backend,
        workers=policy.stages.cache.workers,
        max_queue=policy.stages.cache.max_queue,
        timeout=config.timeout,
        breaker=CircuitBreaker(config.breaker.failures, config.breaker.reset_after),
        local=local,
    )
