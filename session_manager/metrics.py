"""One manager's Prometheus registry (`prometheus_client`) and the histograms its parts feed.

Each daemon has its own `CollectorRegistry`, never the library's global one, so several managers in
one process (the tests) do not clash. The parts that time something are handed a plain callback
(`SessionDeps.on_ready`, `MicroserviceClient(on_join_room=…)`, `OutboundWebhooks(on_attempt=…)`),
so none of them imports prometheus. The live gauges and counters are read from the daemon's state
at scrape time by a collector (`api.metrics`): nothing is added to any hot path for them.

Label cardinality is bounded: HTTP requests by the route's canonical path (never the raw URL, an
unknown path is `unmatched`), a known method (else `other`) and the status; join-room by the
registration's service id, with the series of registrations that are gone removed, so at most
`max_services` + 1 of them exist; webhook deliveries by the configured target's origin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector

from session_manager.dispatch import DispatchOutcome

# Seconds: from a fast local call to the longest timeouts the manager waits on.
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Seconds from create to Ready: services join in seconds, join_timeout is minutes at most.
READY_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)

# Seconds from an instance's loss to its replacement's join: under 2 s is the aim for a lost
# SDK process; a health-checked or LiveKit-noticed loss takes tens of seconds.
FAILOVER_BUCKETS: Final = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)
# The causes (`session.messages.FailoverCause`): a bounded label.
FAILOVER_CAUSES: Final = ("process lost", "health", "left room", "drain", "dispatch failed")

# Seconds: a young collection takes well under a millisecond, a full one over a large heap can
# take tens of milliseconds (the stall a create-session's p99 would show).
GC_PAUSE_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

# Seconds a timer ran late on the event loop: under a millisecond when idle; every request in
# flight waits out anything longer.
LOOP_LAG_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# Seconds one batch of session views takes to be written (a commit on SQLite, a pipeline on
# Redis): a create-session is answered only once its view is written.
STORE_WRITE_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

JOIN_OUTCOMES: Final = ("ok", "declined", "failed")


def join_outcome(outcome: DispatchOutcome) -> str:
    if outcome.ok:
        return "ok"
    return "declined" if outcome.declined else "failed"


class Metrics:
    """The registry and histograms of one daemon; `render` is its text exposition."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.http_requests = Histogram(
            "session_manager_http_request_duration_seconds",
            "HTTP requests answered by the API, by method, route and status.",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.create_session = Histogram(
            "session_manager_create_session_duration_seconds",
            "Create-session requests, timed at the front door, by outcome.",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.session_ready = Histogram(
            "session_manager_session_ready_seconds",
            "Time from a session's creation to its first Ready.",
            buckets=READY_BUCKETS,
            registry=self.registry,
        )
        self.join_room = Histogram(
            "session_manager_join_room_duration_seconds",
            "join-room calls to microservices (retries included), by service and outcome.",
            ["service_id", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.webhook_delivery = Histogram(
            "session_manager_webhook_delivery_duration_seconds",
            "Outbound webhook delivery attempts, by target origin and outcome (ok, error).",
            ["target", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.failover = Histogram(
            "session_manager_failover_seconds",
            "Time from a service instance's loss to its replacement's join, by cause.",
            ["cause"],
            buckets=FAILOVER_BUCKETS,
            registry=self.registry,
        )
        self.gc_pause = Histogram(
            "session_manager_gc_pause_seconds",
            "Pauses of the Python garbage collector, by generation (2: a full collection).",
            ["generation"],
            buckets=GC_PAUSE_BUCKETS,
            registry=self.registry,
        )
        self.loop_lag = Histogram(
            "session_manager_event_loop_lag_seconds",
            "How late the event loop ran a timer due every 50 ms (every request waits it out).",
            buckets=LOOP_LAG_BUCKETS,
            registry=self.registry,
        )
        self.store_write = Histogram(
            "session_manager_store_write_seconds",
            "Batches of session views written to the store, by outcome (ok, error).",
            ["outcome"],
            buckets=STORE_WRITE_BUCKETS,
            registry=self.registry,
        )
        self.livekit_call = Histogram(
            "session_manager_livekit_call_duration_seconds",
            "Calls to LiveKit's server API, by method and outcome (ok, refused, error).",
            ["method", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # Whether a service id is still registered: set by the daemon once its registry exists.
        self.is_registered: Callable[[str], bool] = lambda service_id: True
        self._join_services: set[str] = set()

    def observe_gc_pause(self, generation: int, seconds: float) -> None:
        self.gc_pause.labels(str(generation) if generation in (0, 1, 2) else "other").observe(
            seconds
        )

    def observe_loop_lag(self, seconds: float) -> None:
        self.loop_lag.observe(seconds)

    def observe_store_write(self, ok: bool, seconds: float) -> None:
        self.store_write.labels("ok" if ok else "error").observe(seconds)

    def observe_livekit_call(self, method: str, outcome: str, seconds: float) -> None:
        # Both labels are bounded: the gateway's own method names, and its three outcomes.
        self.livekit_call.labels(method, outcome).observe(seconds)

    def observe_ready(self, seconds: float) -> None:
        self.session_ready.observe(max(seconds, 0.0))

    def observe_failover(self, cause: str, seconds: float) -> None:
        label = cause if cause in FAILOVER_CAUSES else "other"
        self.failover.labels(label).observe(max(seconds, 0.0))

    def observe_join_room(self, service_id: str, outcome: DispatchOutcome) -> None:
        if service_id not in self._join_services:
            self._forget_gone_services()
            self._join_services.add(service_id)
        self.join_room.labels(service_id, join_outcome(outcome)).observe(outcome.elapsed_ms / 1000)

    def _forget_gone_services(self) -> None:
        """Runs only when a service is seen for the first time: drops the series of the
        registrations that are gone, so the label stays bounded by the registry's size."""
        for service_id in [s for s in self._join_services if not self.is_registered(s)]:
            self._join_services.discard(service_id)
            for outcome in JOIN_OUTCOMES:
                self.join_room.remove(service_id, outcome)  # a label set never seen: no-op

    def observe_webhook(self, target: str, ok: bool, seconds: float) -> None:
        self.webhook_delivery.labels(target, "ok" if ok else "error").observe(seconds)
