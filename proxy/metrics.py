"""Prometheus metrics: one registry per app, cheap on the hot path.

Counters and histograms that move per request have their label children
bound ahead of time (or once per new label pair, then kept in a dict), so a
request pays a dict lookup and an increment, never string formatting.
Everything that is a level rather than an event (stage in-use and queued,
streams in flight, the cache's counters) is read at scrape time by a
collector, so the request path pays nothing for it.

Labels carry stage names, route indexes, statuses and how a request was
served: never a credential, a prompt, a key or a path a caller chose.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from proxy.cache.base import Cache
from proxy.headers import Served

SERVED = (*(served.value for served in Served), "none")
STAGES = ("leader", "follower", "upstream")
# Upstream status label for a call that got no response at all.
NO_RESPONSE = "error"

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_WAIT = (0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60)
# CacheStats fields that are levels, not running totals.
_CACHE_GAUGES = frozenset({"in_lane", "writes_pending"})
_CACHE_STATES = {"breaker_state": ("closed", "open", "half_open")}


class _ServedChildren:
    """The per-request series of one `served` value, bound once."""

    __slots__ = ("bytes_in", "bytes_out", "duration", "ttfb")

    def __init__(self, metrics: Metrics, served: str) -> None:
        self.duration = metrics.duration.labels(served)
        self.ttfb = metrics.ttfb.labels(served)
        self.bytes_in = metrics.bytes_in.labels(served)
        self.bytes_out = metrics.bytes_out.labels(served)


class Metrics:
    """Owns one `CollectorRegistry`; methods here are the hot-path entry points."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter(
            "llm_sidecar_requests",
            "Requests answered on /v1, by how they were served and their status.",
            ["served", "status"],
            registry=reg,
        )
        self.duration = Histogram(
            "llm_sidecar_request_duration_seconds",
            "From the request's arrival to its last byte handed to the connection.",
            ["served"],
            buckets=_LATENCY,
            registry=reg,
        )
        self.ttfb = Histogram(
            "llm_sidecar_time_to_first_byte_seconds",
            "From the request's arrival to the first body byte sent"
            " (for a stream: its first event).",
            ["served"],
            buckets=_LATENCY,
            registry=reg,
        )
        self.bytes_in = Counter(
            "llm_sidecar_request_bytes",
            "Request body bytes received.",
            ["served"],
            registry=reg,
        )
        self.bytes_out = Counter(
            "llm_sidecar_response_bytes",
            "Response body bytes sent (stream events as framed by the upstream).",
            ["served"],
            registry=reg,
        )
        self.upstream = Counter(
            "llm_sidecar_upstream_requests",
            "Upstream calls by policy route index and upstream status"
            f" ({NO_RESPONSE!r}: no response).",
            ["route", "status"],
            registry=reg,
        )
        self.attempts = Counter(
            "llm_sidecar_upstream_attempts",
            "Upstream attempts by target and outcome (the status, or connect_error, timeout).",
            ["target", "outcome"],
            registry=reg,
        )
        self.retries = Counter(
            "llm_sidecar_upstream_retries",
            "Attempts made after a first one failed (retries and fallbacks).",
            registry=reg,
        )
        self.retries_refused = Counter(
            "llm_sidecar_upstream_retries_refused",
            "Retryable failures answered as they were, by reason"
            " (attempts, budget, retry_after, draining).",
            ["reason"],
            registry=reg,
        )
        self.ejections = Counter(
            "llm_sidecar_upstream_ejections",
            "Times a target was ejected for a cool-down after failing in a row.",
            ["target"],
            registry=reg,
        )
        self.stage_wait = Histogram(
            "llm_sidecar_stage_wait_seconds",
            "Time from asking for a stage slot to getting it.",
            ["stage"],
            buckets=_WAIT,
            registry=reg,
        )
        self.reloads = Counter(
            "llm_sidecar_reloads",
            "Policy reloads by result (ok, failed).",
            ["result"],
            registry=reg,
        )
        self._served = {name: _ServedChildren(self, name) for name in SERVED}
        self._requests: dict[tuple[str, int], Any] = {}
        self._upstream: dict[tuple[int, int | None], Any] = {}
        self._attempts: dict[tuple[str, int | str], Any] = {}
        self._waits = {name: self.stage_wait.labels(name) for name in STAGES}
        self._reload_ok = self.reloads.labels("ok")
        self._reload_failed = self.reloads.labels("failed")

    # -- hot path -------------------------------------------------------

    def request_done(
        self,
        served: str,
        status: int,
        duration: float,
        ttfb: float | None,
        bytes_in: int,
        bytes_out: int,
    ) -> None:
        children = self._served.get(served)
        if children is None:
            served, children = "none", self._served["none"]
        counter = self._requests.get((served, status))
        if counter is None:
            counter = self._requests[(served, status)] = self.requests.labels(served, str(status))
        counter.inc()
        children.duration.observe(duration)
        if ttfb is not None:
            children.ttfb.observe(ttfb)
        if bytes_in:
            children.bytes_in.inc(bytes_in)
        if bytes_out:
            children.bytes_out.inc(bytes_out)

    def upstream_call(self, route: int, status: int | None) -> None:
        counter = self._upstream.get((route, status))
        if counter is None:
            label = NO_RESPONSE if status is None else str(status)
            counter = self._upstream[(route, status)] = self.upstream.labels(str(route), label)
        counter.inc()

    def attempt(self, target: str, outcome: int | str) -> None:
        """One attempt at `target`: its status, or CONNECT_ERROR / TIMEOUT."""
        counter = self._attempts.get((target, outcome))
        if counter is None:
            counter = self._attempts[(target, outcome)] = self.attempts.labels(target, str(outcome))
        counter.inc()

    def stage_waited(self, stage: str, seconds: float) -> None:
        child = self._waits.get(stage)
        if child is not None:
            child.observe(seconds)

    def reloaded(self, ok: bool) -> None:
        (self._reload_ok if ok else self._reload_failed).inc()

    # -- scrape time ----------------------------------------------------

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4


def cache_metrics(cache: Cache) -> Iterator[Metric]:
    """The cache's own counters, when it keeps any."""
    stats = cache.stats()
    if stats is None:
        return
    for field in dataclasses.fields(stats):
        value = getattr(stats, field.name)
        name = f"llm_sidecar_cache_{field.name}"
        if isinstance(value, bool):
            yield GaugeMetricFamily(name, f"Cache {field.name}.", value=int(value))
        elif isinstance(value, int):
            if field.name in _CACHE_GAUGES:
                yield GaugeMetricFamily(name, f"Cache {field.name} now.", value=value)
            else:
                yield CounterMetricFamily(name, f"Cache {field.name} so far.", value=value)
        elif isinstance(value, str):
            family = GaugeMetricFamily(name, f"Cache {field.name} (1: current).", labels=["state"])
            for state in _CACHE_STATES.get(field.name, (value,)):
                family.add_metric([state], 1 if state == value else 0)
            yield family
