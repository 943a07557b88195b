"""Levels read from the runtime at scrape time: the request path pays nothing.

Stage in-use and queued counts, streams in flight, pumps alive, draining,
the policy version, the cache's counters, ejected targets, retries in
flight and cross-replica coalescing's counters. `watch` registers them on the
runtime's own registry and times its stage waits. Kept apart from
`proxy.metrics` so that the runtime can own a `Metrics` without the metrics
module knowing the runtime.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.cluster.report import metrics_of
from proxy.metrics import cache_metrics
from proxy.runtime import Runtime


def watch(rt: Runtime) -> None:
    """Read `rt` at scrape time and time its stage waits."""
    rt.metrics.registry.register(RuntimeCollector(rt))
    rt.metrics.time_stages(rt.stages.all())


class RuntimeCollector(Collector):
    """Stage, stream, pump and cache levels, read from the runtime at scrape time."""

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
        yield from cache_metrics(rt.cache)
        yield from _target_metrics(rt)
        yield from metrics_of(rt)


def _target_metrics(rt: Runtime) -> Iterator[Metric]:
    ejected = GaugeMetricFamily(
        "llm_sidecar_upstream_ejected",
        "1 while the target is ejected for a cool-down, per target of the policy.",
        labels=["target"],
    )
    retries = rt.retries
    now = retries.clock()
    seen: set[str] = set()
    for route in rt.snapshot.routes:
        for target in route.targets:
            if target.label not in seen:
                seen.add(target.label)
                ejected.add_metric([target.label], int(retries.outliers.is_ejected(target.id, now)))
    yield ejected
    yield GaugeMetricFamily(
        "llm_sidecar_upstream_retries_in_flight",
        "Retries holding a share of the retry budget now.",
        value=retries.budget.in_flight,
    )
