"""Outlier ejection: a target that keeps failing is skipped for a cool-down.

After `eject_after` failures in a row (no answer, a timeout, or a 5xx) a
target is ejected for `eject_for`; each time it fails again right after a
cool-down, the next one doubles, up to `max_eject_for`. Any answer under
500 other than 429 clears the record (a 429 is the upstream pacing us, not
failing). The state is per process (each sidecar judges its own view of
the network) and per target identity, shared by every route that names the
target. Pure: every call takes the time `now`, so tests drive the clock.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass

TargetId = tuple[str, str | None]  # (upstream name, model rewrite)


@dataclass(slots=True)
class Health:
    """One target's failure record. Only failing targets have one."""

    config: Hashable  # the upstream's settings when it failed: a reload that changes them resets
    consecutive: int = 0  # failures since the last success
    ejections: int = 0  # cool-downs in a row, for the doubling
    ejected_until: float = 0.0
    last_failure: float = 0.0


@dataclass(frozen=True, slots=True)
class HealthView:
    """A target's record as /status and the metrics show it."""

    consecutive_failures: int
    ejections: int
    ejected: bool
    ejected_for_s: float  # what is left of the cool-down, 0 when not ejected


class Outliers:
    # Touched only from the event loop thread, with no await inside a method.
    def __init__(self) -> None:
        self._health: dict[TargetId, Health] = {}

    @property
    def tracking(self) -> bool:
        """Whether any target has a failure on record."""
        return bool(self._health)

    def is_ejected(self, target: TargetId, now: float) -> bool:
        health = self._health.get(target)
        return health is not None and health.ejected_until > now

    def last_failure(self, target: TargetId) -> float:
        health = self._health.get(target)
        return float("-inf") if health is None else health.last_failure

    def succeeded(self, target: TargetId) -> None:
        if self._health:  # the usual case, nothing failing, costs one truth test
            self._health.pop(target, None)

    def failed(
        self,
        target: TargetId,
        config: Hashable,
        now: float,
        *,
        eject_after: int,
        eject_for: float,
        max_eject_for: float,
    ) -> bool:
        """Count a failure; True when it ejects the target (a new cool-down starts)."""
        health = self._health.get(target)
        if health is None or health.config != config:
            health = self._health[target] = Health(config)
        health.consecutive += 1
        health.last_failure = now
        if health.ejected_until > now or health.consecutive < eject_after:
            return False
        # Tried again after a cool-down and failed: the next cool-down doubles.
        length = min(max_eject_for, eject_for * 2.0**health.ejections)
        health.ejections += 1
        health.ejected_until = now + length
        return True

    def view(self, target: TargetId, now: float) -> HealthView:
        health = self._health.get(target)
        if health is None:
            return HealthView(0, 0, False, 0.0)
        left = max(0.0, health.ejected_until - now)
        return HealthView(health.consecutive, health.ejections, left > 0, round(left, 3))

    def reconcile(self, targets: Mapping[TargetId, Hashable]) -> None:
        """After a reload: forget targets that are gone or whose upstream changed."""
        for target, health in list(self._health.items()):
            if targets.get(target) != health.config:
                del self._health[target]
