"""Prometheus metrics: one registry per app, nothing but plain ints on the hot path.

What moves per request (request counts, durations, bytes, upstream calls
and attempts, retries, ejections, stage waits, dropped readers) is kept as plain ints and
floats on the app's `Metrics`: counters in dicts, histograms as one int per
bucket (found by bisection) and a float sum. Everything runs on the event
loop thread, so no lock is taken (prometheus-client's own metrics take one
per increment); a collector turns them into the usual families at scrape
time, under the same names and labels, `_created` timestamps included.
Levels rather than events (stage in-use and queued, streams in flight, the
cache's counters) are read from the runtime at scrape time too, by
`proxy.gauges`.

A stage slot taken without waiting is not observed at all: the limiter
counts it, and the scrape folds that count into the stage-wait histogram's
lowest bucket, so `_count` still counts every slot taken and a free one
still weighs 0 s.

Labels carry stage names, route indexes, statuses and how a request was
served: never a credential, a prompt, a key or a path a caller chose.
"""

from __future__ import annotations

import dataclasses
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from proxy.cache.base import Cache
from proxy.headers import Served

if TYPE_CHECKING:
    from proxy.limiter import StageLimiter

SERVED = (*(served.value for served in Served), "none")
STAGES = ("leader", "follower", "upstream")
# Upstream status label for a call that got no response at all.
NO_RESPONSE = "error"

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_WAIT = (0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60)
# CacheStats fields that are levels, not running totals.
_CACHE_GAUGES = frozenset({"in_lane", "writes_pending", "local_bytes"})
_CACHE_STATES = {"breaker_state": ("closed", "open", "half_open")}
# How prometheus-client writes an `le` label ("0.005", "1.0"); typed here, as it is not.
_GO_FLOAT: Callable[[float], str] = floatToGoString


