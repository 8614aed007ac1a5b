"""A user's presence and a service's departures, with everyone really in the room: the manager
in-process on the real livekit-server, pong (examples/pong, built with the SDK) as real
processes, and users that are real LiveKit clients connecting with the token create-session
returned. tests/unit/test_failover_and_capacity.py proves the same claims with fakes.

A claim that something did not happen is checked only once it could have happened: a witness
session, started later with the same timer, has already ended by then.

Needs the private network namespace of scripts/test.sh: WebRTC ignores loopback candidates.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
from livekit import api

from tests.conftest import room_names
from tests.e2e.failover_harness import Api, JsonDict, Stack, poll, pongs_for
from tests.e2e.test_ping_pong import connected_client, wait_for_log_line
from tests.integration.test_sessions import assert_envelope

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

CLIENT_JOIN_TIMEOUT = 6.0  # long enough for a user to connect on a busy machine
CLIENT_GRACE = 8.0  # long enough for a user to reconnect on a busy machine
WAIT = 30.0  # deadline for anything the test waits for


def manager_url(manager: Any) -> str:
    return str(manager.make_url("/")).rstrip("/")


def only_slot(view: JsonDict) -> JsonDict:
    [slot] = view["services"]
    result: JsonDict = slot
    return result


async def wait_for(api_: Api, session_id: str, what: str, done: Any) -> JsonDict:
    view: JsonDict = await poll(lambda: api_.session(session_id), done, WAIT, what)
    return view


async def event_types(api_: Api, session_id: str) -> list[str]:
    page = await api_.ok("GET", f"/api/v1/events?session_id={session_id}&since=0&limit=1000")
    return [event["type"] for event in page["events"]]


async def status_changes(api_: Api, session_id: str) -> list[str]:
    page = await api_.ok("GET", f"/api/v1/events?session_id={session_id}&since=0&limit=1000")
    return [e["data"]["new"] for e in page["events"] if e["type"] == "SessionStatusChanged"]


async def create_ready(api_: Api, user: str, required: list[str]) -> JsonDict:
    created = await api_.create_session(user, required)  # wait_until_ready
    assert created["status"] == "Ready", created
    return created


async def remove_from_room(livekit_api: api.LiveKitAPI, room: str, identity: str) -> None:
    """LiveKit drops the participant (for the manager, a service that left the room); one that
    LiveKit has already dropped by itself is fine too."""
    try:
        await livekit_api.room.remove_participant(
            api.RoomParticipantIdentity(room=room, identity=identity)
        )
    except api.ServerError as error:
        if error.code != "not_found":
            raise


async def dispatches(api_: Api, session_id: str) -> list[tuple[str, int]]:
    """(instance, redispatches) of each join-room the session sent out, in order."""
    query = f"session_id={session_id}&type=MicroserviceDispatched&since=0&limit=100"
    page = await api_.ok("GET", f"/api/v1/events?{query}")
    return [(event["service_id"], event["data"]["redispatches"]) for event in page["events"]]


# the user ---------------------------------------------------------------------------------


async def test_a_user_who_never_joins_ends_the_session_after_client_join_timeout(
    start_manager: Any, livekit_api: api.LiveKitAPI, tmp_path: Path
) -> None:
    manager = await start_manager(client_join_timeout=CLIENT_JOIN_TIMEOUT)
    async with pongs_for(manager_url(manager), tmp_path) as stack:
        api_ = stack.api
        # The witness: its user joins; its deadline is the earlier one.
        present = await create_ready(api_, "present-user", [])
        async with connected_client(present["livekit_url"], present["access_token"]):
            await api_.wait_for_status(present["session_id"], "Active", WAIT)
            absent = await create_ready(api_, "absent-user", [])
            assert absent["room_name"] in await room_names(livekit_api)

            ended = await api_.wait_for_status(absent["session_id"], "Terminated", WAIT)
            assert ended["reason"] == f"client did not join within {CLIENT_JOIN_TIMEOUT:g} s"
            assert ended["client"] == {"joined": False, "joined_at": None, "left_at": None}
            assert "ClientJoined" not in await event_types(api_, absent["session_id"])
            assert absent["room_name"] not in await room_names(livekit_api)

            # The witness's deadline passed before the absent user's: a user who joined keeps it.
            kept = await api_.session(present["session_id"])
            assert kept["status"] == "Active" and kept["reason"] is None, kept
            assert kept["client"]["joined"] is True, kept


async def test_a_user_who_comes_back_within_the_grace_keeps_the_session_active(
    start_manager: Any, tmp_path: Path
) -> None:
    manager = await start_manager(client_reconnect_grace=CLIENT_GRACE)
    async with pongs_for(manager_url(manager), tmp_path) as stack:
        api_ = stack.api
        back = await create_ready(api_, "returning-user", [])
        gone = await create_ready(api_, "leaving-user", [])  # the witness: leaves for good
        async with connected_client(gone["livekit_url"], gone["access_token"]) as gone_user:
            async with connected_client(back["livekit_url"], back["access_token"]):
                await api_.wait_for_status(back["session_id"], "Active", WAIT)
                await api_.wait_for_status(gone["session_id"], "Active", WAIT)
            await wait_for(
                api_,
                back["session_id"],
                "the returning user seen leaving",
                lambda view: view["client"]["joined"] is False,
            )
            # The witness leaves after the returning user: its grace runs out after theirs.
            await gone_user.room.disconnect()
        await wait_for(
            api_,
            gone["session_id"],
            "the leaving user seen leaving",
            lambda view: view["client"]["joined"] is False,
        )

        async with connected_client(back["livekit_url"], back["access_token"]):
            await wait_for(
                api_,
                back["session_id"],
                "the returning user seen back",
                lambda view: view["client"]["joined"] is True,
            )
            ended = await api_.wait_for_status(gone["session_id"], "Terminated", WAIT)
            assert ended["reason"] == (
                f"client left and did not return within {CLIENT_GRACE:g} s"
            ), ended

            kept = await api_.session(back["session_id"])
            assert kept["status"] == "Active" and kept["reason"] is None, kept
            assert kept["client"]["joined"] is True and kept["client"]["left_at"], kept
            events = await event_types(api_, back["session_id"])
            user_events = [e for e in events if e in ("ClientJoined", "ClientLeft")]
            assert user_events == ["ClientJoined", "ClientLeft", "ClientJoined"], events


# the service ------------------------------------------------------------------------------


async def set_max_sessions(stack: Stack, service_id: str, limit: int) -> None:
    updated = await stack.api.ok(
        "PUT",
        f"/api/v1/microservices/{service_id}",
        {"metadata": {"type": "PONG", "max_sessions": limit}},
    )
    assert updated["max_sessions"] == limit, updated


async def assert_no_capacity(stack: Stack) -> None:
    status, refused = await stack.api.call(
        "POST",
        "/api/v1/create-session",
        {"user_identity": "nobody-else", "required_services": ["type:PONG"]},
    )
    assert status == 503, refused
    assert_envelope(refused, "NoCapacity")


async def joined_and_answered(stack: Stack, user: str) -> JsonDict:
    """A Ready session of one type:PONG slot whose join-room call has been answered too (the
    service's arrival in the room may be reported before its answer)."""
    created = await create_ready(stack.api, user, ["type:PONG"])
    await wait_for(
        stack.api,
        created["session_id"],
        "the join-room call answered",
        lambda view: only_slot(view)["attempts"] == 1,
    )
    return created


async def test_a_full_instance_is_retried_in_place_when_its_service_leaves(
    start_manager: Any, livekit_api: api.LiveKitAPI, tmp_path: Path
) -> None:
    # Dispatches may take a real join's time; the monitor is kept out of it (one round, at
    # start), so only LiveKit tells of the departure.
    manager = await start_manager(dispatch_timeout=15.0, join_timeout=30.0, health_interval=3600.0)
    async with pongs_for(manager_url(manager), tmp_path) as stack:
        leaving = await stack.start_pong("pong-full")
        await set_max_sessions(stack, "pong-full", 1)
        created = await joined_and_answered(stack, "full-user")
        session_id, room = created["session_id"], created["room_name"]
        assert only_slot(await stack.api.session(session_id))["service_id"] == "pong-full"

        # A new process takes over the instance (a rolling restart: the SDK refreshes the
        # registration with its own endpoint) while the old one is still in the room.
        successor = await stack.start_pong("pong-full", name="pong-full-successor")
        await wait_for_log_line(successor.child, "registration refreshed", WAIT)
        await set_max_sessions(stack, "pong-full", 1)  # the refresh sent pong's own metadata
        registration = await stack.api.microservice("pong-full")
        assert registration["endpoint"] == successor.url, registration
        assert registration["sessions"] == 1, registration  # full: its one place is this session's
        await assert_no_capacity(stack)

        # The old process dies and LiveKit drops it: the session's service has left the room.
        leaving.child.process.kill()
        assert await leaving.child.process.wait() == -signal.SIGKILL
        await remove_from_room(livekit_api, room, "pong-full")
        view = await wait_for(
            stack.api,
            session_id,
            "pong-full back in the room",
            lambda v: v["status"] == "Ready" and only_slot(v)["redispatches"] == 1,
        )
        slot = only_slot(view)
        assert slot["service_id"] == "pong-full" and slot["state"] == "joined", slot
        assert slot["endpoint"] == successor.url, slot
        assert await dispatches(stack.api, session_id) == [("pong-full", 0), ("pong-full", 1)]
        assert await status_changes(stack.api, session_id) == [
            "WaitingForServices",
            "Ready",
            "WaitingForServices",
            "Ready",
        ]
        assert (await stack.api.microservice("pong-full"))["sessions"] == 1
        await poll(
            lambda: successor.health(stack.api.http),
            lambda body: body["sessions"] == 1,
            WAIT,
            "the successor in the session's room",
        )


async def test_a_service_that_left_and_cannot_rejoin_ends_the_session_after_max_redispatch(
    start_manager: Any, livekit_api: api.LiveKitAPI, tmp_path: Path
) -> None:
    manager = await start_manager(
        max_redispatch=1, dispatch_timeout=15.0, join_timeout=30.0, health_interval=3600.0
    )
    async with pongs_for(manager_url(manager), tmp_path) as stack:
        pong = await stack.start_pong("pong-gone")
        created = await joined_and_answered(stack, "left-alone-user")
        session_id, room = created["session_id"], created["room_name"]

        pong.child.process.kill()
        assert await pong.child.process.wait() == -signal.SIGKILL
        await remove_from_room(livekit_api, room, "pong-gone")
        ended = await stack.api.wait_for_status(session_id, "Terminated", WAIT)
        # Left the room, tried once more in place (nobody listens there now), then given up.
        reason = ended["reason"]
        assert reason.startswith("microservice type:PONG could not join: join-room "), reason
        assert reason.endswith("(gave up after 1 redispatches)"), reason
        assert await dispatches(stack.api, session_id) == [("pong-gone", 0), ("pong-gone", 1)]
        slot = only_slot(ended)
        assert slot["redispatches"] == 1 and slot["state"] == "failed", slot
        assert room not in await room_names(livekit_api)
        assert (await stack.api.microservice("pong-gone"))["sessions"] == 0
