"""The SDK side of issue 11: what a service knows of its session (`JoinedSession.metadata`,
`user_identity`, `user_name`), an entrypoint function instead of a handler class, and the
service's own `max_sessions`. With the fake LiveKit room of tests/unit/test_sdk.py; every call
signed as the manager signs it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from session_manager.dispatch import DispatchPolicy, JoinRoomRequest, MicroserviceClient
from session_manager.sdk import JoinedSession, MicroserviceRunner
from tests.polling import eventually as wait_until
from tests.unit.test_sdk import (
    LIVEKIT_URL,
    SECRET,
    STANDALONE,
    TOKEN,
    FakeRoom,
    FakeRooms,
    RecordingHandler,
    health,
    join_body,
    post,
)

CONTEXT = {
    "session_metadata": {"language": "zh-CN", "robot": {"id": "r2-d2", "arms": 2}},
    "user_identity": "user123",
    "user_name": "张三",
}


def join_with_context(session_id: str = "sess-1", room_name: str = "room-1") -> dict[str, Any]:
    return {**join_body(session_id, room_name), **CONTEXT}


@pytest.fixture
def rooms() -> FakeRooms:
    return FakeRooms()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


def runner(rooms: FakeRooms, **options: Any) -> MicroserviceRunner:
    room_factory: Any = rooms  # stands in for rtc.Room
    return MicroserviceRunner(
        "svc-1", manager_url=None, room_factory=room_factory, **STANDALONE, **options
    )


# --- what a service knows of its session ----------------------------------------------------


async def test_the_session_tells_its_metadata_and_its_user(
    rooms: FakeRooms, http: aiohttp.ClientSession
) -> None:
    handler = RecordingHandler()
    async with runner(rooms, handler=handler) as service:
        status, _ = await post(http, service, "/join-room", join_with_context())
        await asyncio.wait_for(handler.join_seen.wait(), 2)

    assert status == 200
    [session] = handler.joined
    assert session.metadata == {"language": "zh-CN", "robot": {"id": "r2-d2", "arms": 2}}
    assert session.metadata["language"] == "zh-CN"
    assert session.user_identity == "user123"
    assert session.user_name == "张三"
    with pytest.raises(TypeError):
        session.metadata["language"] = "en"  # type: ignore[index]  # read-only


async def test_a_manager_that_sends_only_the_old_fields_gives_an_empty_context(
    rooms: FakeRooms, http: aiohttp.ClientSession
) -> None:
    handler = RecordingHandler()
    async with runner(rooms, handler=handler) as service:
        status, _ = await post(http, service, "/join-room", join_body())
        await asyncio.wait_for(handler.join_seen.wait(), 2)

    assert status == 200
    [session] = handler.joined
    assert dict(session.metadata) == {}
    assert session.user_identity is None and session.user_name is None


async def test_a_session_without_a_user_name_says_none(
    rooms: FakeRooms, http: aiohttp.ClientSession
) -> None:
    handler = RecordingHandler()
    body = {**join_with_context(), "user_name": None, "session_metadata": {}}
    async with runner(rooms, handler=handler) as service:
        await post(http, service, "/join-room", body)
        await asyncio.wait_for(handler.join_seen.wait(), 2)

    [session] = handler.joined
    assert (session.user_identity, session.user_name, dict(session.metadata)) == (
        "user123",
        None,
        {},
    )


async def test_session_metadata_that_is_not_an_object_is_a_400(
    rooms: FakeRooms, http: aiohttp.ClientSession
) -> None:
    async with runner(rooms, handler=RecordingHandler()) as service:
        status, body = await post(
            http, service, "/join-room", {**join_body(), "session_metadata": ["a"]}
        )

    assert status == 400
    assert "session_metadata" in body["message"]
    assert rooms.made == []


# --- an entrypoint function ------------------------------------------------------------------


class Entrypoint:
    """Records what an entrypoint function sees and how it ends."""

    def __init__(self, *, then: str = "serve") -> None:
        self.then = then  # "serve" until cancelled, "return", or "raise"
        self.sessions: list[JoinedSession] = []
        self.cancelled: list[str] = []
        self.started = asyncio.Event()

    async def __call__(self, session: JoinedSession) -> None:
        self.sessions.append(session)
        self.started.set()
        if self.then == "return":
            return
        if self.then == "raise":
            raise RuntimeError("the entrypoint failed")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.append(session.session_id)
            raise


async def test_an_entrypoint_runs_for_the_life_of_the_session(
    rooms: FakeRooms, http: aiohttp.ClientSession
) -> None:
    entrypoint = Entrypoint()
    async with runner(rooms, entrypoint=entrypoint) as service:
        status, _ = await post(http, service, "/join-room", join_with_context())
        await asyncio.wait_for(entrypoint.started.wait(), 2)
        [session] = entrypoint.sessions
        assert session.room is rooms.made[0]  # type: ignore[comparison-overlap]  # a fake
        assert rooms.made[0].connected
        assert (session.session_id, session.user_identity) == ("sess-1", "user123")
        assert session.metadata["language"] == "zh-CN"

        await post(http, service, "/leave-room", {"session_id": "sess-1"})

        assert entrypoint.cancelled == ["sess-1"]  # cancelled and awaited before the answer
        assert rooms.made[0].disconnect_calls == 1
        assert service.sessions == frozenset()
    assert status == 200


async def test_an_entrypoint_that_returns_leaves_the_service_in_the_room(
    rooms: FakeRooms, http: aiohttp.ClientSession
) -> None:
    """As a handler's on_join may: it set up what it needed (room callbacks) and returned."""
    entrypoint = Entrypoint(then="return")
    async with runner(rooms, entrypoint=entrypoint) as service:
        await post(http, service, "/join-room", join_body())
        await asyncio.wait_for(entrypoint.started.wait(), 2)
        await asyncio.sleep(0.05)

        assert service.sessions == frozenset({"sess-1"})
        assert rooms.made[0].connected and rooms.made[0].disconnect_calls == 0
        assert (await health(http, service))["sessions"] == 1
    assert rooms.made[0].disconnect_calls == 1  # left at shutdown


