"""A policy compiled for serving: routes with their matchers, steps and keys.

Built once per (re)load from a validated `LoadedPolicy`; each request reads
one `Snapshot` and keeps it, so a reload never changes a request mid-way.
Everything that can fail (a missing key or password variable) fails here,
at load time, as one PolicyError naming the file and every path.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass

from multidict import CIMultiDict

from proxy.cache.factory import cache_problems
from proxy.cluster.link import cluster_problems
from proxy.endpoint import Endpoint, endpoint_of
from proxy.headers import Headers, upstream_request_headers
from proxy.policy import LoadedPolicy, PolicyError, Route, Upstream
from proxy.prepare import (
    HookClient,
    InjectKeyStep,
    MissingSecret,
    PrepareStep,
    Secret,
    build_step,
)
from proxy.retry import RetryRules
from proxy.targets import Strategy, target_label


@dataclass(frozen=True, slots=True)
class CompiledTarget:
    """One of a route's targets: where an attempt goes and what it changes."""

    upstream_name: str
    model: str | None
    weight: float
    upstream: Upstream
    upstream_key: Secret | None  # from the upstream's api_key_env
    label: str

    @property
    def id(self) -> tuple[str, str | None]:
        return (self.upstream_name, self.model)


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    index: int
    config: Route
    pattern: re.Pattern[str]
    methods: frozenset[str] | None
    steps: tuple[PrepareStep, ...]
    # The first target's: what the key and the relay use, whichever target answers.
    upstream_name: str
    upstream: Upstream
    upstream_key: Secret | None  # from the upstream's api_key_env
    targets: tuple[CompiledTarget, ...]
    strategy: Strategy
    retry: RetryRules

    def matches(self, method: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        return self.pattern.fullmatch(path) is not None

    @property
    def injects_key(self) -> bool:
        """Whether an inject_key step replaces the caller's credentials."""
        return any(isinstance(step, InjectKeyStep) for step in self.steps)

    def upstream_headers(self, headers: Headers, request_id: str) -> CIMultiDict[str]:
        """The caller's headers as this route sends them upstream."""
        key = None if self.upstream_key is None else self.upstream_key.reveal()
        return upstream_request_headers(headers, request_id, key)

    def endpoint(self, method: str, path: str) -> Endpoint | None:
        """The endpoint this route coalesces at `method path`; None: relay as is."""
        return endpoint_of(method, path) if self.config.coalesce else None


@dataclass(frozen=True, slots=True)
class Snapshot:
    loaded: LoadedPolicy
    routes: tuple[CompiledRoute, ...]

    @property
    def version(self) -> str:
        return self.loaded.version

    def match(self, method: str, path: str) -> CompiledRoute | None:
        for route in self.routes:
            if route.matches(method, path):
                return route
        return None


def compile_policy(
    loaded: LoadedPolicy, client: HookClient, environ: dict[str, str] | None = None
) -> Snapshot:
    env = dict(os.environ) if environ is None else environ
    policy = loaded.policy
    # Every problem at once; the cache's too, so `check` fails where `serve` would.
    problems: list[tuple[str, str]] = []
    keys: dict[str, Secret | None] = {}
    for name, upstream in policy.upstreams.items():
        if upstream.api_key_env is None:
            keys[name] = None
            continue
        value = env.get(upstream.api_key_env)
        if not value:
            problems.append(
                (
                    f"upstreams.{name}.api_key_env",
                    f"environment variable {upstream.api_key_env} is not set",
                )
            )
        keys[name] = Secret(f"Bearer {value}")
    routes = []
    for index, route in enumerate(policy.routes):
        steps: list[PrepareStep] = []
        for step_index, step in enumerate(route.prepare):
            try:
                steps.append(build_step(step, env, client, policy.limits.max_body_bytes))
            except MissingSecret as exc:
                problems.append((f"routes[{index}].prepare[{step_index}].env", str(exc)))
        methods = frozenset(m.upper() for m in route.match.methods) if route.match.methods else None
        targets = tuple(
            CompiledTarget(
                t.upstream,
                t.model,
                t.weight,
                policy.upstreams[t.upstream],
                keys[t.upstream],
                target_label(t.upstream, t.model),
            )
            for t in route.target_list
        )
        routes.append(
            CompiledRoute(
                index=index,
                config=route,
                pattern=re.compile(fnmatch.translate(route.match.path)),
                methods=methods,
                steps=tuple(steps),
                upstream_name=targets[0].upstream_name,
                upstream=targets[0].upstream,
                upstream_key=targets[0].upstream_key,
                targets=targets,
                strategy=route.strategy,
                retry=RetryRules.compile(
                    route.retry,
                    len(targets),
                    policy.stages.upstream.queue_timeout,
                    given="retry" in route.model_fields_set,
                ),
            )
        )
    problems.extend(cache_problems(policy, env))
    problems.extend(cluster_problems(policy, env))
    if problems:
        raise PolicyError.of(loaded.source, problems)
    return Snapshot(loaded=loaded, routes=tuple(routes))
