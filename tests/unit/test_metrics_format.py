"""/metrics in prometheus_client's text exposition: counters exact at any size, the live state
read at scrape time, and join-room labels bounded by the registry."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from session_manager.api.metrics import DaemonCollector
from session_manager.dispatch import DispatchOutcome
from session_manager.events import DeliveryStats, WebhookTarget
from session_manager.health_board import Problem
from session_manager.metrics import Metrics
from session_manager.pools import WarmPools, WarmPoolSetting

ROOT = Path(__file__).resolve().parents[2]


def fake_daemon(**counts: int) -> Any:
    """What the collector reads of a daemon, and nothing else."""
    stats = DeliveryStats(delivered=counts.get("delivered", 0), queued=3)
    pools = WarmPools([WarmPoolSetting(services=["type:TTS", "type:ASR"], size=2)])
    pool = pools.pools["type:ASR+type:TTS"]
    pool.hits, pool.misses = counts.get("pool_hits", 0), counts.get("pool_misses", 0)
    return SimpleNamespace(
        supervisor=SimpleNamespace(
            live_statuses=lambda: {"Ready": 2},
            sessions_created=counts.get("created", 0),
            sessions_ended=0,
            pools=pools,
            pool_ready=lambda pool: counts.get("pool_ready", 0),
        ),
        events=SimpleNamespace(subscriber_count=1, recorded=counts.get("events", 0)),
        registry=SimpleNamespace(all=list),
        outbound_webhooks=SimpleNamespace(
            stats=lambda: {
                WebhookTarget("https://hooks.example/a/secret"): stats,
                WebhookTarget("https://hooks.example/b"): DeliveryStats(delivered=1),
            }
        ),
        store=SimpleNamespace(backlog=7),
        health_problems=lambda: [Problem("store", "disk full", "2026-01-01T00:00:00Z")],
    )


def scrape(metrics: Metrics) -> tuple[list[str], dict[tuple[str, tuple[str, ...]], float]]:
    text = generate_latest(metrics.registry).decode()
    samples = {
        (sample.name, tuple(sorted(f"{k}={v}" for k, v in sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return text.splitlines(), samples


def test_counters_print_exactly_and_read_back_as_the_same_number() -> None:
    metrics = Metrics()
    metrics.registry.register(
        DaemonCollector(fake_daemon(created=1234567, events=2**53, delivered=10**15))
    )
    lines, samples = scrape(metrics)
    # Not `1.23457e+06` (the `:g` of old): the shortest text of the exact float.
    assert "session_manager_sessions_created_total 1.234567e+06" in lines
    assert samples[("session_manager_sessions_created_total", ())] == 1234567
    assert samples[("session_manager_events_total", ())] == 2**53
    delivered = ("target=https://hooks.example", "result=delivered")
    # Two targets at one origin are one series (the path, maybe a secret, is never a label).
    assert samples[("session_manager_webhook_deliveries_total", tuple(sorted(delivered)))] == (
        10**15 + 1
    )
    assert samples[("session_manager_webhook_queued", ("target=https://hooks.example",))] == 3
    assert not any("secret" in line for line in lines)
    assert samples[("session_manager_store_backlog", ())] == 7
    assert samples[("session_manager_component_up", ("component=store",))] == 0
    assert samples[("session_manager_component_up", ("component=supervisor",))] == 1
    assert samples[("session_manager_sessions", ("status=Ready",))] == 2
    assert samples[("session_manager_sessions", ("status=Creating",))] == 0


def test_the_collector_reads_the_daemon_at_each_scrape() -> None:
    metrics = Metrics()
    daemon = fake_daemon(created=1)
    metrics.registry.register(DaemonCollector(daemon))
    assert scrape(metrics)[1][("session_manager_sessions_created_total", ())] == 1
    daemon.supervisor.sessions_created = 5
    assert scrape(metrics)[1][("session_manager_sessions_created_total", ())] == 5


def test_join_room_series_of_a_registration_that_is_gone_are_removed() -> None:
    metrics = Metrics()
    registered = {"asr-1", "asr-2"}
    metrics.is_registered = registered.__contains__
    ok = DispatchOutcome(ok=True, attempts=1, elapsed_ms=20.0)
    declined = DispatchOutcome(ok=False, attempts=1, elapsed_ms=5.0, declined=True)
    metrics.observe_join_room("asr-1", ok)
    metrics.observe_join_room("asr-1", declined)
    metrics.observe_join_room("asr-2", DispatchOutcome(ok=False, attempts=3, error="x"))
    count = "session_manager_join_room_duration_seconds_count"
    samples = scrape(metrics)[1]
    assert samples[(count, ("outcome=ok", "service_id=asr-1"))] == 1
    assert samples[(count, ("outcome=declined", "service_id=asr-1"))] == 1
    assert samples[(count, ("outcome=failed", "service_id=asr-2"))] == 1
    assert (
        samples[
            ("session_manager_join_room_duration_seconds_sum", ("outcome=ok", "service_id=asr-1"))
        ]
        == 0.02
    )

    registered.discard("asr-1")  # deregistered: its series go when a new service shows up
    registered.add("asr-3")
    metrics.observe_join_room("asr-3", ok)
    services = {
        label for (name, labels) in scrape(metrics)[1] if name == count for label in labels
    } - {"outcome=ok", "outcome=declined", "outcome=failed"}
    assert services == {"service_id=asr-2", "service_id=asr-3"}


def test_each_metrics_has_its_own_registry_with_process_metrics() -> None:
    first, second = Metrics(), Metrics()  # two managers in one process do not clash
    first.observe_ready(1.5)
    assert scrape(first)[1][("session_manager_session_ready_seconds_count", ())] == 1
    assert scrape(second)[1][("session_manager_session_ready_seconds_count", ())] == 0
    assert ("process_resident_memory_bytes", ()) in scrape(second)[1]


def test_each_warm_pool_has_its_ready_gauge_and_counters() -> None:
    metrics = Metrics()
    metrics.registry.register(
        DaemonCollector(fake_daemon(pool_hits=3, pool_misses=1, pool_ready=2))
    )
    _, samples = scrape(metrics)
    label = ("pool=type:ASR+type:TTS",)
    assert samples[("session_manager_pool_ready", label)] == 2
    assert samples[("session_manager_pool_hits_total", label)] == 3
    assert samples[("session_manager_pool_misses_total", label)] == 1
    for counter in ("refills", "expiries", "fill_failures", "lost"):
        assert samples[(f"session_manager_pool_{counter}_total", label)] == 0


def test_the_grafana_dashboard_graphs_only_metrics_the_manager_exposes() -> None:
    dashboard = json.loads((ROOT / "scripts" / "grafana-dashboard.json").read_text())
    metrics = Metrics()
    metrics.registry.register(DaemonCollector(fake_daemon()))
    exposed: set[str] = set()
    for family in metrics.registry.collect():
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
        }.get(family.type, ("",))
        exposed.update(family.name + suffix for suffix in suffixes)
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b(?:session_manager|process)_[a-z_]+", target["expr"])
    }
    assert used and used <= exposed, used - exposed
    histograms = {name.removesuffix("_bucket") for name in used if name.endswith("_bucket")}
    assert histograms == {
        "session_manager_create_session_duration_seconds",
        "session_manager_session_ready_seconds",
        "session_manager_join_room_duration_seconds",
        "session_manager_http_request_duration_seconds",
        "session_manager_webhook_delivery_duration_seconds",
        "session_manager_failover_seconds",
        "session_manager_event_loop_lag_seconds",
        "session_manager_store_write_seconds",
        "session_manager_livekit_call_duration_seconds",
    }
