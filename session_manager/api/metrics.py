"""`GET /metrics`: the manager's Prometheus metrics, in `prometheus_client`'s text exposition.

Three sources, one registry per daemon (`session_manager.metrics.Metrics`): the histograms the
daemon's parts feed; the process collector; and `DaemonCollector`, which reads the live gauges
and counters from the daemon's state at scrape time (nothing on any hot path). `http_metrics`
is the outermost middleware: every request that reaches the application is timed, labelled by
its route's canonical path (an unknown path: `unmatched`), never by the raw URL. The README lists
every metric.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Final

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from session_manager.daemon import Daemon
from session_manager.health_board import COMPONENTS
from session_manager.metrics import Metrics
from session_manager.session.states import LIVE_STATUSES
from session_manager.supervisor import Supervisor

CREATE_SESSION: Final = frozenset(
    {("POST", "/api/v1/sessions"), ("POST", "/api/v1/create-session")}
)
# What generate_latest writes (metric names with underscores only): Prometheus' text format 0.0.4.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
UNMATCHED: Final = "unmatched"  # the route label of a request no route matched (404, 405)
_METHODS: Final = frozenset(hdrs.METH_ALL)
_DELIVERY_RESULTS: Final = ("delivered", "failed", "dropped", "retried")


class DaemonCollector(Collector):
    """The live state of one daemon, read when Prometheus scrapes."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def describe(self) -> list[Metric]:
        return []  # read at scrape time only: registering it must not read the daemon

    def collect(self) -> Iterator[Metric]:
        daemon = self._daemon
        supervisor, events = daemon.supervisor, daemon.events
        statuses = supervisor.live_statuses()
        sessions = GaugeMetricFamily(
            "session_manager_sessions", "Live sessions by status.", labels=["status"]
        )
        for status in sorted(LIVE_STATUSES):
            sessions.add_metric([status.value], statuses.get(status.value, 0))
        yield sessions
        yield CounterMetricFamily(
            "session_manager_sessions_created",
            "Sessions created since start.",
            value=supervisor.sessions_created,
        )
        yield CounterMetricFamily(
            "session_manager_sessions_ended",
            "Sessions ended since start.",
            value=supervisor.sessions_ended,
        )
        yield from _pools(supervisor)
        services = GaugeMetricFamily(
            "session_manager_microservice_sessions",
            "Sessions each registered microservice is dispatched into.",
            labels=["service_id", "status", "draining"],
        )
        for record in daemon.registry.all():
            services.add_metric(
                [record.service_id, record.status.value, str(record.draining).lower()],
                record.load,
            )
        yield services
        yield GaugeMetricFamily(
            "session_manager_event_subscribers",
            "Open event streams.",
            value=events.subscriber_count,
        )
        yield CounterMetricFamily(
            "session_manager_events", "Events recorded since start.", value=events.recorded
        )
        yield from self._webhooks()
        yield GaugeMetricFamily(
            "session_manager_store_backlog",
            "Session views waiting to be written to the store.",
            value=daemon.store.backlog,
        )
        down = {problem.component for problem in daemon.health_problems()}
        components = GaugeMetricFamily(
            "session_manager_component_up",
            "1 while a part /health speaks for serves, 0 while it is down (or shutting down).",
            labels=["component"],
        )
        for component in COMPONENTS:
            components.add_metric([component], 0 if component in down else 1)
        yield components

    def _webhooks(self) -> Iterator[Metric]:
        deliveries = CounterMetricFamily(
            "session_manager_webhook_deliveries",
            "Outbound webhook deliveries by result.",
            labels=["target", "result"],
        )
        queued = GaugeMetricFamily(
            "session_manager_webhook_queued",
            "Outbound webhook events waiting.",
            labels=["target"],
        )
        # Two targets may share an origin (the label: a URL's path may be a secret): summed.
        counts: dict[tuple[str, str], int] = {}
        waiting: dict[str, int] = {}
        for target, stats in self._daemon.outbound_webhooks.stats().items():
            for result in _DELIVERY_RESULTS:
                key = (target.origin, result)
                counts[key] = counts.get(key, 0) + getattr(stats, result)
            waiting[target.origin] = waiting.get(target.origin, 0) + stats.queued
        for (origin, result), count in counts.items():
            deliveries.add_metric([origin, result], count)
        for origin, count in waiting.items():
            queued.add_metric([origin], count)
        yield deliveries
        yield queued


# The warm pools' counters (`session_manager.pools.Pool`): attribute -> help.
_POOL_COUNTERS: Final = {
    "hits": "Creates served by a warm pool's Ready member.",
    "misses": "Creates that matched a warm pool with no member Ready (dispatched as usual).",
    "refills": "Warm pool members started.",
    "expiries": "Warm pool members ended unclaimed after max_idle.",
    "fill_failures": "Warm pool members that ended before Ready.",
    "lost": "Ready warm pool members that lost a service, or their room, and were replaced.",
}


def _pools(supervisor: Supervisor) -> Iterator[Metric]:
    """One series per pool (at most MAX_POOLS, named by their services)."""
    pools = list(supervisor.pools.pools.values())
    if not pools:
        return
    ready = GaugeMetricFamily(
        "session_manager_pool_ready",
        "Warm pool members Ready to be handed out now.",
        labels=["pool"],
    )
    for pool in pools:
        ready.add_metric([pool.name], supervisor.pool_ready(pool))
    yield ready
    for attribute, description in _POOL_COUNTERS.items():
        family = CounterMetricFamily(
            f"session_manager_pool_{attribute}", description, labels=["pool"]
        )
        for pool in pools:
            family.add_metric([pool.name], getattr(pool, attribute))
        yield family


def watch(metrics: Metrics, daemon: Daemon) -> None:
    """Have the daemon's live state scraped with `metrics`' registry (once it is started)."""
    metrics.registry.register(DaemonCollector(daemon))


def route_of(request: web.Request) -> str:
    """The route's canonical path (`/api/v1/sessions/{session_id}`), never the raw URL."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED


def http_metrics(metrics: Metrics) -> Middleware:
    """Times every request by method, route and status; POST /api/v1/sessions also as the
    create-session latency. A request cancelled (its client went away) is not counted."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            _observe(metrics, request, exc.status, started)
            raise
        except Exception:
            _observe(metrics, request, 500, started)
            raise
        _observe(metrics, request, response.status, started)
        return response

    return middleware


def _observe(metrics: Metrics, request: web.Request, status: int, started: float) -> None:
    seconds = time.perf_counter() - started
    method = request.method if request.method in _METHODS else "other"
    route = route_of(request)
    metrics.http_requests.labels(method, route, str(status)).observe(seconds)
    if (method, route) in CREATE_SESSION:
        outcome = "ok" if status < 400 else "client_error" if status < 500 else "server_error"
        metrics.create_session.labels(outcome).observe(seconds)


def render(metrics: Metrics) -> web.Response:
    return web.Response(
        body=generate_latest(metrics.registry),
        headers={"Content-Type": CONTENT_TYPE, "Cache-Control": "no-store"},
    )
