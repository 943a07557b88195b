"""Prometheus metrics: one registry per app, nothing but plain ints on the hot path.

What moves per request (request counts, durations, bytes, upstream calls,
stage waits) is kept as plain ints and floats on the app's `Metrics`:
counters in dicts, histograms as one int per bucket (found by bisection)
and a float sum. Everything runs on the event loop thread, so no lock is
taken (prometheus-client's own metrics take one per increment); a collector
turns them into the usual families at scrape time, under the same names and
labels, `_created` timestamps included. Levels rather than events (stage
in-use and queued, streams in flight, the cache's counters) are read from
the runtime at scrape time too.

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
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from proxy.runtime import Runtime

SERVED = ("lead", "follow", "hit", "bypass", "none")
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
        self._waits = {name: _Histogram(_WAIT) for name in STAGES}
        self._reloads = {"ok": _Counter(), "failed": _Counter()}
        self._runtime: Runtime | None = None
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

    def stage_waited(self, stage: str, seconds: float) -> None:
        """A slot that was waited for (free ones are counted by the limiter)."""
        child = self._waits.get(stage)
        if child is not None:
            child.observe(seconds)

    def reloaded(self, ok: bool) -> None:
        self._reloads["ok" if ok else "failed"].value += 1

    # -- scrape time ----------------------------------------------------

    def watch(self, rt: Runtime) -> None:
        """Read `rt` at scrape time and time its stage waits."""
        self._runtime = rt
        self.registry.register(_RuntimeCollector(rt))
        for limiter in rt.stages.all():
            limiter.on_wait = self.stage_waited

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4


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
        waits = HistogramMetricFamily(
            "llm_sidecar_stage_wait_seconds",
            "Time from asking for a stage slot to getting it (0 when free).",
            labels=["stage"],
        )
        free = {}
        if m._runtime is not None:
            free = {limiter.name: limiter.free_acquired for limiter in m._runtime.stages.all()}
        for stage, hist in m._waits.items():
            _histogram(waits, {"stage": stage}, hist, free.get(stage, 0))
        yield waits
        reloads = CounterMetricFamily(
            "llm_sidecar_reloads", "Policy reloads by result (ok, failed).", labels=["result"]
        )
        for result, counter in m._reloads.items():
            reloads.add_metric([result], counter.value, created=counter.created)
        yield reloads


class _RuntimeCollector(Collector):
    def __init__(self, rt: Runtime) -> None:
        self._rt = rt

    def collect(self) -> Iterator[Metric]:
        rt = self._rt
        in_use = GaugeMetricFamily(
            "llm_sidecar_stage_in_use", "Slots held now, per stage.", labels=["stage"]
        )
        queued = GaugeMetricFamily(
            "llm_sidecar_stage_queued", "Requests waiting for a slot, per stage.", labels=["stage"]
        )
        limit = GaugeMetricFamily(
            "llm_sidecar_stage_max_concurrency", "The stage's current limit.", labels=["stage"]
        )
        bound = GaugeMetricFamily(
            "llm_sidecar_stage_max_queue", "The stage's current queue bound.", labels=["stage"]
        )
        for limiter in rt.stages.all():
            stats = limiter.stats()
            in_use.add_metric([stats.name], stats.in_use)
            queued.add_metric([stats.name], stats.queued)
            limit.add_metric([stats.name], stats.max_concurrency)
            bound.add_metric([stats.name], stats.max_queue)
        yield from (in_use, queued, limit, bound)
        yield GaugeMetricFamily(
            "llm_sidecar_streams_in_flight", "Published streams (one per key).", value=len(rt.table)
        )
        yield GaugeMetricFamily(
            "llm_sidecar_pumps", "Upstream pump tasks alive.", value=len(rt.pumps)
        )
        yield GaugeMetricFamily(
            "llm_sidecar_draining", "1 while shutting down.", value=1 if rt.draining else 0
        )
        yield InfoMetricFamily(
            "llm_sidecar_policy", "The policy being served.", value={"version": rt.snapshot.version}
        )
        yield from _cache_metrics(rt.cache)


def _cache_metrics(cache: object) -> Iterator[Metric]:
    """The cache's own counters, when it has any (a `stats()` dataclass)."""
    stats_of = getattr(cache, "stats", None)
    if not callable(stats_of):
        return
    stats = stats_of()
    if not dataclasses.is_dataclass(stats):
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
