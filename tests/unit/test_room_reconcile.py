"""Comparing LiveKit's rooms with the live sessions: stray rooms of this deployment are deleted,
other rooms are left alone, and a session whose room is gone ends with a reason naming LiveKit."""

from __future__ import annotations

import orjson

from session_manager.commands import ReconcileRooms
from session_manager.session.deps import ROOM_TAG
from session_manager.session.states import SessionStatus
from tests.unit.session_harness import Harness

S = SessionStatus


def tagged(deployment: str) -> str:
    return orjson.dumps({"session_id": "gone", ROOM_TAG: deployment}).decode()


async def test_a_stray_room_of_this_deployment_is_deleted_and_others_are_kept(
    harness: Harness,
) -> None:
    live = await harness.create(required_services=[])
    gateway = harness.gateway
    for name, metadata in (
        ("stray", tagged("default")),  # ours: its delete failed, or a late joiner made it again
        ("elsewhere", tagged("another-deployment")),
        ("not-ours", '{"app": "someone else"}'),
        ("plain", ""),
    ):
        gateway.rooms.add(name)
        gateway.metadata[name] = metadata

    harness.supervisor.tell(ReconcileRooms())
    await harness.eventually(lambda: "stray" in gateway.deleted, "stray room deleted")

    assert gateway.rooms == {live.room_name, "elsewhere", "not-ours", "plain"}
    assert (await harness.view(live.session_id))["status"] == "Ready"


async def test_a_session_whose_room_is_gone_ends_naming_livekit(harness: Harness) -> None:
    created = await harness.create(required_services=[])
    harness.gateway.rooms.discard(created.room_name)  # LiveKit lost it (restarted, say)

    harness.supervisor.tell(ReconcileRooms())
    view = await harness.until(created.session_id, S.TERMINATED)

    assert view["reason"] == "LiveKit room lost: LiveKit no longer has it"


async def test_rooms_carry_the_deployment_tag(harness: Harness) -> None:
    created = await harness.create(required_services=[])
    metadata = orjson.loads(harness.gateway.metadata[created.room_name])
    assert metadata == {
        "session_id": created.session_id,
        "user_identity": "user123",
        ROOM_TAG: "default",
    }
