"""Why a slot moved and how long it took: a lost process moves its sessions at once and leaves
no ghost in the room; the view, the events and the failover histogram tell the cause and the
times. LiveKit and the microservices are in-memory fakes."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from session_manager.clock import utc_now
from session_manager.events import EventType
from session_manager.session.states import SessionStatus
from tests.unit.conftest import HarnessFactory
from tests.unit.session_harness import Harness
from tests.unit.test_failover_and_capacity import register_pongs, service_of

S = SessionStatus


async def serving(harness: Harness) -> tuple[Any, str, str]:
    """A Ready session served by one of pong-a / pong-b: (created, serving, the other)."""
    await register_pongs(harness, "pong-a", "pong-b")
    created = await harness.create(required_services=["type:PONG"])
    first = harness.microservices.requests[0].service_identity
    other = "pong-b" if first == "pong-a" else "pong-a"
    harness.joined(created, first, participant_sid="PA_first")
    await harness.until(created.session_id, S.READY)
    return created, first, other


def events_of(harness: Harness, kind: EventType) -> list[dict[str, Any]]:
    return [e.to_dict() for e in harness.events.since(0, types=[kind.value]).events]


async def test_a_lost_process_moves_its_session_at_once_and_leaves_no_ghost(
    make_harness: HarnessFactory,
) -> None:
    observed: list[tuple[str, float]] = []
    harness = await make_harness(on_failover=lambda cause, s: observed.append((cause, s)))
    created, first, other = await serving(harness)
    gone_at = utc_now() - timedelta(milliseconds=300)  # the grace it waited

    harness.supervisor.process_lost(first, gone_at)

    view = await harness.until_view(
        created.session_id, lambda v: service_of(v)["service_id"] == other
    )
    assert view["status"] == "WaitingForServices"
    failover = service_of(view)["failover"]
    assert failover["cause"] == "process lost" and failover["from_service_id"] == first
    assert failover["detect_ms"] >= 300 and failover["replaced_at"] is None
    await harness.eventually(
        lambda: (created.room_name, first) in harness.gateway.removed,
        f"{first} removed from the LiveKit room",
    )
    # A dead process is asked nothing: no leave-room to wait out a timeout for.
    assert (f"http://{first}", created.session_id) not in harness.microservices.left
    registration = harness.registry.get(first)
    assert (registration.status.value, registration.last_error) == ("Unhealthy", "process lost")
    (health,) = events_of(harness, EventType.MICROSERVICE_HEALTH_CHANGED)
    assert health["data"]["error"] == "process lost" and health["data"]["detect_ms"] >= 300
    redispatch = events_of(harness, EventType.MICROSERVICE_DISPATCHED)[-1]
    assert redispatch["service_id"] == other
    assert redispatch["data"]["cause"] == "process lost"
    assert redispatch["data"]["from_service_id"] == first

    harness.joined(created, other, participant_sid="PA_other")
    view = await harness.until(created.session_id, S.READY)
    failover = service_of(view)["failover"]
    assert failover["replaced_at"] is not None
    total = failover["detect_ms"] + failover["replace_ms"]
    assert abs(failover["failover_ms"] - total) < 0.2  # each rounded to 0.1 ms
    assert observed and observed[0][0] == "process lost"
    assert abs(observed[0][1] * 1000 - failover["failover_ms"]) < 1
    joined = events_of(harness, EventType.MICROSERVICE_JOINED)[-1]
    assert joined["service_id"] == other and joined["data"]["cause"] == "process lost"
    assert joined["data"]["failover_ms"] == failover["failover_ms"]

    # The removed participant's participant_left comes later: it is not the replacement's.
    harness.left(created, first, participant_sid="PA_first")
    await harness.inbox_handled(created.session_id)
    view = await harness.view(created.session_id)
    assert view["status"] == "Ready"
    slot = service_of(view)
    assert (slot["service_id"], slot["state"], slot["redispatches"]) == (other, "joined", 1)


async def test_a_late_leave_of_an_earlier_connection_is_ignored_when_the_slot_came_back(
    harness: Harness,
) -> None:
    """The slot moved away and back to the same identity: the old connection's leave names
    the identity the slot holds again, but not its connection (participant sid)."""
    created, first, other = await serving(harness)
    harness.supervisor.process_lost(first, utc_now())
    await harness.until_view(created.session_id, lambda v: service_of(v)["service_id"] == other)
    harness.joined(created, other, participant_sid="PA_other")
    await harness.until(created.session_id, S.READY)
    for _ in range(2):  # healthy_after=2: the restarted first is back
        harness.supervisor.health_checked([(first, None)])
    harness.supervisor.process_lost(other, utc_now())
    await harness.until_view(created.session_id, lambda v: service_of(v)["service_id"] == first)
    harness.joined(created, first, participant_sid="PA_first_again")
    await harness.until(created.session_id, S.READY)

    harness.left(created, first, participant_sid="PA_first")  # the first connection, late
    await harness.inbox_handled(created.session_id)
    view = await harness.view(created.session_id)
    assert view["status"] == "Ready" and service_of(view)["state"] == "joined"


async def test_a_drop_that_ends_within_the_supervisor_twice_moves_once(harness: Harness) -> None:
    created, first, other = await serving(harness)
    harness.supervisor.process_lost(first, utc_now())
    harness.supervisor.process_lost(first, utc_now())  # told by two processes of a cluster
    harness.supervisor.health_checked([(first, "connection refused")] * 2)
    view = await harness.until_view(
        created.session_id, lambda v: service_of(v)["service_id"] == other
    )
    await harness.inbox_handled(created.session_id)
    view = await harness.view(created.session_id)
    assert service_of(view)["service_id"] == other and service_of(view)["redispatches"] == 1
    assert len(events_of(harness, EventType.MICROSERVICE_HEALTH_CHANGED)) == 1


async def test_a_service_that_leaves_while_draining_hands_over_as_drain(harness: Harness) -> None:
    created, first, other = await serving(harness)
    harness.registry.update(first, draining=True)
    harness.left(created, first, participant_sid="PA_first")
    view = await harness.until_view(
        created.session_id, lambda v: service_of(v)["service_id"] == other
    )
    failover = service_of(view)["failover"]
    assert (failover["cause"], failover["from_service_id"]) == ("drain", first)
    assert harness.registry.get(first).status.value == "Healthy"  # no failure counted


async def test_a_service_that_leaves_the_room_moves_as_left_room(harness: Harness) -> None:
    created, first, _ = await serving(harness)
    harness.left(created, first, participant_sid="PA_first")
    view = await harness.until_view(created.session_id, lambda v: service_of(v)["failover"])
    failover = service_of(view)["failover"]
    assert failover["cause"] == "left room" and failover["detect_ms"] is None


async def test_an_unhealthy_instance_moves_as_health(harness: Harness) -> None:
    created, first, other = await serving(harness)
    harness.supervisor.health_checked([(first, "health check timed out")] * 2)
    view = await harness.until_view(
        created.session_id, lambda v: service_of(v)["service_id"] == other
    )
    assert service_of(view)["failover"]["cause"] == "health"
    await harness.eventually(
        lambda: (created.room_name, first) in harness.gateway.removed,
        f"{first} removed from the LiveKit room",
    )
