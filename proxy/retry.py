"""Retry rules: what an attempt's outcome means, whether and when to try again.

Pure, no I/O. Modelled on Envoy's retry policy and retry budget and on
nginx's `proxy_next_upstream`, fitted to LLM calls:

* only what happened before the response head counts (the caller of this
  module never asks once a byte reached a reader);
* retried: no answer (connect error), a timeout before the head, and the
  route's status list (429, 500, 502, 503, 504 by default); never 400,
  401, 403 or 404, whatever the list says;
* an upstream's `retry-after-ms` or `Retry-After` is honoured on the same
  target when it is within `max_retry_wait`, else the call moves to another
  target at once; without one, another target is tried at once and the same
  target again only after an exponential backoff with full jitter;
* a retry budget bounds retries in flight to a share of the upstream calls
  in flight, so an outage never multiplies the load.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Literal

from proxy.outliers import Outliers
from proxy.policy import NEVER_RETRIED, Retry

DEFAULT_MAX_RETRY_WAIT = 5.0
# What an attempt ended with, as metrics and logs name it (besides a status).
CONNECT_ERROR = "connect_error"
TIMEOUT = "timeout"
# An answer whose body then failed: no event within idle_timeout, or cut.
IDLE_TIMEOUT = "idle_timeout"
BROKEN = "broken"


@dataclass(frozen=True, slots=True)
class RetryRules:
    """A route's `retry` block, compiled: `attempts` resolved, statuses a set."""

    attempts: int
    on_status: frozenset[int]
    backoff: float
    max_retry_wait: float
    budget_percent: float
    min_retry_concurrency: int

    @classmethod
    def compile(
        cls, config: Retry, targets: int, queue_timeout: float, *, given: bool = False
    ) -> RetryRules:
        """`queue_timeout`: the upstream stage's, which bounds any wait (it holds a slot).
        `given`: the route has a `retry` block of its own."""
        wait = config.max_retry_wait
        attempts = config.attempts
        if attempts is None:
            # Each target gets one try; a retry block asks for at least one
            # retry (Envoy's num_retries defaults to 1), and a one-target
            # route without one keeps the single attempt it always had.
            attempts = max(targets, 2) if given else targets
        return cls(
            attempts=attempts,
            on_status=frozenset(config.on_status) - NEVER_RETRIED,
            backoff=config.backoff,
            max_retry_wait=min(DEFAULT_MAX_RETRY_WAIT, queue_timeout) if wait is None else wait,
            budget_percent=config.budget_percent,
            min_retry_concurrency=config.min_retry_concurrency,
        )


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try at one target, for the access line and `x-llm-sidecar-attempts`."""

    target: str  # the target's label
    status: int | None  # None: no response
    # CONNECT_ERROR or TIMEOUT when there was no response; IDLE_TIMEOUT or
    # BROKEN when the answer's body failed after its head (never retried).
    error: str | None
    duration: float  # seconds from sending to the response head (or the failure)
    waited: float  # seconds slept before this attempt (Retry-After or backoff)

    def log_fields(self) -> dict[str, object]:
        return {
            "target": self.target,
            "status": self.status,
            "error": self.error,
            "duration_ms": round(self.duration * 1000, 3),
            "waited_ms": round(self.waited * 1000, 3),
        }


def is_failure(status: int | None) -> bool:
    """Whether an outcome counts against the target's health (ejection)."""
    return status is None or status >= 500


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the upstream asks us to wait, or None when it says nothing usable.

    `retry-after-ms` (OpenAI, Azure) wins over `Retry-After`, which is
    delta-seconds or an HTTP-date (RFC 9110 §10.2.3); `now` is the wall clock.
    """
    millis = headers.get("retry-after-ms")
    if millis is not None:
        seconds = _number(millis)
        if seconds is not None:
            return seconds / 1000
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _number(value)
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _number(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    if value != value or value < 0 or value == float("inf"):
        return None
    return value


def backoff_delay(retry: int, base: float, cap: float, rng: random.Random) -> float:
    """Full jitter (AWS "Exponential Backoff And Jitter"): uniform in [0, min(cap, base * 2^n)].

    `retry` counts from 0 for the first retry.
    """
    ceiling = min(cap, base * 2.0 ** min(retry, 30))
    return rng.uniform(0.0, ceiling)


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do after an attempt that did not end the call."""

    kind: Literal["stop", "same", "other", "next"]
    # stop: give the caller this outcome. same: try the same target after
    # `wait` (it said when). other: another target at once, else stop.
    # next: the next target per the strategy; back off if it is the same one.
    wait: float = 0.0
    reason: str = ""  # why a retryable outcome stops: attempts, retry_after


def decide(status: int | None, retry_after: float | None, done: int, rules: RetryRules) -> Decision:
    """After `done` attempts, the last of which ended with `status` (None: no response)."""
    if status is not None and (status in NEVER_RETRIED or status not in rules.on_status):
        return Decision("stop")
    if done >= rules.attempts:
        return Decision("stop", reason="attempts")
    if retry_after is not None:
        if retry_after <= rules.max_retry_wait:
            return Decision("same", wait=retry_after)
        return Decision("other", reason="retry_after")
    return Decision("next")


class RetryBudget:
    """Retries in flight, bounded by a share of the upstream calls in flight (Envoy's budget).

    A retry holds a token from the moment it is granted (its wait
    included) until its attempt has an outcome.
    """

    # Touched only from the event loop thread, with no await inside a method.
    def __init__(self) -> None:
        self.in_flight = 0

    def try_acquire(self, active: int, percent: float, minimum: int) -> bool:
        """`active`: upstream calls in flight now, the retrying ones included."""
        if self.in_flight >= max(minimum, int(active * percent / 100)):
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1


@dataclass(eq=False)
class RetryState:
    """The process's retry bookkeeping, owned by the Runtime: budget, ejections, randomness.

    `clock` and `rng` are injectable so tests can drive cool-downs and draws.
    """

    budget: RetryBudget = field(default_factory=RetryBudget)
    outliers: Outliers = field(default_factory=Outliers)
    rng: random.Random = field(default_factory=random.Random)
    clock: Callable[[], float] = time.monotonic
