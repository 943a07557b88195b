"""The policy: a typed, frozen model of the YAML file, and its loader.

Raw dicts never travel past `load_policy`; everything downstream reads the
frozen `Policy`. A load error names the file, the path inside it and the
reason, so `llm-sidecar check` and a rejected SIGHUP say the same thing.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from proxy.headers import CREDENTIAL_HEADERS
from proxy.policy_messages import Loc, PathError, problems_of
from proxy.units import DURATION_FORMS, parse_duration, parse_size


def _positive_duration(value: object) -> float:
    """A duration where 0 would fail every request (a timeout) or spin (an interval)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value <= 0:
        raise ValueError(f"must be above 0; use {DURATION_FORMS}")
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"must be above 0; use {DURATION_FORMS}")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[float, BeforeValidator(_positive_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]

Problems = list[tuple[tuple[str | int, ...], str]]  # (where in the file, why)

DEFAULT_POLICY_PATH = Path(__file__).with_name("default_policy.yaml")
# The caller's own request is at fault: another attempt would get the same answer.
NEVER_RETRIED = frozenset({400, 401, 403, 404})


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Listen(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class Limits(_Model):
    max_body_bytes: Size = 10 * 1024 * 1024
    # Request bodies held by all requests at once (parsed, they cost many
    # times their size); None: 4 x max_body_bytes. Past it: 503.
    max_body_bytes_in_flight: Size | None = None
    # A caller's request head must be complete this long after its first byte.
    header_timeout: Duration = Field(10.0, gt=0)
    # The whole request body must arrive this long after its head (408 otherwise).
    body_timeout: Duration = Field(60.0, gt=0)
    # An idle keep-alive connection is closed after this.
    idle_timeout: Duration = Field(75.0, gt=0)


class Admin(_Model):
    """A separate listener for /status, /metrics, /healthz and /readyz."""

    host: str = "127.0.0.1"
    port: int = Field(9090, ge=0, le=65535)


class Upstream(_Model):
    base_url: str
    api_key_env: str | None = None
    connect_timeout: PositiveDuration = 5.0
    first_byte_timeout: PositiveDuration = 120.0
    idle_timeout: PositiveDuration = 60.0
    max_connections: int = Field(256, ge=1)
    # Bounds on one response, whatever the upstream sends: past any of them
    # the call ends with an error, its connection closed, nothing cached.
    max_response_bytes: Size = Field(256 * 1024 * 1024, ge=1)
    max_event_bytes: Size = Field(16 * 1024 * 1024, ge=1)
    max_duration: PositiveDuration = 1800.0
    # Outlier ejection, per upstream like Envoy's per cluster: every route
    # naming one of its targets shares that target's health and thresholds.
    eject_after: int = Field(5, ge=1)  # failures in a row before a cool-down
    eject_for: PositiveDuration = 30.0  # the first cool-down; doubles while it keeps failing
    max_eject_for: PositiveDuration = 300.0  # the doubling's cap; never below eject_for

    @field_validator("base_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return value


class StageLimit(_Model):
    max_concurrency: int = Field(ge=1)
    max_queue: int = Field(ge=0)
    queue_timeout: Duration


class CacheStage(_Model):
    workers: int = Field(32, ge=1)
    max_queue: int = Field(1024, ge=0)


def _limit(concurrency: int, queue: int, timeout: float) -> StageLimit:
    return StageLimit(max_concurrency=concurrency, max_queue=queue, queue_timeout=timeout)


class Stages(_Model):
    leader: StageLimit = _limit(64, 1024, 30.0)
    follower: StageLimit = _limit(256, 4096, 10.0)
    upstream: StageLimit = _limit(64, 1024, 60.0)
    cache: CacheStage = CacheStage()


class Breaker(_Model):
    failures: int = Field(3, ge=1)
    reset_after: Duration = 5.0


class LocalTier(_Model):
    """An in-process copy of recent answers in front of Redis."""

    max_bytes: Size = 64 * 1024 * 1024
    # A refresh or FLUSHDB made through another sidecar is seen here when the
    # copy expires: this bounds how long that can take, whatever the entry's TTL.
    max_ttl: PositiveDuration = 60.0


RedisMode = Literal["single", "cluster"]


class Cache(_Model):
    backend: Literal["memory", "redis"] = "memory"
    url: str = "redis://127.0.0.1:6379/0"
    # "cluster": `url` names any one node of a Redis Cluster (redis-py's cluster client).
    mode: RedisMode = "single"
    password_env: str | None = None
    max_bytes: Size = 256 * 1024 * 1024
    # Larger answers are served but not stored (and counted), in every backend.
    max_entry_bytes: Size = 16 * 1024 * 1024
    timeout: PositiveDuration = 0.2
    key_prefix: str = "llm-sidecar:"
    breaker: Breaker = Breaker()
    local_tier: LocalTier | None = LocalTier()  # redis only; null turns it off

    @field_validator("key_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        # Names carry the request key as a Redis Cluster hash tag; a brace in
        # the prefix would become the tag, putting every key in one slot.
        if "{" in value or "}" in value:
            raise ValueError("key_prefix cannot contain { or }")
        return value


class StreamSettings(_Model):
    max_log_bytes: Size = 16 * 1024 * 1024
    keepalive_interval: PositiveDuration = 5.0
    write_high_water: Size = 256 * 1024
    # A caller whose socket does not drain within this, once its buffer
    # passed `write_high_water`, is dropped (alone).
    write_timeout: PositiveDuration = 10.0


class Reload(_Model):
    watch: bool = False
    interval: PositiveDuration = 2.0


class Shutdown(_Model):
    accept_delay: Duration = 1.0
    drain_timeout: Duration = 30.0


class Log(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    access: bool = True


class Match(_Model):
    path: str
    methods: tuple[str, ...] | None = None

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not value.startswith(("/", "*")):
            raise ValueError("path must start with / (globs: * matches any characters)")
        return value


_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _header_name(value: str) -> str:
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"{value!r} is not a header name")
    return value.lower()


# Checked per item, so every bad name in a list is reported at its own path.
HeaderName = Annotated[str, AfterValidator(_header_name)]


class RouteCache(_Model):
    ttl: Duration = 3600.0
    only_deterministic: bool = False


class SetHeaders(_Model):
    step: Literal["set_headers"]
    headers: dict[str, str] = {}
    remove: tuple[str, ...] = ()


class InjectKey(_Model):
    step: Literal["inject_key"]
    env: str
    header: str = "Authorization"
    scheme: str = "Bearer"


class ModelAlias(_Model):
    step: Literal["model_alias"]
    aliases: dict[str, str]


class ClampMaxTokens(_Model):
    step: Literal["clamp_max_tokens"]
    max: int = Field(ge=1)


class SystemMessage(_Model):
    step: Literal["system_message"]
    content: str


class HttpHook(_Model):
    step: Literal["http_hook"]
    url: str
    timeout: PositiveDuration = 2.0


PrepareStepConfig = Annotated[
    SetHeaders | InjectKey | ModelAlias | ClampMaxTokens | SystemMessage | HttpHook,
    Field(discriminator="step"),
]


class Target(_Model):
    upstream: str
    model: str | None = None  # sent as the body's `model` to this target only
    weight: float = 1.0

    @field_validator("weight")
    @classmethod
    def _check_weight(cls, value: float) -> float:
        if not value > 0:  # also refuses NaN
            raise ValueError("weight must be above 0")
        return value


def _retryable(status: int) -> int:
    if status in NEVER_RETRIED:
        raise ValueError(f"{status} is never retried: the request itself is at fault")
    if not 400 <= status <= 599:
        raise ValueError(f"{status} is not an error status (400-599)")
    return status


# Checked per entry, so every bad entry of a list is reported, each at its index.
RetryStatus = Annotated[int, AfterValidator(_retryable)]


class Retry(_Model):
    # None: one per target, and at least 2 when the route has a retry block.
    attempts: int | None = Field(None, ge=1, le=10)
    on_status: tuple[RetryStatus, ...] = (429, 500, 502, 503, 504)
    backoff: Duration = 0.5
    max_retry_wait: Duration | None = None  # None: 5s, or the upstream queue timeout if lower
    budget_percent: float = Field(20.0, gt=0, le=100)
    min_retry_concurrency: int = Field(3, ge=0)


class Route(_Model):
    match: Match
    upstream: str | None = None  # shorthand for `targets: [{upstream: NAME}]`
    targets: tuple[Target, ...] | None = None
    strategy: Literal["fallback", "balance"] = "fallback"
    retry: Retry = Retry()
    coalesce: bool = True
    share_across_tenants: bool = False
    tenant_header: str | None = None
    ignore_fields: tuple[str, ...] = ("stream", "stream_options", "user")
    # Request headers whose values are part of the key (e.g. OpenAI-Organization).
    vary_headers: tuple[HeaderName, ...] = ()
    # Headers that carry a credential besides the built-in list; all make the tenant.
    credential_headers: tuple[HeaderName, ...] = ()
    on_abandon: Literal["finish", "cancel"] = "finish"
    prepare: tuple[PrepareStepConfig, ...] = ()
    cache: RouteCache | None = None
    # False: an answer from any target but the first is served, not cached.
    cache_fallback: bool = True

    @property
    def target_list(self) -> tuple[Target, ...]:
        """The targets in the order written; `upstream: NAME` is a list of one."""
        if self.targets is not None:
            return self.targets
        return () if self.upstream is None else (Target(upstream=self.upstream),)


class ClusterSettings(_Model):
    """Cross-replica coalescing: one upstream call per key across every sidecar.

    `url: null` means the cache's Redis: its url, password_env and mode all
    apply, so `password_env` and `mode` here belong to an own `url` only.
    """

    coalesce_across_replicas: bool = False
    url: str | None = None
    password_env: str | None = None
    mode: RedisMode = "single"
    lease: PositiveDuration = 5.0
    stream_ttl: PositiveDuration = 30.0
    max_stream_bytes: Annotated[Size, Field(gt=0)] = StreamSettings().max_log_bytes
    timeout: PositiveDuration = 0.2

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("url must start with redis://, rediss:// or unix://")
        return value


def _cluster_problems(cluster: ClusterSettings, cache: Cache) -> list[tuple[Loc, str]]:
    problems: list[tuple[Loc, str]] = []
    if cluster.url is None:
        # Silently ignoring these would leave a user believing they apply.
        for field in ("password_env", "mode"):
            if field in cluster.model_fields_set:
                problems.append(
                    (
                        ("cluster", field),
                        f"applies to cluster.url only; without it the cache's Redis "
                        f"is used (set cache.{field} instead)",
                    )
                )
        if cluster.coalesce_across_replicas and cache.backend != "redis":
            problems.append(
                (
                    ("cluster", "coalesce_across_replicas"),
                    "needs a Redis: set cluster.url, or cache.backend: redis to share the cache's",
                )
            )
    if cluster.timeout >= cluster.lease:
        # The owner renews every lease/3; a call slower than the lease cannot keep it.
        problems.append((("cluster", "timeout"), "must be shorter than cluster.lease"))
    return problems


class Policy(_Model):
    version: str | None = None
    listen: Listen = Listen()
    admin: Admin | None = None
    limits: Limits = Limits()
    log: Log = Log()
    upstreams: dict[str, Upstream] = Field(min_length=1)
    stages: Stages = Stages()
    stream: StreamSettings = StreamSettings()
    cache: Cache = Cache()
    cluster: ClusterSettings = ClusterSettings()
    reload: Reload = Reload()
    shutdown: Shutdown = Shutdown()
    routes: tuple[Route, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _cross_check(self) -> Policy:
        problems = self._admin_problems()
        for index, route in enumerate(self.routes):
            if route.upstream is not None and route.upstream not in self.upstreams:
                known = ", ".join(sorted(self.upstreams))
                problems.append(
                    (
                        ("routes", index, "upstream"),
                        f"unknown upstream {route.upstream!r} (defined: {known})",
                    )
                )
            problems.extend(self._target_problems(index, route))
        last = self.routes[-1].match
        if last.path not in ("*", "/*", "/v1/*") or last.methods is not None:
            problems.append(
                (
                    ("routes", len(self.routes) - 1, "match"),
                    'the last route must be a catch-all: match: {path: "/v1/*"} with no methods',
                )
            )
        problems.extend(_cluster_problems(self.cluster, self.cache))
        if problems:
            raise PathError(problems)
        return self

    def _admin_problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        admin, listen = self.admin, self.listen
        if admin is None or admin.port == 0 or admin.port != listen.port:
            return []
        # One port on the same address (or a wildcard, which takes every
        # address): `serve` would fail to bind, so `check` fails here.
        if admin.host == listen.host or {admin.host, listen.host} & _WILDCARD_HOSTS:
            reason = f"port {admin.port} is the API's own (listen.port): pick another"
            return [(("admin", "port"), reason)]
        return []

    def _target_problems(self, index: int, route: Route) -> list[tuple[tuple[str | int, ...], str]]:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if (route.upstream is None) == (route.targets is None):
            problems.append(
                (("routes", index), "name the route's upstream, or its targets list, exactly once")
            )
        if route.targets is not None and not route.targets:
            problems.append(
                (("routes", index, "targets"), "the target list is empty: name at least one")
            )
        for number, target in enumerate(route.targets or ()):
            if target.upstream not in self.upstreams:
                known = ", ".join(sorted(self.upstreams))
                problems.append(
                    (
                        ("routes", index, "targets", number, "upstream"),
                        f"unknown upstream {target.upstream!r} (defined: {known})",
                    )
                )
        problems.extend(_relay_problems(index, route))
        problems.extend(_credential_problems(index, route))
        queue_timeout = self.stages.upstream.queue_timeout
        wait = route.retry.max_retry_wait
        if wait is not None and wait > queue_timeout:
            # A retry waits holding its upstream slot; queued calls would time out first.
            problems.append(
                (
                    ("routes", index, "retry", "max_retry_wait"),
                    f"{wait:g}s is above stages.upstream.queue_timeout ({queue_timeout:g}s)",
                )
            )
        return problems


def _relay_problems(index: int, route: Route) -> Problems:
    """A relayed route makes one call to one upstream: retry settings would be ignored."""
    if route.coalesce:
        return []
    reason = "a relayed route (coalesce: false) goes to one upstream, once"
    problems: Problems = []
    if len(route.target_list) > 1:
        problems.append((("routes", index, "targets"), f"{reason}: name one target"))
    for key in ("strategy", "retry"):
        if key in route.model_fields_set:
            problems.append((("routes", index, key), f"{reason}: `{key}` does not apply"))
    return problems


def _credential_problems(index: int, route: Route) -> Problems:
    """A route-level credential would reach every upstream the route falls back to."""
    upstreams = sorted({target.upstream for target in route.target_list})
    if len(upstreams) < 2:
        return []
    reason = (
        f"would send one credential to every upstream of this route ({', '.join(upstreams)}); "
        "give each upstream its own key with upstreams.NAME.api_key_env instead"
    )
    problems: Problems = []
    for number, step in enumerate(route.prepare):
        if isinstance(step, InjectKey):
            problems.append((("routes", index, "prepare", number), f"inject_key {reason}"))
        elif isinstance(step, SetHeaders):
            for name in step.headers:
                if name.lower() in CREDENTIAL_HEADERS:
                    where = ("routes", index, "prepare", number, "headers", name)
                    problems.append((where, f"a {name} header {reason}"))
    return problems


class PolicyError(Exception):
    """A policy that cannot be used: which file, and every problem in it (where, why).

    `path` and `reason` are the first problem's; `problems` holds them all, so
    one run of `llm-sidecar check` (or one rejected reload) lists everything.
    """

    # A plain class, not a frozen dataclass: the runtime sets __traceback__
    # and __context__ on exceptions, which a frozen instance refuses.
    def __init__(self, file: str, path: str, reason: str) -> None:
        super().__init__(file, path, reason)
        self.file = file
        self.path = path
        self.reason = reason
        self.problems: tuple[tuple[str, str], ...] = ((path, reason),)

    @classmethod
    def of(cls, file: str, problems: list[tuple[str, str]]) -> PolicyError:
        error = cls(file, *problems[0])
        error.problems = tuple(problems)
        return error

    def lines(self) -> list[str]:
        """One `file: path: reason` line per problem."""
        return [f"{self.file}: {path}: {reason}" for path, reason in self.problems]

    def __str__(self) -> str:
        return "\n".join(self.lines())


@dataclass(frozen=True, slots=True)
class LoadedPolicy:
    """A validated policy plus where it came from and a version to show."""

    policy: Policy
    source: str
    version: str


def parse_policy(text: str, source: str) -> LoadedPolicy:
    """Validate YAML text; raise PolicyError naming `source` on any problem."""
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(yaml)"
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(source, where, f"invalid YAML: {problem}") from exc
    if not isinstance(data, dict):
        raise PolicyError(source, "(top level)", "the policy must be a YAML mapping")
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        found = problems_of(exc, Policy)
        raise PolicyError.of(source, [(p.path, p.reason) for p in found]) from exc
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return LoadedPolicy(policy=policy, source=source, version=policy.version or digest)


def load_policy(path: str | Path | None = None) -> LoadedPolicy:
    """Read and validate a policy file (the embedded default when None)."""
    file = Path(path) if path is not None else DEFAULT_POLICY_PATH
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(str(file), "(file)", exc.strerror or str(exc)) from exc
    return parse_policy(text, str(file))
