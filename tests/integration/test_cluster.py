"""Several managers on one Redis and one LiveKit (issue 10, part 2), in this test process: any
process answers any request, a session is changed only by the process that owns it, sessions a
process lets go are adopted by another, and an instance's capacity holds across processes.
The same with real processes killed with SIGKILL: tests/e2e/test_cluster.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from livekit import api

from session_manager.api.app import create_app
from session_manager.config import Settings
from tests.conftest import LiveKitUnderTest, RedisUnderTest, free_port, room_names
from tests.fake_services import ScriptedService, accept_without_joining, register
from tests.polling import eventually

pytestmark = pytest.mark.integration

Client = TestClient[web.Request, web.Application]


@pytest.fixture
def start_member(
    aiohttp_client: Any,
    livekit: LiveKitUnderTest,
    make_settings: Callable[..., Settings],
    redis_server: RedisUnderTest,
    redis_prefix: str,
) -> Callable[..., Any]:
    """Start one manager of the cluster: the first on the port LiveKit posts webhooks to."""
    ports = iter([livekit.webhook_port])

    async def start(**overrides: Any) -> Client:
        settings = make_settings(
            store="redis",
            redis_url=redis_server.url,
            redis_prefix=redis_prefix,
            deployment=redis_prefix.rstrip(":"),
            lease_ttl=1.0,
            **overrides,
        )
        client: Client = await aiohttp_client(
            create_app(settings), server_kwargs={"port": next(ports, None) or free_port()}
        )
        return client

    return start


async def json_of(response: Any, status: int = 200) -> dict[str, Any]:
    assert response.status == status, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def test_any_process_answers_for_any_session(start_member: Any) -> None:
    a, b = await start_member(), await start_member()
    async with ScriptedService(accept_without_joining).running() as service:
        await register(a, "late", service.endpoint, type="LATE")
        created = await json_of(
            await a.post(
                "/api/v1/create-session", json={"user_identity": "u", "required_services": []}
            )
        )
        sid = created["session_id"]

        read = await json_of(await b.get(f"/api/v1/sessions/{sid}"))
        assert read["status"] == "Ready"
        # B does not own the session: A's actor changes it, and B answers with A's view.
        added = await json_of(
            await b.post(f"/api/v1/sessions/{sid}/services", json={"service": "type:LATE"})
        )
        assert added["status"] == "WaitingForServices"
        assert [s["service_id"] for s in added["services"]] == ["late"]
        await eventually(lambda: bool(service.join_requests))
        assert [r["session_id"] for r in service.join_requests] == [sid]
        twice = await b.post(f"/api/v1/sessions/{sid}/services", json={"service": "late"})
        assert twice.status == 409
        assert (await twice.json())["error"] == "Conflict"

        ended = await json_of(await b.delete(f"/api/v1/sessions/{sid}"))
        assert ended["status"] == "Terminated"
        assert (await json_of(await a.get(f"/api/v1/sessions/{sid}")))["status"] == "Terminated"


async def test_a_registration_on_one_process_is_used_by_the_others(start_member: Any) -> None:
    a, b = await start_member(), await start_member()
    async with ScriptedService(accept_without_joining).running() as service:
        await register(a, "asr-1", service.endpoint, type="ASR")

        async def known_to_b() -> bool:
            return (await b.get("/api/v1/microservices/asr-1")).status == 200

        for _ in range(100):
            if await known_to_b():
                break
            await asyncio.sleep(0.05)
        created = await json_of(
            await b.post(
                "/api/v1/create-session",
                json={"user_identity": "u", "required_services": ["type:ASR"]},
            )
        )
        assert created["status"] == "WaitingForServices"
        await eventually(lambda: bool(service.join_requests))


async def test_sessions_a_stopping_process_keeps_are_adopted_by_another(
    start_member: Any, livekit_api: api.LiveKitAPI
) -> None:
    a = await start_member(shutdown_mode="keep")
    b = await start_member()
    created = await json_of(
        await a.post("/api/v1/create-session", json={"user_identity": "u", "required_services": []})
    )
    sid, room = created["session_id"], created["room_name"]

    await a.close()  # SIGTERM: the sessions stay, their leases are let go at once

    assert room in await room_names(livekit_api)
    # B owns it now: B's own actor ends it (the room goes), with nobody else to ask.
    for _ in range(100):
        response = await b.delete(f"/api/v1/sessions/{sid}")
        if response.status == 200:
            break
        await asyncio.sleep(0.05)
    assert (await response.json())["status"] == "Terminated"
    assert room not in await room_names(livekit_api)


async def test_an_instance_capacity_holds_across_processes(start_member: Any) -> None:
    a, b = await start_member(), await start_member()
    async with ScriptedService(accept_without_joining).running() as service:
        await register(a, "only", service.endpoint, type="ONE", max_sessions=1)
        for _ in range(100):
            if (await b.get("/api/v1/microservices/only")).status == 200:
                break
            await asyncio.sleep(0.05)
        body = {"user_identity": "u", "required_services": ["type:ONE"]}
        answers = await asyncio.gather(
            *(client.post("/api/v1/create-session", json=body) for client in (a, b) * 4)
        )
        statuses = sorted(response.status for response in answers)
        assert statuses.count(200) == 1, statuses
        assert set(statuses) == {200, 503}


async def test_each_instance_is_checked_once_per_interval_across_the_cluster(
    start_member: Any,
) -> None:
    """One process leads the health checks and shares what it finds; when it turns an
    instance Unhealthy, every process sees it so."""
    a, b = await start_member(health_interval=0.2), await start_member(health_interval=0.2)
    async with ScriptedService(accept_without_joining).running() as service:
        await register(a, "checked", service.endpoint, type="CHECKED")
        await eventually(lambda: service.health_checks >= 3)
        first, started = service.health_checks, asyncio.get_running_loop().time()
        await asyncio.sleep(2.0)
        rounds = (asyncio.get_running_loop().time() - started) / 0.2
        # One process checking: about one call a round (jitter ±10%), never two processes' worth.
        assert service.health_checks - first <= rounds * 1.3, (service.health_checks, rounds)

        service.healthy = False
        for client in (a, b):
            for _ in range(100):
                view = await json_of(await client.get("/api/v1/microservices/checked"))
                if view["status"] == "Unhealthy":
                    break
                await asyncio.sleep(0.05)
            assert view["status"] == "Unhealthy"


async def test_a_redis_outage_refuses_writes_then_heals(
    start_member: Any, redis_server: RedisUnderTest
) -> None:
    """While Redis is down: creates get the 503 envelope, /health says why, the sessions that
    run go on; when it is back, everything works again by itself, each session still owned by
    the process that had it."""
    a, b = await start_member(), await start_member()
    body = {"user_identity": "u", "required_services": []}
    running = await json_of(await a.post("/api/v1/create-session", json=body))

    redis_server.stop()
    try:
        for client in (a, b):
            for _ in range(100):
                health = await client.get("/health")
                if health.status == 503:
                    break
                await asyncio.sleep(0.1)
            assert health.status == 503
            refused = await client.post("/api/v1/create-session", json=body)
            assert refused.status == 503
            envelope = await refused.json()
            assert set(envelope) == {"error", "message", "timestamp"}
    finally:
        redis_server.start()

    for client in (a, b):
        for _ in range(100):
            if (await client.get("/health")).status == 200:
                break
            await asyncio.sleep(0.1)
        assert (await client.get("/health")).status == 200
        await json_of(await client.post("/api/v1/create-session", json=body))
    # The session that ran through the outage is still A's, and still works from B.
    ended = await json_of(await b.delete(f"/api/v1/sessions/{running['session_id']}"))
    assert ended["status"] == "Terminated"


async def test_a_process_chooses_the_instance_with_room_across_the_cluster(
    start_member: Any,
) -> None:
    """Two instances with one place each: with one taken by a session on A, B's next session
    goes to the other one (B reads the cluster's loads), instead of being refused."""
    a, b = await start_member(), await start_member()
    async with (
        ScriptedService(accept_without_joining).running() as one,
        ScriptedService(accept_without_joining).running() as two,
    ):
        await register(a, "inst-1", one.endpoint, type="TWO", max_sessions=1)
        await register(a, "inst-2", two.endpoint, type="TWO", max_sessions=1)
        body = {"user_identity": "u", "required_services": ["type:TWO"]}
        first = await json_of(await a.post("/api/v1/create-session", json=body))
        taken = first["session_id"]

        async def b_sees_the_load() -> bool:
            views = await json_of(await b.get("/api/v1/microservices"))
            return sum(v["sessions"] for v in views["microservices"]) == 1

        for _ in range(100):
            if await b_sees_the_load():
                break
            await asyncio.sleep(0.05)
        second = await json_of(await b.post("/api/v1/create-session", json=body))
        chosen = {
            s["service_id"]
            for sid in (taken, second["session_id"])
            for s in (await json_of(await a.get(f"/api/v1/sessions/{sid}")))["services"]
        }
        assert chosen == {"inst-1", "inst-2"}