class _Histogram:
    """Per-bucket counts (the last one is +Inf) and a sum; cumulated at scrape time."""

    __slots__ = ("bounds", "counts", "created", "le", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.le = [*map(_GO_FLOAT, bounds), "+Inf"]
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, Prometheus's `le`.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class _Counter:
    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0
        self.created = time.time()


class _Served:
    """The per-request series of one `served` value."""

    __slots__ = ("bytes_in", "bytes_out", "duration", "statuses", "ttfb")

    def __init__(self) -> None:
        self.duration = _Histogram(_LATENCY)
        self.ttfb = _Histogram(_LATENCY)
        self.bytes_in = _Counter()
        self.bytes_out = _Counter()
        self.statuses: dict[int, _Counter] = {}


class Metrics:
    """Owns one `CollectorRegistry`; the methods here are the hot-path entry points.

    Every field is touched on the event loop thread only (the scrape too:
    `/metrics` renders inline).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._served = {name: _Served() for name in SERVED}
        self._upstream: dict[tuple[int, int | None], _Counter] = {}
        self._attempts: dict[tuple[str, int | str], _Counter] = {}
        self._retries = _Counter()
        self._retries_refused: dict[str, _Counter] = {}
        self._ejections: dict[str, _Counter] = {}
        self._waits = {name: _Histogram(_WAIT) for name in STAGES}
        self._reloads = {"ok": _Counter(), "failed": _Counter()}
        # Callers the proxy cut, by reason; write_timeout shows from the start, at 0.
        self._readers_dropped = {"write_timeout": _Counter()}
        # The live limiters (resized in place on reload, never replaced): their
        # free-slot counts join the stage-wait histogram at scrape time.
        self._limiters: tuple[StageLimiter, ...] = ()
        self.registry.register(_MetricsCollector(self))

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
            children = self._served["none"]
        counter = children.statuses.get(status)
        if counter is None:
            counter = children.statuses[status] = _Counter()
        counter.value += 1
        children.duration.observe(duration)
        if ttfb is not None:
            children.ttfb.observe(ttfb)
        children.bytes_in.value += bytes_in
        children.bytes_out.value += bytes_out

    def upstream_call(self, route: int, status: int | None) -> None:
        counter = self._upstream.get((route, status))
        if counter is None:
            counter = self._upstream[(route, status)] = _Counter()
        counter.value += 1

    def attempt(self, target: str, outcome: int | str) -> None:
        """One attempt at `target`: its status, or CONNECT_ERROR / TIMEOUT."""
        counter = self._attempts.get((target, outcome))
        if counter is None:
            counter = self._attempts[(target, outcome)] = _Counter()
        counter.value += 1

    def retried(self) -> None:
        """An attempt made after a first one failed (a retry or a fallback)."""
        self._retries.value += 1

    def retry_refused(self, reason: str) -> None:
        """A retryable failure answered as it was (attempts, budget, retry_after, draining)."""
        _bump(self._retries_refused, reason)

    def ejected(self, target: str) -> None:
        """`target` was ejected for a cool-down."""
        _bump(self._ejections, target)

    def stage_waited(self, stage: str, seconds: float) -> None:
        """A slot that was waited for (free ones are counted by the limiter)."""
        child = self._waits.get(stage)
        if child is not None:
            child.observe(seconds)

    def reader_dropped(self, reason: str) -> None:
        """A caller cut by the proxy (`write_timeout`: it stopped reading)."""
        _bump(self._readers_dropped, reason)

    def reloaded(self, ok: bool) -> None:
        self._reloads["ok" if ok else "failed"].value += 1

    # -- scrape time ----------------------------------------------------

    def time_stages(self, limiters: Iterable[StageLimiter]) -> None:
        """Time the waits of `limiters`, and count their free slots at scrape time."""
        self._limiters = tuple(limiters)
        for limiter in self._limiters:
            limiter.on_wait = self.stage_waited

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4


def _bump(counters: dict[str, _Counter], label: str) -> None:
    counter = counters.get(label)
    if counter is None:
        counter = counters[label] = _Counter()
    counter.value += 1


def _counters(family: CounterMetricFamily, counters: Iterable[tuple[str, _Counter]]) -> None:
    for label, counter in counters:
        family.add_metric([label], counter.value, created=counter.created)


def _histogram(
    family: HistogramMetricFamily, labels: dict[str, str], hist: _Histogram, free: int = 0
) -> None:
    """Adds one labelled histogram; `free` observations of 0 s join the lowest bucket."""
    cumulative = []
    total = 0
    for index, count in enumerate(hist.counts):
        total += count + (free if index == 0 else 0)
        cumulative.append((hist.le[index], float(total)))
    family.add_metric(list(labels.values()), cumulative, hist.sum)
    family.samples.append(Sample(family.name + "_created", labels, hist.created))


class _MetricsCollector(Collector):
    """The per-request series, from the plain numbers `Metrics` keeps."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        requests = CounterMetricFamily(
            "llm_sidecar_requests",
            "Requests answered on /v1, by how they were served and their status.",
            labels=["served", "status"],
        )
        duration = HistogramMetricFamily(
            "llm_sidecar_request_duration_seconds",
            "From the request's arrival to its last byte handed to the connection.",
            labels=["served"],
        )
        ttfb = HistogramMetricFamily(
            "llm_sidecar_time_to_first_byte_seconds",
            "From the request's arrival to the first body byte sent"
            " (for a stream: its first event).",
            labels=["served"],
        )
        bytes_in = CounterMetricFamily(
            "llm_sidecar_request_bytes", "Request body bytes received.", labels=["served"]
        )
        bytes_out = CounterMetricFamily(
            "llm_sidecar_response_bytes",
            "Response body bytes sent (stream events as framed by the upstream).",
            labels=["served"],
        )
        for served, children in m._served.items():
            for status, counter in list(children.statuses.items()):
                requests.add_metric([served, str(status)], counter.value, created=counter.created)
            _histogram(duration, {"served": served}, children.duration)
            _histogram(ttfb, {"served": served}, children.ttfb)
            for family, counter in ((bytes_in, children.bytes_in), (bytes_out, children.bytes_out)):
                family.add_metric([served], counter.value, created=counter.created)
        yield from (requests, duration, ttfb, bytes_in, bytes_out)
        upstream = CounterMetricFamily(
            "llm_sidecar_upstream_requests",
            "Upstream calls by policy route index and upstream status"
            f" ({NO_RESPONSE!r}: no response).",
            labels=["route", "status"],
        )
        for (route, code), counter in list(m._upstream.items()):
            label = NO_RESPONSE if code is None else str(code)
            upstream.add_metric([str(route), label], counter.value, created=counter.created)
        yield upstream
        yield from _retry_families(m)
        waits = HistogramMetricFamily(
            "llm_sidecar_stage_wait_seconds",
            "Time from asking for a stage slot to getting it (0 when free).",
            labels=["stage"],
        )
        free = {limiter.name: limiter.free_acquired for limiter in m._limiters}
        for stage, hist in m._waits.items():
            _histogram(waits, {"stage": stage}, hist, free.get(stage, 0))
        yield waits
        reloads = CounterMetricFamily(
            "llm_sidecar_reloads", "Policy reloads by result (ok, failed).", labels=["result"]
        )
        _counters(reloads, m._reloads.items())
        yield reloads
        dropped = CounterMetricFamily(
            "llm_sidecar_readers_dropped",
            "Callers the proxy cut, by reason (write_timeout: stopped reading).",
            labels=["reason"],
        )
        _counters(dropped, list(m._readers_dropped.items()))
        yield dropped


def _retry_families(m: Metrics) -> Iterator[Metric]:
    attempts = CounterMetricFamily(
        "llm_sidecar_upstream_attempts",
        "Upstream attempts by target and outcome (the status, or connect_error, timeout).",
        labels=["target", "outcome"],
    )
    for (target, outcome), counter in list(m._attempts.items()):
        attempts.add_metric([target, str(outcome)], counter.value, created=counter.created)
    yield attempts
    retries = CounterMetricFamily(
        "llm_sidecar_upstream_retries",
        "Attempts made after a first one failed (retries and fallbacks).",
    )
    retries.add_metric([], m._retries.value, created=m._retries.created)
    yield retries
    refused = CounterMetricFamily(
        "llm_sidecar_upstream_retries_refused",
        "Retryable failures answered as they were, by reason"
        " (attempts, budget, retry_after, draining).",
        labels=["reason"],
    )
    _counters(refused, list(m._retries_refused.items()))
    yield refused
    ejections = CounterMetricFamily(
        "llm_sidecar_upstream_ejections",
        "Times a target was ejected for a cool-down after failing in a row.",
        labels=["target"],
    )
    _counters(ejections, list(m._ejections.items()))
    yield ejections


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
        elif isinstance(value, float):
            yield GaugeMetricFamily(name, f"Cache {field.name} now.", value=value)
        elif isinstance(value, str):
            family = GaugeMetricFamily(name, f"Cache {field.name} (1: current).", labels=["state"])
            for state in _CACHE_STATES.get(field.name, (value,)):
                family.add_metric([state], 1 if state == value else 0)
            yield family
