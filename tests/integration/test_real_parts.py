"""Choice, capacity, giving up and health, proven against real parts: the in-process manager on
the real livekit-server, its real health monitor, and microservices that are real HTTP servers
on loopback (tests/fake_services.py). tests/unit/test_failover_and_capacity.py proves the same
claims with fakes; what needs a service really in the room, a user really connecting or the SDK
in its own process is in tests/e2e/test_real_rooms.py and tests/e2e/test_sdk_process.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from livekit import api

from tests.conftest import FAST_SETTINGS, room_names
from tests.fake_services import (
    ScriptedService,
    accept_without_joining,
    fail_with_500,
    register,
    wait_until,
)
from tests.integration.test_sessions import assert_envelope

pytestmark = pytest.mark.integration

JsonDict = dict[str, Any]


async def create(manager: Any, user: str, required: list[str], **body: Any) -> JsonDict:
    response = await manager.post(
        "/api/v1/create-session",
        json={"user_identity": user, "required_services": required, **body},
    )
    assert response.status == 200, await response.text()
    answer: JsonDict = await response.json()
    return answer


async def session(manager: Any, session_id: str) -> JsonDict:
    response = await manager.get(f"/api/v1/sessions/{session_id}")
    assert response.status == 200, await response.text()
    view: JsonDict = await response.json()
    return view


async def microservice(manager: Any, service_id: str) -> JsonDict:
    response = await manager.get(f"/api/v1/microservices/{service_id}")
    assert response.status == 200, await response.text()
    view: JsonDict = await response.json()
    return view


async def load(manager: Any, service_type: str) -> dict[str, int]:
    """Sessions counted against each instance of a type, as the registry reports them."""
    response = await manager.get(f"/api/v1/microservices?type={service_type}")
    assert response.status == 200, await response.text()
    listing = (await response.json())["microservices"]
    return {entry["service_id"]: entry["sessions"] for entry in listing}


def only_slot(view: JsonDict) -> JsonDict:
    [slot] = view["services"]
    result: JsonDict = slot
    return result


def sessions_sent_to(service: ScriptedService) -> list[str]:
    return [join["session_id"] for join in service.join_requests]


# choice and capacity -----------------------------------------------------------------------


async def test_a_burst_spreads_over_the_instances_of_a_type_and_an_ended_session_frees_its_place(
    start_manager: Any, livekit_api: api.LiveKitAPI
) -> None:
    # The services say yes and never join: every session keeps its place while the test runs.
    manager = await start_manager(join_timeout=300.0)
    async with (
        ScriptedService(accept_without_joining).running() as service_a,
        ScriptedService(accept_without_joining).running() as service_b,
    ):
        instances = {"burst-a": service_a, "burst-b": service_b}
        for service_id, service in instances.items():
            await register(manager, service_id, service.endpoint, type="BURST", max_sessions=3)

        burst = await asyncio.gather(
            *(create(manager, f"burst-user-{n}", ["type:BURST"]) for n in range(4))
        )
        # Not 3 + 1: each session counts against its instance from the moment it is chosen.
        assert {sid: len(sessions_sent_to(s)) for sid, s in instances.items()} == {
            "burst-a": 2,
            "burst-b": 2,
        }
        assert {*sessions_sent_to(service_a), *sessions_sent_to(service_b)} == {
            created["session_id"] for created in burst
        }
        assert await load(manager, "BURST") == {"burst-a": 2, "burst-b": 2}

        for n in range(2):
            await create(manager, f"fill-user-{n}", ["type:BURST"])
        assert await load(manager, "BURST") == {"burst-a": 3, "burst-b": 3}
        rooms_when_full = await room_names(livekit_api)
        refused = await manager.post(
            "/api/v1/create-session",
            json={"user_identity": "one-too-many", "required_services": ["type:BURST"]},
        )
        assert refused.status == 503
        body = await refused.json()
        assert_envelope(body, "NoCapacity")
        assert body["message"] == "No available microservice of type BURST"
        assert await room_names(livekit_api) == rooms_when_full

        ending = sessions_sent_to(service_a)[0]
        ended = await manager.delete(f"/api/v1/sessions/{ending}")
        assert ended.status == 200
        assert (await ended.json())["status"] == "Terminated"
        assert [leave["session_id"] for leave in service_a.leave_requests] == [ending]
        await wait_until(
            lambda: load(manager, "BURST"),
            lambda seen: seen == {"burst-a": 2, "burst-b": 3},
            "the ended session's place given back",
        )

        again = await create(manager, "after-the-end", ["type:BURST"])
        assert sessions_sent_to(service_a)[-1] == again["session_id"]
        assert only_slot(await session(manager, again["session_id"]))["service_id"] == "burst-a"
        assert await load(manager, "BURST") == {"burst-a": 3, "burst-b": 3}


# giving up ---------------------------------------------------------------------------------


async def test_a_slot_whose_dispatch_keeps_failing_gives_up_after_max_redispatch_and_answers(
    start_manager: Any, livekit_api: api.LiveKitAPI
) -> None:
    manager = await start_manager(max_redispatch=2)
    async with (
        ScriptedService(fail_with_500).running() as service_a,
        ScriptedService(fail_with_500).running() as service_b,
    ):
        instances = {"flaky-a": service_a, "flaky-b": service_b}
        for service_id, service in instances.items():
            await register(manager, service_id, service.endpoint, type="FLAKY")
        rooms_before = await room_names(livekit_api)

        response = await manager.post(
            "/api/v1/create-session",
            json={
                "user_identity": "patient-user",
                "required_services": ["type:FLAKY"],
                "wait_until_ready": True,
                "timeout_secs": 30,  # the join deadline: a slot that never gives up ends here
            },
        )
        assert response.status == 502, await response.text()
        body = await response.json()
        assert_envelope(body, "MicroserviceUnavailable")
        assert body["message"].startswith("microservice type:FLAKY could not join: "), body
        assert body["message"].endswith("(gave up after 2 redispatches)"), body

        # Three dispatches of dispatch_attempts join-room calls each: the first instance, the
        # same instance once more, then the other instance; then max_redispatch (2) is spent.
        attempts = FAST_SETTINGS["dispatch_attempts"]
        counts = {sid: len(s.join_requests) for sid, s in instances.items()}
        assert sorted(counts.values()) == [attempts, 2 * attempts], counts
        last = next(sid for sid, count in counts.items() if count == attempts)
        [session_id] = {join["session_id"] for s in instances.values() for join in s.join_requests}

        view = await session(manager, session_id)
        assert view["status"] == "Terminated", view
        assert view["reason"] == body["message"], view
        slot = only_slot(view)
        assert slot["service_id"] == last and slot["redispatches"] == 2, slot
        assert await room_names(livekit_api) == rooms_before
        assert await load(manager, "FLAKY") == {"flaky-a": 0, "flaky-b": 0}


# health ------------------------------------------------------------------------------------


async def test_an_instance_found_unhealthy_by_the_monitor_is_kept_when_nothing_can_replace_it(
    start_manager: Any,
) -> None:
    manager = await start_manager(
        health_interval=0.2, health_timeout=1.0, unhealthy_after=2, join_timeout=300.0
    )
    async with (
        ScriptedService(accept_without_joining).running() as failing,
        ScriptedService(accept_without_joining).running() as steady,
    ):
        # One server behind two instances: its /health fails for both at once.
        await register(manager, "keep-1", failing.endpoint, type="KEEP")
        await register(manager, "move-1", failing.endpoint, type="MOVE")
        kept = (await create(manager, "kept-user", ["type:KEEP"]))["session_id"]
        witness = (await create(manager, "witness-user", ["type:MOVE"]))["session_id"]
        await register(manager, "move-2", steady.endpoint, type="MOVE")  # a stand-in for MOVE only

        failing.healthy = False
        # The monitor's verdict reaches the sessions: the witness, which has a stand-in, moves.
        moved = await wait_until(
            lambda: session(manager, witness),
            lambda view: only_slot(view)["service_id"] == "move-2",
            "the witness session moved to move-2",
        )
        assert only_slot(moved)["redispatches"] == 1, moved
        # Each instance is checked on its own schedule, so keep-1's verdict may come a beat later.
        unhealthy = await wait_until(
            lambda: microservice(manager, "keep-1"),
            lambda view: view["status"] == "Unhealthy",
            "keep-1 found unhealthy by the monitor",
        )
        assert "500" in unhealthy["last_error"], unhealthy
        # keep-1 is Unhealthy, so its loss is in the kept session's inbox; any request to that
        # session is answered after it, and this one changes nothing.
        barrier = await manager.post(
            f"/api/v1/sessions/{kept}/services", json={"service": "keep-1"}
        )
        assert barrier.status == 409
        assert_envelope(await barrier.json(), "Conflict")

        view = await session(manager, kept)
        assert view["status"] == "WaitingForServices" and view["reason"] is None, view
        slot = only_slot(view)
        assert slot["service_id"] == "keep-1", slot
        assert slot["redispatches"] == 0 and slot["state"] == "dispatched", slot
        assert sessions_sent_to(failing).count(kept) == 1
        assert kept not in [leave["session_id"] for leave in failing.leave_requests]
        assert (await load(manager, "KEEP")) == {"keep-1": 1}
