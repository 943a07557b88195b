"""The scenarios, in the order a full run takes them; each returns one report section."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from bench.common import Context, Section
from bench.scenarios import cache, coalescing, fanout, overhead, replicas, stages, streaming

Scenario = Callable[[Context], Awaitable[Section]]

SCENARIOS: dict[str, Scenario] = {
    "overhead": overhead.run,
    "streaming": streaming.run,
    "cache": cache.run,
    "fanout": fanout.run,
    "coalescing": coalescing.run,
    "stages": stages.run,
    "replicas": replicas.run,
}
