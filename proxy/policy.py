"""The policy: a typed, frozen model of the YAML file, and its loader.

Raw dicts never travel past `load_policy`; everything downstream reads the
frozen `Policy`. A load error names the file, the path inside it and the
reason, so `llm-sidecar check` and a rejected SIGHUP say the same thing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from proxy.policy_messages import Loc, PathError, problems_of
from proxy.units import parse_duration, parse_size

Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]

DEFAULT_POLICY_PATH = Path(__file__).with_name("default_policy.yaml")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Listen(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class Limits(_Model):
    max_body_bytes: Size = 10 * 1024 * 1024


class Upstream(_Model):
    base_url: str
    api_key_env: str | None = None
    connect_timeout: Duration = 5.0
    first_byte_timeout: Duration = 120.0
    idle_timeout: Duration = 60.0
    max_connections: int = Field(256, ge=1)

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


RedisMode = Literal["single", "cluster"]


class Cache(_Model):
    backend: Literal["memory", "redis"] = "memory"
    url: str = "redis://127.0.0.1:6379/0"
    # "cluster": `url` names any one node of a Redis Cluster (redis-py's cluster client).
    mode: RedisMode = "single"
    password_env: str | None = None
    max_bytes: Size = 256 * 1024 * 1024
    timeout: Duration = 0.2
    key_prefix: str = "llm-sidecar:"
    breaker: Breaker = Breaker()

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
    keepalive_interval: Duration = 5.0
    write_high_water: Size = 256 * 1024


class Reload(_Model):
    watch: bool = False
    interval: Duration = 2.0


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
    timeout: Duration = 2.0


PrepareStepConfig = Annotated[
    SetHeaders | InjectKey | ModelAlias | ClampMaxTokens | SystemMessage | HttpHook,
    Field(discriminator="step"),
]


class Route(_Model):
    match: Match
    upstream: str
    coalesce: bool = True
    share_across_tenants: bool = False
    tenant_header: str | None = None
    ignore_fields: tuple[str, ...] = ("stream", "stream_options", "user")
    on_abandon: Literal["finish", "cancel"] = "finish"
    prepare: tuple[PrepareStepConfig, ...] = ()
    cache: RouteCache | None = None


PositiveDuration = Annotated[Duration, Field(gt=0)]


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
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for index, route in enumerate(self.routes):
            if route.upstream not in self.upstreams:
                known = ", ".join(sorted(self.upstreams))
                problems.append(
                    (
                        ("routes", index, "upstream"),
                        f"unknown upstream {route.upstream!r} (defined: {known})",
                    )
                )
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
