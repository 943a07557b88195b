"""Microbenchmarks of the fixed per-request costs: `python -m bench.micro [--n 100000]`.

Each figure is CPU time per operation in this process (median of 5 runs),
on whatever `proxy` package is first on sys.path, so the same command
measures two trees (from outside the repo, where the current directory
does not come first: `cd /tmp && PYTHONPATH=/other/tree:/this/tree python
-m bench.micro`):

* access line: one `llm_sidecar.access` record through the JSON handler
  into /dev/null, split into what the request's own task pays (`on path`)
  and the total once every buffered line is written (`total`), with the
  number of write system calls per 1,000 lines (a buffering handler is
  measured as if every line of a run fell in one batch);
* metrics: `Metrics.request_done` (one counter, a duration and a TTFB
  observation, two byte counters) and `Metrics.upstream_call`;
* stage slot: acquiring and releasing a free stage slot, with the metrics
  the running proxy attaches to it, directly and as `async with slot()`
  (how the pump takes its two slots per request).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from proxy import logs
from proxy.limiter import StageLimiter
from proxy.logs import access_log
from proxy.metrics import Metrics
from proxy.policy import Log

FIELDS = {
    "request_id": "522d5238a1b2c3d40000000000000001",
    "method": "POST",
    "path": "/v1/chat/completions",
    "route": 0,
    "served": "lead",
    "status": 200,
    "upstream_status": 200,
    "duration_ms": 0.812,
    "ttfb_ms": 0.143,
    "bytes_in": 57,
    "bytes_out": 2783,
}


class CountingSink(io.TextIOBase):
    """A text stream that makes one write system call (to /dev/null) per write, and counts them."""

    def __init__(self) -> None:
        self.fd = os.open(os.devnull, os.O_WRONLY)
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        os.write(self.fd, text.encode())
        return len(text)

    def flush(self) -> None:
        pass


def per_op(run: Callable[[int], None], n: int, repeat: int = 5) -> float:
    """Median CPU microseconds per operation over `repeat` runs of `n`."""
    samples = []
    for _ in range(repeat):
        started = time.process_time()
        run(n)
        samples.append((time.process_time() - started) / n * 1e6)
    return statistics.median(samples)


async def access_lines(n: int) -> dict[str, float]:
    sink = CountingSink()
    logs.configure(Log(level="info", access=True), {}, stream=sink)  # type: ignore[arg-type]
    flush = getattr(logs, "flush", None)
    if hasattr(logs, "MAX_BUFFERED"):
        # A running proxy's timer writes every 10 ms, long before the bound;
        # here nothing runs between lines, so lift it to see the path alone.
        logs.MAX_BUFFERED = n + 1
    path: list[float] = []
    total: list[float] = []
    writes = []
    for _ in range(5):
        sink.writes = 0
        started = time.process_time()
        for _ in range(n):
            # As the observer does it: the check, the fields, the call.
            if access_log.isEnabledFor(logging.INFO):
                access_log.info("request", extra={"fields": dict(FIELDS)})
        path.append((time.process_time() - started) / n * 1e6)
        # Let the loop run the handler's flush callbacks, as it would between requests.
        await asyncio.sleep(0.05)
        if flush is not None:
            flush()
        total.append((time.process_time() - started) / n * 1e6)
        writes.append(sink.writes / n * 1000)
    logging.getLogger().handlers.clear()
    return {
        "on path": statistics.median(path),
        "total": statistics.median(total),
        "writes/1k": statistics.median(writes),
    }


def metrics_costs(n: int) -> dict[str, float]:
    metrics = Metrics()

    def done(count: int) -> None:
        request_done = metrics.request_done
        for _ in range(count):
            request_done("lead", 200, 0.0008, 0.0001, 57, 2783)

    def upstream(count: int) -> None:
        call = metrics.upstream_call
        for _ in range(count):
            call(0, 200)

    return {"request_done": per_op(done, n), "upstream_call": per_op(upstream, n)}


async def stage_slot(n: int) -> dict[str, float]:
    metrics = Metrics()
    limiter = StageLimiter("leader", 64, 1024, 30.0)
    if hasattr(limiter, "on_wait"):
        limiter.on_wait = metrics.stage_waited
    direct, block = [], []
    for _ in range(5):
        started = time.process_time()
        for _ in range(n):
            await limiter.acquire("r")
            limiter.release("r")
        direct.append((time.process_time() - started) / n * 1e6)
        started = time.process_time()
        for _ in range(n):
            async with limiter.slot("r"):
                pass
        block.append((time.process_time() - started) / n * 1e6)
    return {
        "acquire+release": statistics.median(direct),
        "async with slot()": statistics.median(block),
    }


async def _main(n: int) -> None:
    results: dict[str, Any] = {"access line": await access_lines(n)}
    results["metrics"] = metrics_costs(n)
    results["stage slot (free)"] = await stage_slot(n)
    for name, value in results.items():
        if isinstance(value, dict):
            text = ", ".join(f"{k} {v:.2f}" for k, v in value.items())
            print(f"{name}: {text}  (µs per op; writes per 1,000 lines)")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__)
    parser.add_argument("--n", type=int, default=100_000)
    args = parser.parse_args()
    asyncio.run(_main(args.n))


if __name__ == "__main__":
    main()
