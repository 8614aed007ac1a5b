"""/metrics as Prometheus scrapes it, read with prometheus_client's own parser: the histograms
after sessions, dispatches, webhooks and HTTP errors; bounded labels; exact counters."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from session_manager.api.routes import DAEMON
from tests.fake_services import (
    ScriptedService,
    accept_without_joining,
    decline_with_503,
    register,
    wait_until,
)

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(manager: Any) -> tuple[str, Samples]:
    response = await manager.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = await response.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(key)[label] for (sample, key) in samples if sample == name and label in dict(key)}


async def create(manager: Any, **body: Any) -> dict[str, Any]:
    response = await manager.post("/api/v1/sessions", json={"user_identity": "u", **body})
    assert response.status == 200, await response.text()
    created: dict[str, Any] = await response.json()
    return created


async def test_histograms_count_what_a_user_did(manager: Any) -> None:
    async with (
        ScriptedService(decline_with_503).running() as busy,
        ScriptedService(accept_without_joining).running() as free,
    ):
        # The most free capacity is asked first: pong-busy declines, then pong-free takes it.
        await register(manager, "pong-busy", busy.endpoint, type="PONG", max_sessions=10)
        await register(manager, "pong-free", free.endpoint, type="PONG", max_sessions=2)
        await create(manager, required_services=["type:PONG"])
        for _ in range(2):
            await create(manager, required_services=[])  # Ready at once
        refused = await manager.post("/api/v1/sessions", json={"user_identity": ""})
        assert refused.status == 400
        assert (await manager.get("/api/v1/sessions/no-such-session")).status == 404
        assert (await manager.get("/no/such/path/1234")).status == 404

        _, samples = await wait_until(
            lambda: scrape(manager),
            lambda scraped: (
                value(
                    scraped[1],
                    "session_manager_join_room_duration_seconds_count",
                    service_id="pong-free",
                    outcome="ok",
                )
                == 1
            ),
            "the join-room call to pong-free counted",
        )

    create_count = "session_manager_create_session_duration_seconds_count"
    assert value(samples, create_count, outcome="ok") == 3
    assert value(samples, create_count, outcome="client_error") == 1
    assert value(samples, "session_manager_session_ready_seconds_count") == 2
    ready_sum = value(samples, "session_manager_session_ready_seconds_sum")
    assert ready_sum is not None and 0 < ready_sum < 30
    join = "session_manager_join_room_duration_seconds_count"
    assert value(samples, join, service_id="pong-busy", outcome="declined") == 1
    assert value(samples, join, service_id="pong-free", outcome="ok") == 1
    assert label_values(samples, join, "service_id") == {"pong-busy", "pong-free"}

    http = "session_manager_http_request_duration_seconds_count"
    assert value(samples, http, method="POST", route="/api/v1/sessions", status="200") == 3
    assert value(samples, http, method="POST", route="/api/v1/sessions", status="400") == 1
    one = value(samples, http, method="GET", route="/api/v1/sessions/{session_id}", status="404")
    assert one == 1
    # An unknown path is counted under one bounded label, never under its raw URL.
    assert value(samples, http, method="GET", route="unmatched", status="404") == 1
    routes = label_values(samples, http, "route")
    assert not any("no-such" in route or "/no/" in route for route in routes), routes
    assert routes <= {route.resource.canonical for route in manager.app.router.routes()} | {
        "unmatched"
    }

    # Process metrics, on this daemon's own registry.
    assert (value(samples, "process_resident_memory_bytes") or 0) > 0
    assert value(samples, "process_cpu_seconds_total") is not None
    # The live gauges, read at scrape time.
    assert value(samples, "session_manager_sessions", status="Ready") == 2
    assert value(samples, "session_manager_sessions_created_total") == 3
    assert value(samples, "session_manager_store_backlog") is not None
    assert value(samples, "session_manager_component_up", component="supervisor") == 1
    assert value(samples, "session_manager_component_up", component="livekit") == 1
    # What a tail is made of: the real LiveKit's CreateRoom for each of the three sessions,
    # the store's batches, and the event loop's lateness, all timed.
    livekit = "session_manager_livekit_call_duration_seconds_count"
    assert value(samples, livekit, method="CreateRoom", outcome="ok") == 3
    assert (value(samples, "session_manager_store_write_seconds_count", outcome="ok") or 0) >= 1
    # The probe's first timer is due 50 ms after start: a fast run may scrape before it fires.
    await wait_until(
        lambda: scrape(manager),
        lambda scraped: (
            (value(scraped[1], "session_manager_event_loop_lag_seconds_count") or 0) >= 1
        ),
        "the event loop's lateness timed at least once",
    )


async def test_counters_are_exact_at_any_size(manager: Any) -> None:
    daemon = manager.app[DAEMON]
    daemon.supervisor.sessions_created = 1234567
    daemon.supervisor.sessions_ended = 2**53  # the largest count a float64 holds exactly
    text, samples = await scrape(manager)
    lines = set(text.splitlines())
    # Shortest text that reads back the same float (what Prometheus itself stores), never a
    # rounded one (the `:g` of old wrote 1234567 as 1.23457e+06).
    assert "session_manager_sessions_created_total 1.234567e+06" in lines
    assert value(samples, "session_manager_sessions_created_total") == 1234567
    assert value(samples, "session_manager_sessions_ended_total") == 2**53


SECRET = "whsec_" + base64.b64encode(b"metrics-test-webhook-key-32-byte").decode()


@asynccontextmanager
async def receiver() -> AsyncIterator[str]:
    async def hook(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook/secret-path", hook)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/hook/secret-path"
    finally:
        await runner.cleanup()


async def test_webhook_deliveries_are_timed_per_target_origin(start_manager: Any) -> None:
    async with receiver() as url:
        manager = await start_manager(webhooks=[url], webhook_secret=SECRET)
        await create(manager, required_services=[])
        origin = url.removesuffix("/hook/secret-path")

        def delivered(scraped: tuple[str, Samples]) -> bool:
            count = value(
                scraped[1],
                "session_manager_webhook_deliveries_total",
                target=origin,
                result="delivered",
            )
            return count is not None and count >= 3

        text, samples = await wait_until(
            lambda: scrape(manager), delivered, "the session's events delivered"
        )
    delivered_total = value(
        samples, "session_manager_webhook_deliveries_total", target=origin, result="delivered"
    )
    timed = value(
        samples,
        "session_manager_webhook_delivery_duration_seconds_count",
        target=origin,
        outcome="ok",
    )
    # Every delivered event was one timed attempt, none failed (both read in one scrape).
    assert timed == delivered_total
    assert "secret-path" not in text  # a target is labelled by its origin only
