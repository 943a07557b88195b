"""Cross-replica coalescing in `/status` and `/metrics`, read at request or scrape time.

Levels come from the in-flight table (streams by role, owned streams other
replicas mirror, readers following another replica's call); counters from
the link (claim outcomes, Redis faults by operation, fall-backs, fenced
owners, how mirrors ended). Nothing here touches Redis. With the feature
off, `/status` shows `null` and `/metrics` no `llm_sidecar_cluster_*` series.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from proxy.runtime import Runtime

ROLES = ("owner", "mirror", "local")
_STATES = ("closed", "open", "half_open")


def _levels(rt: Runtime) -> tuple[dict[str, int], int, int]:
    """Published streams by role, owned streams other replicas mirror, and
    the readers of mirrored streams."""
    streams = dict.fromkeys(ROLES, 0)
    followed = remote_readers = 0
    for stream in rt.table:
        streams[stream.role] += 1
        if stream.role == "mirror":
            remote_readers += stream.readers
        elif stream.role == "owner" and stream.mirrors:
            followed += 1
    return streams, followed, remote_readers


def status_of(rt: Runtime) -> dict[str, Any] | None:
    link = rt.cluster
    if link is None:
        return None
    streams, followed, remote_readers = _levels(rt)
    return {
        "owned": streams["owner"],
        "remote_followed": followed,
        "mirrored": streams["mirror"],
        "remote_followers": remote_readers,
        "lease_s": link.settings.lease,
        **dataclasses.asdict(link.stats()),
    }


def metrics_of(rt: Runtime) -> Iterator[Metric]:
    link = rt.cluster
    if link is None:
        return
    streams, followed, remote_readers = _levels(rt)
    by_role = GaugeMetricFamily(
        "llm_sidecar_cluster_streams",
        "Published streams by role: owner (this replica's call, shared through Redis),"
        " mirror (another replica's call), local (this replica's call, not shared).",
        labels=["role"],
    )
    for role in ROLES:
        by_role.add_metric([role], streams[role])
    yield by_role
    yield GaugeMetricFamily(
        "llm_sidecar_cluster_remote_followed",
        "Owned streams that other replicas mirror (as of each lease's last renewal).",
        value=followed,
    )
    yield GaugeMetricFamily(
        "llm_sidecar_cluster_remote_followers",
        "Callers reading a mirrored stream (another replica's upstream call) now.",
        value=remote_readers,
    )
    stats = link.stats()
    claims = CounterMetricFamily(
        "llm_sidecar_cluster_claims", "Claims of a key's lease, by outcome.", labels=["outcome"]
    )
    for outcome, count in stats.claims.items():
        claims.add_metric([outcome], count)
    yield claims
    faults = CounterMetricFamily(
        "llm_sidecar_cluster_redis_faults",
        "Cross-replica Redis calls that failed or timed out, by operation.",
        labels=["op"],
    )
    for op, count in stats.faults.items():
        faults.add_metric([op], count)
    yield faults
    ends = CounterMetricFamily(
        "llm_sidecar_cluster_mirror_ends", "How mirrored streams ended.", labels=["how"]
    )
    for how, count in stats.mirror_ends.items():
        ends.add_metric([how], count)
    yield ends
    yield CounterMetricFamily(
        "llm_sidecar_cluster_fallbacks",
        "Flights that ran on this replica alone after a Redis fault or with the breaker open.",
        value=stats.fallbacks,
    )
    yield CounterMetricFamily(
        "llm_sidecar_cluster_fenced",
        "Owners whose lease was no longer theirs: their appends were refused.",
        value=stats.fenced,
    )
    yield CounterMetricFamily(
        "llm_sidecar_cluster_overflows",
        "Shared logs cut at cluster.max_stream_bytes.",
        value=stats.overflows,
    )
    yield CounterMetricFamily(
        "llm_sidecar_cluster_breaker_opened",
        "Times the cross-replica breaker opened.",
        value=stats.breaker_opened,
    )
    state = GaugeMetricFamily(
        "llm_sidecar_cluster_breaker_state",
        "1 for the cross-replica breaker's current state.",
        labels=["state"],
    )
    for name in _STATES:
        state.add_metric([name], 1 if name == stats.breaker_state else 0)
    yield state
