"""Sessions outlive the manager process (issue 10, part 1), driven through the supervisor with
in-memory LiveKit and microservices: a shutdown that keeps sessions, and a start that takes over
what the previous process left — adopted with their timers and the room's participants, or ended
with a reason. The same over a real LiveKit and real processes: tests/e2e/test_restart.py."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from session_manager.clock import rfc3339, utc_now
from session_manager.commands import DeleteSession
from session_manager.errors import ShuttingDown, StoreUnavailable
from session_manager.livekit.webhooks import (
    ROLE_ATTRIBUTE,
    ROLE_CLIENT,
    ROLE_SERVICE,
    SESSION_ATTRIBUTE,
    RoomEvent,
)
from session_manager.session.actor import SHUT_DOWN_BEFORE_ANSWER
from session_manager.session.deps import room_metadata
from session_manager.session.messages import SessionCreated
from session_manager.session.record import SessionRecord
from session_manager.session.states import SessionStatus
from session_manager.store import MemoryStore
from session_manager.takeover import CREATE_INTERRUPTED, ROOM_LOST
from tests.unit.conftest import HarnessFactory
from tests.unit.session_harness import FakeGateway, Harness

S = SessionStatus


def present(created: SessionCreated, identity: str, role: str, sid: str) -> RoomEvent:
    """A participant LiveKit lists in the session's room."""
    attributes = {ROLE_ATTRIBUTE: role, SESSION_ATTRIBUTE: created.session_id}
    return RoomEvent(
        "participant_joined",
        created.room_name,
        identity=identity,
        participant_sid=sid,
        role=role,
        attributes=attributes,
    )


async def active_session(harness: Harness) -> SessionCreated:
    """A session whose service `asr` and user `user123` are in the room."""
    harness.registry.register("asr", "http://asr", {"type": "ASR"})
    created = await harness.create(required_services=["asr"])
    harness.joined(created, "asr", participant_sid="PA_asr")
    harness.joined(created, "user123", ROLE_CLIENT, participant_sid="PA_user")
    await harness.until(created.session_id, S.ACTIVE)
    return created


async def restarted(make_harness: HarnessFactory, before: Harness) -> Harness:
    """A new manager on the store and LiveKit the previous one left, with `asr` registered."""
    assert before.store is not None
    after = await make_harness(store=before.store, gateway=before.gateway, take_over=True)
    if after.registry.find("asr") is None:
        after.registry.register("asr", "http://asr", {"type": "ASR"})
    return after


async def stored(harness: Harness, session_id: str) -> dict[str, object]:
    assert harness.store is not None
    view = await harness.store.get_session(session_id)
    assert view is not None
    return view


# --------------------------------------------------------------------------- keeping at shutdown


async def test_a_keeping_shutdown_leaves_rooms_services_and_status_as_they_are(
    make_harness: HarnessFactory,
) -> None:
    harness = await make_harness(keep_sessions_at_shutdown=True)
    created = await active_session(harness)

    await harness.supervisor.aclose(timeout=2)

    view = await stored(harness, created.session_id)
    assert view["status"] == "Active"
    assert created.room_name in harness.gateway.rooms
    assert harness.gateway.deleted == []
    assert harness.microservices.left == []  # no leave-room: the service stays with its user
    assert harness.events.since(0, types=["SessionTerminated"]).events == []


async def test_a_keeping_shutdown_ends_a_session_whose_creator_still_waits(
    make_harness: HarnessFactory,
) -> None:
    """Nobody holds its token yet: the creator is told to retry (503) and nothing is left."""
    harness = await make_harness(keep_sessions_at_shutdown=True)
    harness.registry.register("asr", "http://asr", {"type": "ASR"})
    # The create waits until asr joins, which it never does.
    task = asyncio.ensure_future(harness.create(required_services=["asr"], wait_until_ready=True))
    await harness.eventually(lambda: bool(harness.microservices.requests), "join-room sent")

    await harness.supervisor.aclose(timeout=2)

    with pytest.raises(ShuttingDown):
        await task
    sessions = await harness.store.list_sessions(  # type: ignore[union-attr]
        status=None, user_identity=None, limit=10, before=None
    )
    assert [(v["status"], v["reason"]) for v in sessions] == [
        ("Terminated", SHUT_DOWN_BEFORE_ANSWER)
    ]
    assert harness.gateway.rooms == set()


# ------------------------------------------------------------------------------ taking over


