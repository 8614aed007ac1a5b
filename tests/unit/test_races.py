"""Races between a session's requests, its services and LiveKit's webhooks (issue 8, part 6),
with LiveKit and the microservices replaced by in-memory fakes whose timing the test holds."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from session_manager.commands import AddSessionService, DeleteSession, RemoveSessionService
from session_manager.errors import Conflict, InvalidRequest, SessionGone
from session_manager.events import EventType
from session_manager.livekit.webhooks import ROLE_CLIENT
from session_manager.session.messages import SessionCreated
from session_manager.session.states import SessionStatus
from tests.unit.session_harness import Harness

S = SessionStatus


def register(harness: Harness, *ids: str) -> None:
    for service_id in ids:
        harness.registry.register(service_id, f"http://{service_id}", {"type": "PONG"})


async def until(condition: Any, what: str) -> None:
    """Wait (bounded) for a condition the actor makes true by handling its inbox."""
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 (the actor's state is what is polled)
            await asyncio.sleep(0.005)
    assert condition(), what


def events_of(harness: Harness, session_id: str, kind: EventType) -> list[Any]:
    return [
        event
        for event in harness.events.since(0).events
        if event.session_id == session_id and event.type == kind
    ]


async def test_removing_a_service_whose_join_room_is_out_answers_the_creator(
    harness: Harness,
) -> None:
    register(harness, "slow", "fast")
    harness.microservices.gates["slow"] = asyncio.Event()  # never opened
    create = asyncio.create_task(harness.create(required_services=["slow", "fast"]))
    await until(lambda: len(harness.microservices.requests) == 2, "both dispatched")
    session_id = harness.microservices.requests[0].session_id

    view = await harness.ask(lambda r: RemoveSessionService(session_id, "slow", r))

    created: SessionCreated = await asyncio.wait_for(create, 5)
    assert created.session_id == session_id
    assert [s["service_id"] for s in view["services"]] == ["fast"]
    await until(lambda: harness.microservices.cancelled == ["slow"], "slow's call cancelled")


async def test_a_replaced_instance_join_room_is_cancelled_and_removed_if_it_joins(
    harness: Harness,
) -> None:
    register(harness, "pong-a", "pong-b")
    harness.microservices.gates["pong-a"] = asyncio.Event()
    harness.microservices.gates["pong-b"] = asyncio.Event()
    create = asyncio.create_task(harness.create(required_services=["type:PONG"]))
    await until(lambda: len(harness.microservices.requests) == 1, "dispatched")
    first = harness.microservices.requests[0]
    other = "pong-b" if first.service_identity == "pong-a" else "pong-a"

    # The health monitor finds the first instance unhealthy while its join-room is still out.
    for _ in range(2):  # unhealthy_after=2 in the harness
        harness.supervisor.health_checked([(first.service_identity, "health check timed out")])
    await until(
        lambda: harness.microservices.cancelled == [first.service_identity], "first cancelled"
    )
    assert harness.microservices.requests[-1].service_identity == other

    harness.microservices.gates[other].set()
    created = await asyncio.wait_for(create, 5)
    # The first instance joins anyway, with the token it was given: it is sent out of the room.
    harness.joined(created, first.service_identity)
    await until(
        lambda: harness.gateway.removed == [(created.room_name, first.service_identity)],
        "stale instance removed",
    )
    view = await harness.view(created.session_id)
    assert [s["service_id"] for s in view["services"]] == [other]


async def test_a_participant_left_of_an_earlier_connection_is_ignored(harness: Harness) -> None:
    register(harness, "pong")
    created = await harness.create(required_services=["pong"])
    harness.joined(created, "pong", participant_sid="PA_old")
    await harness.until(created.session_id, S.READY)
    # It reconnected: LiveKit reports the new connection, then the end of the old one.
    harness.joined(created, "pong", participant_sid="PA_new")
    harness.left(created, "pong", participant_sid="PA_old")
    harness.joined(created, "user123", ROLE_CLIENT, participant_sid="PA_user")
    view = await harness.until(created.session_id, S.ACTIVE)

    assert view["services"][0]["state"] == "joined"
    assert events_of(harness, created.session_id, EventType.MICROSERVICE_LEFT) == []
    assert harness.microservices.requests[-1].service_identity == "pong"
    assert len(harness.microservices.requests) == 1  # no redispatch


async def test_a_client_left_of_an_earlier_connection_is_ignored(harness: Harness) -> None:
    created = await harness.create(required_services=[])
    harness.joined(created, "user123", ROLE_CLIENT, participant_sid="PA_1")
    harness.joined(created, "user123", ROLE_CLIENT, participant_sid="PA_2")
    harness.left(created, "user123", ROLE_CLIENT, participant_sid="PA_1")
    # The join of the connection already known changes nothing (LiveKit may resend it).
    harness.joined(created, "user123", ROLE_CLIENT, participant_sid="PA_2")
    await harness.inbox_handled(created.session_id)
    view = await harness.view(created.session_id)
    assert view["client"]["joined"] is True
    assert len(events_of(harness, created.session_id, EventType.CLIENT_JOINED)) == 2
    assert events_of(harness, created.session_id, EventType.CLIENT_LEFT) == []


async def test_a_webhook_delivered_twice_is_acted_on_once(harness: Harness) -> None:
    created = await harness.create(required_services=[])
    for _ in range(2):
        harness.joined(created, "user123", ROLE_CLIENT, event_id="EV_1", participant_sid="PA_1")
    harness.left(created, "user123", ROLE_CLIENT, event_id="EV_2", participant_sid="PA_1")
    harness.left(created, "user123", ROLE_CLIENT, event_id="EV_2", participant_sid="PA_1")
    await harness.until_view(created.session_id, lambda v: v["client"]["left_at"] is not None)
    # One more distinct webhook: once it is seen, every earlier one has been handled.
    harness.joined(created, "user123", ROLE_CLIENT, event_id="EV_3", participant_sid="PA_2")
    await harness.until_view(created.session_id, lambda v: v["client"]["joined"])
    assert len(events_of(harness, created.session_id, EventType.CLIENT_JOINED)) == 2
    assert len(events_of(harness, created.session_id, EventType.CLIENT_LEFT)) == 1


async def test_a_create_that_loses_to_delete_answers_409(harness: Harness) -> None:
    register(harness, "pong")
    harness.microservices.gates["pong"] = asyncio.Event()
    create = asyncio.create_task(harness.create(required_services=["pong"]))
    await until(lambda: len(harness.microservices.requests) == 1, "dispatched")
    session_id = harness.microservices.requests[0].session_id

    ended = await harness.ask(lambda r: DeleteSession(session_id, r))

    assert ended["status"] == "Terminated"
    with pytest.raises(SessionGone) as lost:
        await asyncio.wait_for(create, 5)
    assert (lost.value.status, lost.value.code) == (409, "SessionTerminated")


async def test_a_create_that_loses_to_room_finished_answers_409(harness: Harness) -> None:
    register(harness, "pong")
    harness.microservices.gates["pong"] = asyncio.Event()
    create = asyncio.create_task(harness.create(required_services=["pong"]))
    await until(lambda: len(harness.microservices.requests) == 1, "dispatched")
    room = harness.microservices.requests[0].room_name

    harness.webhook("room_finished", room)

    with pytest.raises(SessionGone) as lost:
        await asyncio.wait_for(create, 5)
    assert lost.value.status == 409


async def test_a_user_identity_that_is_a_required_service_is_refused(harness: Harness) -> None:
    register(harness, "pong")
    with pytest.raises(InvalidRequest, match="user_identity"):
        await harness.create(user_identity="pong", required_services=["pong"])


async def test_a_type_requirement_never_picks_the_user_identity(harness: Harness) -> None:
    register(harness, "pong-a", "pong-b")
    for _ in range(3):
        await harness.create(user_identity="pong-a", required_services=["type:PONG"])
    assert {r.service_identity for r in harness.microservices.requests} == {"pong-b"}


async def test_default_services_leave_out_the_user_identity(harness: Harness) -> None:
    register(harness, "pong-a", "pong-b")
    created = await harness.create(user_identity="pong-a")
    view = await harness.view(created.session_id)
    assert [s["service_id"] for s in view["services"]] == ["pong-b"]


async def test_adding_the_user_identity_as_a_service_is_a_conflict(harness: Harness) -> None:
    register(harness, "pong-a")
    created = await harness.create(user_identity="pong-a", required_services=[])
    with pytest.raises(Conflict, match="user's identity"):
        await harness.ask(lambda r: AddSessionService(created.session_id, "pong-a", r))


async def test_a_late_leave_of_the_connection_before_a_redispatch_is_ignored(
    harness: Harness,
) -> None:
    register(harness, "pong")
    created = await harness.create(required_services=["pong"])
    harness.joined(created, "pong", participant_sid="PA_1")
    await harness.until(created.session_id, S.READY)
    harness.left(created, "pong", participant_sid="PA_1")  # gone: redispatched in place
    await until(lambda: len(harness.microservices.requests) == 2, "redispatched")
    # LiveKit reports the old connection's end a second time, before the new one joined.
    harness.left(created, "pong", participant_sid="PA_1")
    harness.joined(created, "pong", participant_sid="PA_2")
    view = await harness.until(created.session_id, S.READY)

    assert view["services"][0]["redispatches"] == 1
    assert len(harness.microservices.requests) == 2
    assert len(events_of(harness, created.session_id, EventType.MICROSERVICE_LEFT)) == 1
