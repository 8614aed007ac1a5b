"""`GET /metrics`: the manager's state in Prometheus' text format, written by hand (a few
gauges and counters do not need a client library)."""

from __future__ import annotations

import math
from collections.abc import Iterable

from session_manager.daemon import Daemon
from session_manager.session.states import LIVE_STATUSES

Sample = tuple[dict[str, str], float]


def _family(name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        text = _number(value)
        lines.append(f"{name}{{{label_text}}} {text}" if labels else f"{name} {text}")
    return lines


def _number(value: float) -> str:
    """Exact at any size: a count is written as the integer it is (`:g` wrote 1234567 as
    1.23457e+06), any other value as the shortest text that reads back the same float."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if value.is_integer() else repr(value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(daemon: Daemon) -> str:
    supervisor, events = daemon.supervisor, daemon.events
    statuses = supervisor.live_statuses()
    services = daemon.registry.all()
    lines: list[str] = []
    lines += _family(
        "session_manager_sessions",
        "gauge",
        "Live sessions by status.",
        (({"status": s.value}, statuses.get(s.value, 0)) for s in sorted(LIVE_STATUSES)),
    )
    lines += _family(
        "session_manager_sessions_created_total",
        "counter",
        "Sessions created since start.",
        [({}, supervisor.sessions_created)],
    )
    lines += _family(
        "session_manager_sessions_ended_total",
        "counter",
        "Sessions ended since start.",
        [({}, supervisor.sessions_ended)],
    )
    lines += _family(
        "session_manager_microservice_sessions",
        "gauge",
        "Sessions each registered microservice is dispatched into.",
        (
            (
                {
                    "service_id": r.service_id,
                    "status": r.status.value,
                    "draining": str(r.draining).lower(),
                },
                r.load,
            )
            for r in services
        ),
    )
    lines += _family(
        "session_manager_event_subscribers",
        "gauge",
        "Open event streams.",
        [({}, events.subscriber_count)],
    )
    lines += _family(
        "session_manager_events_total",
        "counter",
        "Events recorded since start.",
        [({}, events.recorded)],
    )
    deliveries: list[Sample] = []
    queued: list[Sample] = []
    for target, stats in daemon.outbound_webhooks.stats().items():
        for result in ("delivered", "failed", "dropped", "retried"):
            deliveries.append(({"target": target.origin, "result": result}, getattr(stats, result)))
        queued.append(({"target": target.origin}, stats.queued))
    lines += _family(
        "session_manager_webhook_deliveries_total",
        "counter",
        "Outbound webhook deliveries by result.",
        deliveries,
    )
    lines += _family(
        "session_manager_webhook_queued", "gauge", "Outbound webhook events waiting.", queued
    )
    return "\n".join(lines) + "\n"
