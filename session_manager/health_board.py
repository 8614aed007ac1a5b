"""What `GET /health` reports: which core parts of the manager are down now, why, and since when.

Each part marks itself down or up from the event loop (the supervisor's loop, the store's writer,
the LiveKit watcher); /health and /metrics only read. A part going down or coming back is logged
once, at the moment it happens, not on every probe.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from session_manager.clock import now_rfc3339

log = logging.getLogger(__name__)

# The parts /health speaks for. Anything else marking itself down is a programming error.
SUPERVISOR = "supervisor"
STORE = "store"
LIVEKIT = "livekit"
CLUSTER = "cluster"  # store = redis: the Redis the managers share their sessions' leases on
COMPONENTS = (SUPERVISOR, STORE, LIVEKIT, CLUSTER)


@dataclass(frozen=True)
class Problem:
    component: str
    reason: str
    since: str  # RFC 3339, when it went down

    def view(self) -> dict[str, str]:
        return {"component": self.component, "reason": self.reason, "since": self.since}


class HealthBoard:
    """The core parts that are down; empty when the manager can serve."""

    def __init__(self) -> None:
        self._down: dict[str, Problem] = {}

    def down(self, component: str, reason: str) -> None:
        """Mark `component` down. Already down: the reason is updated, `since` is kept."""
        if component not in COMPONENTS:
            raise ValueError(f"unknown health component {component!r}")
        known = self._down.get(component)
        if known is None:
            log.error("core component down", extra={"component": component, "reason": reason})
        self._down[component] = Problem(component, reason, known.since if known else now_rfc3339())

    def up(self, component: str) -> None:
        problem = self._down.pop(component, None)
        if problem is not None:
            log.warning(
                "core component back", extra={"component": component, "down_since": problem.since}
            )

    def is_down(self, component: str) -> bool:
        return component in self._down

    def problem(self, component: str) -> Problem | None:
        return self._down.get(component)

    @property
    def healthy(self) -> bool:
        return not self._down

    def problems(self) -> list[Problem]:
        return [self._down[name] for name in COMPONENTS if name in self._down]
