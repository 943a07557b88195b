"""The per-request series, kept as plain numbers and rendered at scrape time.

They must read exactly as prometheus-client's own Counter and Histogram
would: cumulative buckets, `_count`, `_sum`, `_total` and `_created`, the
same names and labels. A stage slot taken without waiting is counted, not
observed, and still shows as one wait of 0 s.
"""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from proxy.limiter import StageLimiter
from proxy.metrics import Metrics


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = metrics.exposition()[0].decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_histograms_and_counters_read_as_prometheus_client_writes_them() -> None:
    metrics = Metrics()
    metrics.request_done("lead", 200, 0.004, 0.001, 57, 2783)
    metrics.request_done("lead", 200, 0.3, None, 10, 0)
    metrics.request_done("lead", 499, 400.0, 0.2, 0, 0)
    metrics.upstream_call(0, 200)
    metrics.upstream_call(0, None)
    metrics.attempt("primary", 503)
    metrics.attempt("primary", "connect_error")
    metrics.attempt("primary", 503)
    metrics.retried()
    metrics.retry_refused("budget")
    metrics.ejected("primary")
    got = samples(metrics)

    def value(name: str, **labels: str) -> float:
        return got[(name, frozenset(labels.items()))]

    assert value("llm_sidecar_requests_total", served="lead", status="200") == 2
    assert value("llm_sidecar_requests_total", served="lead", status="499") == 1
    duration = "llm_sidecar_request_duration_seconds"
    assert value(f"{duration}_bucket", served="lead", le="0.005") == 1
    assert value(f"{duration}_bucket", served="lead", le="0.25") == 1
    assert value(f"{duration}_bucket", served="lead", le="0.5") == 2
    assert value(f"{duration}_bucket", served="lead", le="300.0") == 2
    assert value(f"{duration}_bucket", served="lead", le="+Inf") == 3
    assert value(f"{duration}_count", served="lead") == 3
    assert abs(value(f"{duration}_sum", served="lead") - 400.304) < 1e-9
    assert value("llm_sidecar_time_to_first_byte_seconds_count", served="lead") == 2
    assert value("llm_sidecar_request_bytes_total", served="lead") == 67
    assert value("llm_sidecar_response_bytes_total", served="lead") == 2783
    assert value("llm_sidecar_upstream_requests_total", route="0", status="error") == 1
    attempts = "llm_sidecar_upstream_attempts_total"
    assert value(attempts, target="primary", outcome="503") == 2
    assert value(attempts, target="primary", outcome="connect_error") == 1
    assert value("llm_sidecar_upstream_retries_total") == 1
    assert value("llm_sidecar_upstream_retries_refused_total", reason="budget") == 1
    assert value("llm_sidecar_upstream_ejections_total", target="primary") == 1
    # Every served value is there from the start, at zero, as bound children were,
    # and an unlabelled counter reads 0 before its first increment.
    assert value(f"{duration}_count", served="follow") == 0
    assert samples(Metrics())[("llm_sidecar_upstream_retries_total", frozenset())] == 0
    for name, labels in got:
        if name.endswith(("_total", "_count")):
            stem = name.removesuffix("_total").removesuffix("_count")
            assert (f"{stem}_created", labels) in got, name


async def test_a_free_stage_slot_counts_as_a_wait_of_zero() -> None:
    metrics = Metrics()
    limiter = StageLimiter("leader", 1, 4, 5.0)
    metrics.time_stages([limiter])
    await limiter.acquire("a")  # free
    waiter = asyncio.create_task(limiter.acquire("b"))
    await asyncio.sleep(0)
    assert limiter.stats().queued == 1
    limiter.release("a")
    async with asyncio.timeout(5):
        await waiter
    limiter.release("b")
    got = samples(metrics)
    stage = frozenset({("stage", "leader")})
    wait = "llm_sidecar_stage_wait_seconds"
    assert got[(f"{wait}_count", stage)] == 2
    assert got[(f"{wait}_bucket", stage | {("le", "0.0001")})] >= 1
    assert got[(f"{wait}_sum", stage)] >= 0
    assert limiter.free_acquired == 1
