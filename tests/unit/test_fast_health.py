"""Health checks on each service's own schedule (issue 15, plain HTTP services): the bounds of
`metadata.health_interval`, `health_timeout` and `unhealthy_after`, the monitor's per-instance
schedule (no overlap, leader-only, changes followed, a dead loop restarted), kept-alive
connections (N checks at 0.5 s over one TCP connection, through the manager's own wiring), and
no failover of a service that stalls 1.5 s under the default settings."""

from __future__ import annotations

import asyncio
import itertools
import statistics
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from session_manager.config import Settings
from session_manager.dispatch import DispatchPolicy, MicroserviceClient
from session_manager.registry import Registry
from session_manager.registry.health import HealthMonitor, HealthResults, health_session
from session_manager.registry.registry import ServiceStatus
from session_manager.store import MemoryStore
from tests.polling import eventually as until
from tests.unit.test_input_limits import _offline_client, assert_refused, encode

REGISTER = "/api/v1/microservices/register"


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path) -> TestClient[Any, Any]:
    return await _offline_client(aiohttp_client, tmp_path)


def body(metadata: dict[str, Any]) -> dict[str, Any]:
    return {"service_id": "svc-1", "endpoint": "http://127.0.0.1:9", "metadata": metadata}


# the bounds ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "field_name"),
    [
        pytest.param({"health_interval": 0.49}, "health_interval", id="interval-0.49"),
        pytest.param({"health_interval": 3600.5}, "health_interval", id="interval-3600.5"),
        pytest.param({"health_interval": 0}, "health_interval", id="interval-0"),
        pytest.param({"health_interval": "1"}, "health_interval", id="interval-str"),
        pytest.param({"health_interval": True}, "health_interval", id="interval-bool"),
        pytest.param({"health_timeout": 0.05}, "health_timeout", id="timeout-0.05"),
        pytest.param({"health_timeout": 61}, "health_timeout", id="timeout-61"),
        pytest.param({"unhealthy_after": 0}, "unhealthy_after", id="after-0"),
        pytest.param({"unhealthy_after": 11}, "unhealthy_after", id="after-11"),
        pytest.param({"unhealthy_after": 2.0}, "unhealthy_after", id="after-float"),
    ],
)
async def test_health_settings_past_their_bounds_are_400_at_register_and_put(
    client: TestClient[Any, Any], metadata: dict[str, Any], field_name: str
) -> None:
    response = await client.post(REGISTER, data=encode(body(metadata)))
    await assert_refused(response, 400, "InvalidRequest", names=field_name)
    assert (await client.post(REGISTER, json=body({}))).status == 200
    update = await client.put("/api/v1/microservices/svc-1", data=encode({"metadata": metadata}))
    await assert_refused(update, 400, "InvalidRequest", names=field_name)


async def test_health_interval_1e400_is_400(client: TestClient[Any, Any]) -> None:
    raw = b'{"service_id": "s1", "endpoint": "http://127.0.0.1:9", '
    raw += b'"metadata": {"health_interval": 1e400}}'
    response = await client.post(REGISTER, data=raw)
    await assert_refused(response, 400, "InvalidRequest", names="health_interval")


@pytest.mark.parametrize(
    "metadata",
    [
        {"health_interval": 0.5, "health_timeout": 0.1, "unhealthy_after": 1},
        {"health_interval": 3600, "health_timeout": 60, "unhealthy_after": 10},
        {"health_interval": None, "health_timeout": None, "unhealthy_after": None},
    ],
)
async def test_health_settings_at_their_bounds_are_taken(
    client: TestClient[Any, Any], metadata: dict[str, Any]
) -> None:
    response = await client.post(REGISTER, json=body(metadata))
    assert response.status == 200, await response.text()
    view = await (await client.get("/api/v1/microservices/svc-1")).json()
    assert view["metadata"] == metadata


def test_a_service_s_own_unhealthy_after_wins_over_the_manager_s() -> None:
    registry = Registry(MemoryStore(), unhealthy_after=3)
    registry.register("quick", "http://127.0.0.1:9", {"unhealthy_after": 1})
    registry.register("usual", "http://127.0.0.1:9", {})
    assert registry.record_health("quick", "health timed out after 2.0s") is not None
    assert registry.get("quick").status is ServiceStatus.UNHEALTHY
    for _ in range(2):
        assert registry.record_health("usual", "health timed out after 2.0s") is None
    assert registry.get("usual").status is ServiceStatus.HEALTHY
    change = registry.record_health("usual", "health timed out after 2.0s")
    assert change is not None and change.new is ServiceStatus.UNHEALTHY