async def test_a_restart_adopts_the_session_and_sees_who_is_still_there(
    make_harness: HarnessFactory,
) -> None:
    before = await make_harness(keep_sessions_at_shutdown=True)
    created = await active_session(before)
    await before.supervisor.aclose(timeout=2)
    before.gateway.participants[created.room_name] = [
        present(created, "asr", ROLE_SERVICE, "PA_asr"),
        present(created, "user123", ROLE_CLIENT, "PA_user"),
    ]

    after = await restarted(make_harness, before)

    view = await after.view(created.session_id)
    assert view["status"] == "Active"
    assert view["client"]["joined"] is True
    assert [s["state"] for s in view["services"]] == ["joined"]
    assert after.microservices.requests == []  # nobody dispatched again
    adopted = after.events.since(0, types=["SessionAdopted"]).events
    assert [e.session_id for e in adopted] == [created.session_id]
    # The webhooks of the connections already seen change nothing (LiveKit may resend them).
    after.joined(created, "asr", participant_sid="PA_asr")
    await after.inbox_handled(created.session_id)
    assert after.events.since(0, types=["MicroserviceJoined"]).events == []
    # ... and the adopted actor is the one that ends it.
    await after.ask(lambda r: DeleteSession(created.session_id, r))
    assert (await after.until(created.session_id, S.TERMINATED))["reason"]
    assert created.room_name in after.gateway.deleted


async def test_what_happened_while_no_manager_ran_counts(make_harness: HarnessFactory) -> None:
    """The service left the room meanwhile: it is dispatched again and the session waits for
    it. The user had left too: the reconnect grace starts."""
    before = await make_harness(keep_sessions_at_shutdown=True)
    created = await active_session(before)
    await before.supervisor.aclose(timeout=2)
    before.gateway.participants[created.room_name] = []  # both gone

    after = await restarted(make_harness, before)

    view = await after.until(created.session_id, S.WAITING_FOR_SERVICES)
    assert view["client"]["joined"] is False
    assert "client_reconnect" in view["deadlines"]
    assert [r.service_identity for r in after.microservices.requests] == ["asr"]
    kinds = [e.type for e in after.events.since(0).events]
    assert "MicroserviceLeft" in kinds and "ClientLeft" in kinds
    after.joined(created, "asr", participant_sid="PA_asr2")
    after.joined(created, "user123", ROLE_CLIENT, participant_sid="PA_user2")
    await after.until(created.session_id, S.ACTIVE)


async def test_a_service_that_joined_while_no_manager_ran_counts(
    make_harness: HarnessFactory,
) -> None:
    before = await make_harness(keep_sessions_at_shutdown=True)
    before.registry.register("asr", "http://asr", {"type": "ASR"})
    created = await before.create(required_services=["asr"])
    await before.supervisor.aclose(timeout=2)
    assert (await stored(before, created.session_id))["status"] == "WaitingForServices"
    before.gateway.participants[created.room_name] = [
        present(created, "asr", ROLE_SERVICE, "PA_asr")
    ]

    after = await restarted(make_harness, before)

    view = await after.until(created.session_id, S.READY)
    assert [s["state"] for s in view["services"]] == ["joined"]
    assert after.microservices.requests == []


async def test_a_service_still_joining_is_asked_again(make_harness: HarnessFactory) -> None:
    """Its join-room answer may have been lost with the previous process."""
    before = await make_harness(keep_sessions_at_shutdown=True)
    before.registry.register("asr", "http://asr", {"type": "ASR"})
    created = await before.create(required_services=["asr"])
    await before.supervisor.aclose(timeout=2)

    after = await restarted(make_harness, before)

    await after.eventually(lambda: bool(after.microservices.requests), "join-room sent again")
    assert [r.session_id for r in after.microservices.requests] == [created.session_id]
    after.joined(created, "asr")
    await after.until(created.session_id, S.READY)


async def test_an_instance_of_this_session_no_slot_wants_is_removed(
    make_harness: HarnessFactory,
) -> None:
    before = await make_harness(keep_sessions_at_shutdown=True)
    created = await active_session(before)
    await before.supervisor.aclose(timeout=2)
    before.gateway.participants[created.room_name] = [
        present(created, "asr", ROLE_SERVICE, "PA_asr"),
        present(created, "user123", ROLE_CLIENT, "PA_user"),
        present(created, "asr-old", ROLE_SERVICE, "PA_old"),  # replaced, joined anyway
    ]

    after = await restarted(make_harness, before)

    await after.eventually(lambda: bool(after.gateway.removed), "the stray instance removed")
    assert after.gateway.removed == [(created.room_name, "asr-old")]
    assert (await after.view(created.session_id))["status"] == "Active"


