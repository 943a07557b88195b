"""What every scenario shares: the run context, the result model, statistics, metrics."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.procs import Placement, Server
from bench.servers import Lab


@dataclass(frozen=True, slots=True)
class Context:
    quick: bool
    placement: Placement
    out_dir: Path  # bench/results: the committed report and plots
    raw_dir: Path  # bench/results/raw: git-ignored dumps and server logs
    nonce: str  # makes prompts of this run distinct from every earlier run's

    def lab(self) -> Lab:
        return Lab(self.placement, self.raw_dir / "logs")

    def pick(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full


@dataclass(frozen=True, slots=True)
class Target:
    scenario: str
    goal: str
    value: str
    met: bool | None  # None: not measured in this run


@dataclass
class Section:
    key: str
    title: str
    method: str  # what was measured, and how
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    headline: list[str] = field(default_factory=list)  # one-line summaries for the top
    raw: dict[str, Any] = field(default_factory=dict)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def median_noise(values: Sequence[float]) -> float:
    """Half-width of a ~95% interval around the median of `values`.

    1.96 times the median's standard error, estimated robustly: sigma from
    the median absolute deviation (1.4826 MAD), and the median's standard
    error as 1.2533 sigma / sqrt(n). Infinite for fewer than two values: one
    sample says nothing about its own noise.
    """
    if len(values) < 2:
        return math.inf
    centre = statistics.median(values)
    mad = statistics.median(abs(v - centre) for v in values)
    return 1.96 * 1.2533 * 1.4826 * mad / math.sqrt(len(values))


def added_cost(values: Sequence[float], base: Sequence[float]) -> tuple[float, float]:
    """Median of `values` minus median of `base`, and the noise of that difference."""
    noise = math.hypot(median_noise(values), median_noise(base))
    return median(values) - median(base), noise


def added_text(diff: float, noise: float, digits: int = 0, scale: float = 1.0) -> str:
    """A hop's added cost for the report: a difference no larger than its noise
    (a negative one always) is no measured cost, and says so."""
    if math.isnan(diff):
        return "n/a"
    if diff <= noise:
        return "within noise"
    return num(diff * scale, digits)


def ms(seconds: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.{digits}f}"


def num(value: float, digits: int = 0) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def ratio(value: float, base: float, digits: int = 2) -> str:
    if math.isnan(value) or math.isnan(base) or base == 0:
        return "n/a"
    return f"{value / base:.{digits}f}x"


async def metric_samples(lab: Lab, server: Server) -> dict[tuple[str, frozenset[Any]], float]:
    """Every sample of the proxy's /metrics, keyed by name and labels."""
    text = await lab.get_text(f"{server.url}/metrics")
    samples: dict[tuple[str, frozenset[Any]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def served_counts(samples: dict[tuple[str, frozenset[Any]], float]) -> dict[str, float]:
    """Requests by `served,status` (e.g. 'hit,200'), from llm_sidecar_requests_total."""
    out: dict[str, float] = {}
    for (name, labels), value in samples.items():
        if name == "llm_sidecar_requests_total":
            found = dict(labels)
            key = f"{found.get('served', '?')},{found.get('status', '?')}"
            out[key] = out.get(key, 0.0) + value
    return out


def diff_counts(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
    keys = set(after) | set(before)
    out = {k: int(after.get(k, 0.0) - before.get(k, 0.0)) for k in sorted(keys)}
    return {k: v for k, v in out.items() if v}


def describe_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v:,}" for k, v in counts.items()) or "none"