# the schedule ---------------------------------------------------------------------------------


@dataclass
class FakeHealth:
    """Answers checks at once (or, for ids in `held`, once `release` is set); counts them."""

    calls: list[tuple[str, float, float]] = field(default_factory=list)  # id, at, timeout
    in_flight: dict[str, int] = field(default_factory=dict)
    most_in_flight: int = 0
    held: set[str] = field(default_factory=set)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def check_health(
        self, endpoint: str, timeout: float, *, service_id: str | None = None
    ) -> str | None:
        assert service_id is not None
        self.calls.append((service_id, asyncio.get_running_loop().time(), timeout))
        self.in_flight[service_id] = self.in_flight.get(service_id, 0) + 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight[service_id])
        try:
            if service_id in self.held:
                await self.release.wait()
        finally:
            self.in_flight[service_id] -= 1
        return None

    def count(self, service_id: str) -> int:
        return sum(1 for called, _, _ in self.calls if called == service_id)


@dataclass
class Monitored:
    registry: Registry
    fake: FakeHealth
    results: list[HealthResults]
    monitor: HealthMonitor
    leads: list[bool]


@pytest.fixture
async def monitored() -> AsyncIterator[Monitored]:
    registry = Registry(MemoryStore())
    fake = FakeHealth()
    results: list[HealthResults] = []
    leads = [True]
    monitor = HealthMonitor(
        registry,
        fake,  # type: ignore[arg-type]
        interval=3600.0,
        timeout=2.0,
        on_results=results.append,
        should_check=lambda: leads[0],
    )
    await monitor.start()
    try:
        yield Monitored(registry, fake, results, monitor, leads)
    finally:
        await monitor.aclose()


async def test_each_instance_is_checked_on_its_own_interval(monitored: Monitored) -> None:
    monitored.registry.register("fast", "http://127.0.0.1:9", {"health_interval": 0.5})
    monitored.registry.register("slow", "http://127.0.0.1:9", {"health_timeout": 0.7})
    await until(lambda: monitored.fake.count("fast") >= 5)
    # The slow one (the manager's 3600 s) was checked once, at once, with its own timeout.
    assert [(sid, timeout) for sid, _, timeout in monitored.fake.calls if sid == "slow"] == [
        ("slow", 0.7)
    ]
    times = [at for sid, at, _ in monitored.fake.calls if sid == "fast"]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert all(0.4 <= gap <= 0.8 for gap in gaps), gaps  # 0.5 s ±10%, and a loaded machine
    assert {sid for batch in monitored.results for sid, _ in batch} == {"fast", "slow"}


async def test_a_check_never_overlaps_the_previous_one_of_its_instance(
    monitored: Monitored,
) -> None:
    monitored.fake.held.add("stuck")
    monitored.registry.register("stuck", "http://127.0.0.1:9", {"health_interval": 0.5})
    await until(lambda: monitored.fake.count("stuck") == 1)
    await asyncio.sleep(1.6)  # three intervals: still the one check
    assert monitored.fake.count("stuck") == 1
    monitored.fake.release.set()
    await until(lambda: monitored.fake.count("stuck") >= 2)
    assert monitored.fake.most_in_flight == 1


async def test_only_the_manager_that_leads_the_checks_makes_them(monitored: Monitored) -> None:
    monitored.leads[0] = False
    monitored.registry.register("led", "http://127.0.0.1:9", {"health_interval": 0.5})
    await asyncio.sleep(1.2)
    assert monitored.fake.count("led") == 0 and monitored.results == []
    monitored.leads[0] = True
    await until(lambda: monitored.fake.count("led") >= 1, timeout=2.0)


async def test_a_shorter_interval_takes_effect_and_a_gone_instance_is_no_longer_checked(
    monitored: Monitored,
) -> None:
    monitored.registry.register("svc", "http://127.0.0.1:9", {})
    await until(lambda: monitored.fake.count("svc") == 1)
    monitored.registry.update("svc", metadata={"health_interval": 0.5})
    await until(lambda: monitored.fake.count("svc") >= 3, timeout=3.0)
    monitored.registry.deregister("svc")
    await asyncio.sleep(0.7)  # one sync of the registry, and any check under way ends
    seen = monitored.fake.count("svc")
    await asyncio.sleep(1.0)
    assert monitored.fake.count("svc") == seen