async def test_sessions_that_cannot_be_adopted_end_with_a_reason(
    make_harness: HarnessFactory,
) -> None:
    """Room gone: "room lost". Left in Creating (its creator never had an answer): ended, room
    deleted. Left Terminating: finished. A room of ours no session knows: deleted."""
    store, gateway = MemoryStore(), FakeGateway()
    lost = SessionRecord("lost", "room-lost", "u1", None, {}, status=S.ACTIVE)
    creating = SessionRecord("creating", "room-creating", "u2", None, {})
    ending = SessionRecord("ending", "room-ending", "u3", None, {}, status=S.TERMINATING)
    ending.reason = "terminated by request"
    for record in (lost, creating, ending):
        store.save_session(record.view())
    gateway.rooms |= {"room-creating", "room-ending", "room-stray", "room-not-ours"}
    gateway.metadata["room-stray"] = room_metadata("default", creating)
    gateway.metadata["room-not-ours"] = '{"session_manager": "another-deployment"}'

    after = await make_harness(store=store, gateway=gateway, take_over=True)

    assert (await after.view("lost"))["reason"] == ROOM_LOST
    assert (await after.view("creating"))["reason"] == CREATE_INTERRUPTED
    assert (await after.view("ending"))["reason"] == "terminated by request"
    for session_id in ("lost", "creating", "ending"):
        assert (await after.view(session_id))["status"] == "Terminated"
    assert gateway.rooms == {"room-not-ours"}
    ended = after.events.since(0, types=["SessionTerminated"]).events
    assert sorted(e.session_id or "" for e in ended) == ["creating", "ending", "lost"]


# ------------------------------------------------------------------------------------ timers


@pytest.mark.looptime
async def test_adopted_timers_fire_when_they_were_due(make_harness: HarnessFactory) -> None:
    """Deadlines are stored with the view, as moments: the next process fires them then, not a
    whole period later."""
    store, gateway = MemoryStore(), FakeGateway()
    record = SessionRecord(
        "limited", "room-limited", "u", None, {"duration_limit": 600}, status=S.READY
    )
    record.deadlines["duration_limit"] = utc_now() + timedelta(seconds=30)
    record.deadlines["client_join"] = utc_now() + timedelta(seconds=300)
    store.save_session(record.view())
    gateway.rooms.add("room-limited")
    assert record.view()["deadlines"]["duration_limit"] == rfc3339(
        record.deadlines["duration_limit"]
    )
    loop = asyncio.get_running_loop()
    started = loop.time()

    after = await make_harness(store=store, gateway=gateway, take_over=True)

    ended = await terminated(after, "limited")
    assert ended["reason"] == "duration limit of 600 s reached"
    assert 29 <= loop.time() - started <= 31  # looptime: virtual seconds, exact


async def terminated(harness: Harness, session_id: str) -> dict[str, object]:
    """Poll in steps of the (virtual) clock until the session has ended."""
    for _ in range(1000):
        view = await harness.view(session_id)
        if view["status"] == "Terminated":
            return view
        await asyncio.sleep(0.5)
    raise AssertionError(f"{session_id} never ended")


# ---------------------------------------------------------------------- nothing lost to a crash


async def test_a_session_is_stored_before_its_room_is_created(
    make_harness: HarnessFactory,
) -> None:
    order: list[str] = []
    gateway = FakeGateway()
    create_room = gateway.create_room

    async def persist(record: SessionRecord) -> None:
        order.append("stored")

    async def create_room_logged(
        name: str, *, metadata: str, empty_timeout: int, departure_timeout: int = 0
    ) -> None:
        order.append("room")
        await create_room(
            name,
            metadata=metadata,
            empty_timeout=empty_timeout,
            departure_timeout=departure_timeout,
        )

    gateway.create_room = create_room_logged  # type: ignore[method-assign]
    harness = await make_harness(gateway=gateway, persist=persist)
    await harness.create(required_services=[])
    assert order == ["stored", "room"]


async def test_a_session_that_cannot_be_stored_gets_no_room(make_harness: HarnessFactory) -> None:
    async def persist(record: SessionRecord) -> None:
        raise StoreUnavailable("disk full")

    harness = await make_harness(persist=persist)
    with pytest.raises(StoreUnavailable):
        await harness.create(required_services=[])
    assert harness.gateway.rooms == set()


async def test_an_idempotent_create_is_answered_only_once_its_key_is_stored(
    make_harness: HarnessFactory,
) -> None:
    """A key that cannot be stored gets a 503, and the session it made is ended: a retry with
    the key after a crash could not find it, and would make a second one."""

    class KeylessStore(MemoryStore):
        async def save_idempotency(self, key: str, entry: dict[str, object]) -> None:
            raise StoreUnavailable("disk full")

    harness = await make_harness(store=KeylessStore())
    with pytest.raises(StoreUnavailable):
        await harness.create(required_services=[], idempotency_key="k1", body_hash="h")
    sessions = await harness.store.list_sessions(  # type: ignore[union-attr]
        status=None, user_identity=None, limit=10, before=None
    )
    assert len(sessions) == 1
    ended = await harness.until(sessions[0]["session_id"], S.TERMINATED)
    assert ended["reason"] == "its Idempotency-Key could not be stored"
    assert harness.gateway.rooms == set()
