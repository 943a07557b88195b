"""Outlier ejection: a target that keeps failing is skipped for a cool-down.

After `eject_after` failures in a row (no answer, a timeout, a 5xx, or a
body that stalled or broke after its head) a target is ejected for
`eject_for`; each time it fails again right after a cool-down, the next one
doubles, up to `max_eject_for`. A target that asks for a pause
(`Retry-After` on a retryable answer, LiteLLM's cooldown) is skipped for
that long, without counting as a failure: a 429 is the upstream pacing us.
A whole answer under 500 other than 429 clears the record. The state is per
process (each sidecar judges its own view of the network) and per target
identity, shared by every route that names the target. Pure: every call
takes the time `now`, so tests drive the clock.
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
    paused_until: float = 0.0  # the upstream's own Retry-After, not a failure
    last_failure: float = 0.0  # or the last pause asked for


@dataclass(frozen=True, slots=True)
class HealthView:
    """A target's record as /status and the metrics show it."""

    consecutive_failures: int
    ejections: int  # cool-downs in a row, for the doubling; 0 again once it answers
    ejected: bool  # skipped now, for failures or for its Retry-After
    ejected_for_s: float  # what is left of the longer of the two, 0 when not ejected
    paused_for_s: float  # what is left of the upstream's Retry-After


class Outliers:
    # Touched only from the event loop thread, with no await inside a method.
    def __init__(self) -> None:
        self._health: dict[TargetId, Health] = {}

    @property
    def tracking(self) -> bool:
        """Whether any target has a failure on record."""
        return bool(self._health)

    def is_ejected(self, target: TargetId, now: float) -> bool:
        """Whether the target is skipped at `now`: ejected, or paused by its Retry-After."""
        health = self._health.get(target)
        return health is not None and max(health.ejected_until, health.paused_until) > now

    def last_failure(self, target: TargetId) -> float:
        health = self._health.get(target)
        return float("-inf") if health is None else health.last_failure

    def succeeded(self, target: TargetId) -> Health | None:
        """Clear the record; the record it had, if any (a restored target had ejections)."""
        if not self._health:  # the usual case, nothing failing, costs one truth test
            return None
        return self._health.pop(target, None)

    def paused(self, target: TargetId, config: Hashable, now: float, seconds: float) -> None:
        """The upstream asked for `seconds` before another call: skip it until then."""
        health = self._health.get(target)
        if health is None or health.config != config:
            health = self._health[target] = Health(config)
        health.paused_until = max(health.paused_until, now + seconds)
        health.last_failure = now

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
            return HealthView(0, 0, False, 0.0, 0.0)
        paused = max(0.0, health.paused_until - now)
        left = max(0.0, health.ejected_until - now, paused)
        return HealthView(
            health.consecutive, health.ejections, left > 0, round(left, 3), round(paused, 3)
        )

    def reconcile(self, targets: Mapping[TargetId, Hashable]) -> None:
        """After a reload: forget targets that are gone or whose upstream changed."""
        for target, health in list(self._health.items()):
            if targets.get(target) != health.config:
                del self._health[target]
