"""The circuit breaker that keeps a sick cache backend off the request path.

closed: every call goes through; `failures` consecutive faults open it.
open: no call goes through until `reset_after` has passed since it opened.
half-open: exactly one call (the probe) goes through; its success closes the
breaker, its failure opens it again for another `reset_after`.

Synchronous and single-threaded (one event loop): every method runs without
an await, so a state change is never observed half done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

log = logging.getLogger("llm_sidecar.cache")

BreakerState = Literal["closed", "open", "half_open"]
# A probe is the one call a half-open breaker lets through; its outcome decides.
Permit = Literal["call", "probe"]


class CircuitBreaker:
    def __init__(
        self,
        failures: int,
        reset_after: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        subject: str = "cache backend",
        consequence: str = "lookups are misses",
        logger: logging.Logger = log,
    ) -> None:
        if failures < 1:
            raise ValueError("failures must be at least 1")
        self.failures = failures
        self.reset_after = reset_after
        self._clock = clock
        # What the log lines name: the cache's breaker, or another Redis user's.
        self._subject = subject
        self._consequence = consequence
        self._log = logger
        self._state: BreakerState = "closed"
        self._consecutive = 0
        self._opened_at = 0.0
        # True while the single half-open probe is out; every other caller is
        # refused until its outcome is recorded.
        self._probing = False
        self.opened = 0  # how many times it has opened, for the stats

    @property
    def state(self) -> BreakerState:
        return self._state

    def refusing(self) -> bool:
        """Whether `allow` would refuse now; changes nothing (a cheap pre-check)."""
        if self._state == "closed":
            return False
        if self._state == "open":
            return self._clock() - self._opened_at < self.reset_after
        return self._probing

    def allow(self) -> Permit | None:
        """Permission for one backend call, or None; pass it to `record` afterwards."""
        if self._state == "closed":
            return "call"
        if self._state == "open":
            if self._clock() - self._opened_at < self.reset_after:
                return None
            self._state = "half_open"
        if self._probing:
            return None
        self._probing = True
        return "probe"

    def record(self, permit: Permit, ok: bool) -> None:
        """The outcome of a call that `allow` let through."""
        if permit == "probe":
            self._probing = False
            if ok:
                self._close()
            else:
                self._open()
            return
        if self._state != "closed":
            # A call let through before the breaker opened, ending late: only
            # the probe decides when a non-closed breaker closes.
            return
        if ok:
            self._consecutive = 0
            return
        self._consecutive += 1
        if self._consecutive >= self.failures:
            self._open()

    def release(self, permit: Permit) -> None:
        """A call that ended with no outcome (cancelled at shutdown): frees the
        probe so the next caller may probe, and judges nothing."""
        if permit == "probe":
            self._probing = False

    def _close(self) -> None:
        self._state = "closed"
        self._consecutive = 0
        self._log.info("%s answering again: breaker closed", self._subject)

    def _open(self) -> None:
        self._state = "open"
        self._opened_at = self._clock()
        self.opened += 1
        self._log.warning(
            "%s failing: breaker open, retrying in %.3gs (%s)",
            self._subject,
            self.reset_after,
            self._consequence,
        )
