"""A test-only observer of stage slots: records every event and flags any
holder that acquires a second slot before releasing its first (DESIGN
invariant 1)."""

from __future__ import annotations

from proxy.limiter import StageEvent
from proxy.runtime import Runtime


class StageRecorder:
    """Keeps every stage event and flags any holder with two slots at once."""

    def __init__(self) -> None:
        self.events: list[StageEvent] = []
        self.violations: list[StageEvent] = []
        self._held: dict[str, str] = {}

    def __call__(self, event: StageEvent) -> None:
        self.events.append(event)
        if event.kind == "acquire":
            if event.holder in self._held:
                self.violations.append(event)
            self._held[event.holder] = event.stage
        elif event.kind == "release":
            self._held.pop(event.holder, None)


def record_stages(rt: Runtime) -> StageRecorder:
    recorder = StageRecorder()
    rt.stages.observe(recorder)
    return recorder