class LoopKiller(BaseException):
    """Gets past the loop's own error handling, as a bug in asyncio or ours would."""


async def test_a_loop_that_dies_is_started_again() -> None:
    registry = Registry(MemoryStore())
    registry.register("svc", "http://127.0.0.1:9", {"health_interval": 0.5})
    fake = FakeHealth()
    results: list[HealthResults] = []

    def on_results(batch: HealthResults) -> None:
        results.append(batch)
        if len(results) == 1:
            raise LoopKiller()

    monitor = HealthMonitor(
        registry,
        fake,  # type: ignore[arg-type]
        interval=3600.0,
        timeout=2.0,
        on_results=on_results,
    )
    await monitor.start()
    try:
        await until(lambda: len(results) >= 3, timeout=5.0)
    finally:
        await monitor.aclose()


# over real HTTP -------------------------------------------------------------------------------


@dataclass
class HealthServer:
    """A service's /health that notes the client's address and port of every check (one
    per TCP connection) and may stall before it answers."""

    peers: list[tuple[str, int]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    stall_once: float = 0.0

    async def health(self, request: web.Request) -> web.Response:
        self.peers.append(request.transport.get_extra_info("peername")[:2])  # type: ignore[union-attr]
        self.times.append(asyncio.get_running_loop().time())
        if self.stall_once:
            stall, self.stall_once = self.stall_once, 0.0
            await asyncio.sleep(stall)
        return web.json_response({"status": "healthy"})


@pytest.fixture
async def health_server() -> AsyncIterator[tuple[HealthServer, str]]:
    server = HealthServer()
    app = web.Application()
    app.router.add_get("/health", server.health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_checks_every_half_second_reuse_one_connection(
    client: TestClient[Any, Any], health_server: tuple[HealthServer, str]
) -> None:
    server, endpoint = health_server
    metadata = {"health_interval": 0.5}
    registration = {"service_id": "kept", "endpoint": endpoint, "metadata": metadata}
    assert (await client.post(REGISTER, json=registration)).status == 200
    checks = 10
    await until(lambda: len(server.peers) >= checks, timeout=15.0)
    gaps = [b - a for a, b in itertools.pairwise(server.times)][: checks - 1]
    print(
        f"{len(server.peers)} checks over {len(set(server.peers))} TCP connection(s); "
        f"gap p50 {statistics.median(gaps):.3f} s, max {max(gaps):.3f} s"
    )
    assert len(set(server.peers[:checks])) == 1, server.peers
    assert 0.4 <= statistics.median(gaps) <= 0.8, gaps
    view = await (await client.get("/api/v1/microservices/kept")).json()
    assert view["status"] == "Healthy" and view["last_check_at"] is not None, view


async def test_a_service_that_stalls_1_5_s_is_not_failed_over_under_the_defaults(
    health_server: tuple[HealthServer, str],
) -> None:
    server, endpoint = health_server
    defaults = Settings.model_fields
    registry = Registry(MemoryStore(), unhealthy_after=defaults["unhealthy_after"].default)
    # The shortest interval a service may ask for; the manager's default timeout and count.
    registry.register("stalls", endpoint, {"health_interval": 0.5})
    timeout = defaults["health_timeout"].default
    errors: list[str | None] = []

    def record(results: HealthResults) -> None:
        for service_id, error in results:
            errors.append(error)
            registry.record_health(service_id, error)

    async with health_session(concurrency=4) as http:
        monitor = HealthMonitor(
            registry,
            MicroserviceClient(http, DispatchPolicy(timeout=timeout, attempts=1, backoff=0)),
            interval=defaults["health_interval"].default,
            timeout=timeout,
            on_results=record,
        )
        await monitor.start()
        try:
            await until(lambda: len(errors) >= 1)
            server.stall_once = 1.5
            await until(lambda: len(errors) >= 5, timeout=10.0)
        finally:
            await monitor.aclose()
    assert errors[:5] == [None] * 5
    assert registry.get("stalls").status is ServiceStatus.HEALTHY