async def test_an_entrypoint_that_raises_ends_the_services_part_in_the_session(
    rooms: FakeRooms, http: aiohttp.ClientSession
) -> None:
    entrypoint = Entrypoint(then="raise")
    async with runner(rooms, entrypoint=entrypoint) as service:
        status, _ = await post(http, service, "/join-room", join_body())
        await wait_until(lambda: rooms.made[0].disconnect_calls == 1)

        assert status == 200  # the room was joined; the entrypoint failed afterwards
        assert service.sessions == frozenset()
        assert (await health(http, service))["sessions"] == 0
        # The session may be joined again.
        status, _ = await post(http, service, "/join-room", join_body())
        assert status == 200 and len(rooms.made) == 2


@pytest.mark.parametrize("given", ["both", "neither"])
def test_a_runner_takes_a_handler_or_an_entrypoint(given: str, rooms: FakeRooms) -> None:
    both = {"handler": RecordingHandler(), "entrypoint": Entrypoint()}
    options: dict[str, Any] = both if given == "both" else {}
    with pytest.raises(ValueError, match="either a handler or an entrypoint"):
        runner(rooms, **options)


# --- max_sessions ----------------------------------------------------------------------------


async def test_a_join_room_beyond_max_sessions_is_declined_with_503(
    rooms: FakeRooms, http: aiohttp.ClientSession
) -> None:
    handler = RecordingHandler()
    async with runner(rooms, handler=handler, max_sessions=1) as service:
        assert service.max_sessions == 1
        assert (await post(http, service, "/join-room", join_body("a", "room-a")))[0] == 200

        status, body = await post(http, service, "/join-room", join_body("b", "room-b"))
        assert status == 503
        assert body["success"] is False and body["session_id"] == "b"
        assert body["message"] == "Service is at capacity (max_sessions 1)"
        assert len(rooms.made) == 1  # no room connected for it

        # The session it holds is still answered as joined.
        status, body = await post(http, service, "/join-room", join_body("a", "room-a"))
        assert status == 200 and body["message"] == "Already in room room-a"

        # A place freed is taken again.
        await post(http, service, "/leave-room", {"session_id": "a"})
        status, _ = await post(http, service, "/join-room", join_body("b", "room-b"))
        assert status == 200
        assert service.sessions == frozenset({"b"})


async def test_a_session_still_connecting_holds_its_place(
    rooms: FakeRooms, http: aiohttp.ClientSession
) -> None:
    gate = asyncio.Event()
    rooms.prepared.append(FakeRoom(connect_gate=gate))
    async with runner(rooms, handler=RecordingHandler(), max_sessions=1) as service:
        joining = asyncio.create_task(post(http, service, "/join-room", join_body("a", "room-a")))
        await wait_until(lambda: bool(rooms.made) and bool(rooms.made[0].connect_calls))

        status, _ = await post(http, service, "/join-room", join_body("b", "room-b"))
        gate.set()
        assert (await joining)[0] == 200
    assert status == 503


async def test_max_sessions_comes_from_the_registration_metadata(
    rooms: FakeRooms, http: aiohttp.ClientSession
) -> None:
    metadata = {"type": "ASR", "max_sessions": 2}
    async with runner(rooms, handler=RecordingHandler(), metadata=metadata) as service:
        assert service.max_sessions == 2
        statuses = [
            (await post(http, service, "/join-room", join_body(name, f"room-{name}")))[0]
            for name in ("a", "b", "c")
        ]
    assert statuses == [200, 200, 503]


@pytest.mark.parametrize("limit", [0, -1, "4", True, 2.5])
def test_a_max_sessions_that_is_not_a_positive_integer_is_refused(
    limit: Any, rooms: FakeRooms
) -> None:
    with pytest.raises(ValueError, match="max_sessions"):
        runner(rooms, handler=RecordingHandler(), metadata={"max_sessions": limit})
    if not isinstance(limit, str | float):
        with pytest.raises(ValueError, match="max_sessions"):
            runner(rooms, handler=RecordingHandler(), max_sessions=limit)


async def test_the_manager_takes_the_503_as_a_decline(
    rooms: FakeRooms, http: aiohttp.ClientSession
) -> None:
    """The manager's own client (session_manager.dispatch) against a full service: a decline,
    which sends it to another instance at once, not a failure it retries."""
    async with runner(rooms, handler=RecordingHandler(), max_sessions=1) as service:
        client = MicroserviceClient(
            http,
            DispatchPolicy(timeout=2.0, attempts=3, backoff=0.01),
            secrets=lambda service_id, endpoint: [SECRET],
        )

        def request(session_id: str) -> JoinRoomRequest:
            return JoinRoomRequest(
                session_id, f"room-{session_id}", "svc-1", TOKEN, LIVEKIT_URL, {}, "user123"
            )

        first = await client.join_room(service.endpoint, request("a"))
        second = await client.join_room(service.endpoint, request("b"))

    assert first.ok
    assert not second.ok and second.declined and second.attempts == 1
    assert second.error == (
        "service declined join-room: HTTP 503: Service is at capacity (max_sessions 1)"
    )
