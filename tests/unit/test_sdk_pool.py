"""The SDK side of warm pools: a pooled join-room (no user yet), then the manager's signed
`session-started`, which fills in the session's context and calls `on_session_started`. With
the fake LiveKit room of tests/unit/test_sdk.py, and the manager's own client making the calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from session_manager.dispatch import DispatchPolicy, MicroserviceClient, SessionStartedRequest
from session_manager.sdk import JoinedSession, MicroserviceRunner
from tests.polling import eventually as wait_until
from tests.unit.test_sdk import (
    SECRET,
    STANDALONE,
    FakeRooms,
    RecordingHandler,
    join_body,
    post,
)


class StartedHandler(RecordingHandler):
    def __init__(self, *, fail: bool = False) -> None:
        super().__init__()
        self.started: list[JoinedSession] = []
        self.left_sessions: list[JoinedSession] = []
        self.fail = fail

    async def on_session_started(self, session: JoinedSession) -> None:
        self.started.append(session)
        if self.fail:
            raise RuntimeError("the handler's own bug")

    async def on_leave(self, session: JoinedSession, reason: str) -> None:
        self.left_sessions.append(session)
        await super().on_leave(session, reason)


@pytest.fixture
def rooms() -> FakeRooms:
    return FakeRooms()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


def runner(rooms: FakeRooms, handler: StartedHandler) -> MicroserviceRunner:
    room_factory: Any = rooms  # stands in for rtc.Room
    return MicroserviceRunner(
        "svc-1", handler, manager_url=None, room_factory=room_factory, **STANDALONE
    )


def manager_client(http: aiohttp.ClientSession) -> MicroserviceClient:
    return MicroserviceClient(
        http,
        DispatchPolicy(timeout=2.0, attempts=1, backoff=0.01),
        secrets=lambda service_id, endpoint: [SECRET],
    )


def started(session_id: str = "sess-1") -> SessionStartedRequest:
    return SessionStartedRequest(
        session_id=session_id,
        room_name="room-1",
        service_identity="svc-identity",
        session_metadata={"language": "fr"},
        user_identity="alice",
        user_name="Alice",
        pool="type:ASR",
    )


async def test_a_pooled_session_learns_its_user_when_it_starts(
    rooms: FakeRooms, http: aiohttp.ClientSession
) -> None:
    handler = StartedHandler()
    async with runner(rooms, handler) as service:
        body = {**join_body(), "pooled": True, "user_identity": "", "session_metadata": {}}
        status, _ = await post(http, service, "/join-room", body)
        assert status == 200
        await asyncio.wait_for(handler.join_seen.wait(), 2)
        [joined] = handler.joined
        assert (joined.pooled, joined.user_identity, dict(joined.metadata)) == (True, None, {})

        error = await manager_client(http).session_started(service.endpoint, started())
        assert error is None
        await wait_until(lambda: len(handler.started) == 1)
        [session] = handler.started
        assert session.session_id == "sess-1" and session.room is joined.room
        assert (session.user_identity, session.user_name) == ("alice", "Alice")
        assert session.metadata == {"language": "fr"}
        assert session.pooled
        # the service answers it only for a session it is in: 404, which the manager takes as
        # "nothing to do"
        assert await manager_client(http).session_started(service.endpoint, started("x")) is None
        status, answer = await post(
            http, service, "/session-started", orjson.loads(started("x").body())
        )
        assert status == 404 and answer["success"] is False
    # on_leave gets the session as it is now, with its user
    [left] = handler.left_sessions
    assert left.user_identity == "alice"


async def test_session_started_unsigned_or_malformed_is_refused(
    rooms: FakeRooms, http: aiohttp.ClientSession
) -> None:
    async with runner(rooms, StartedHandler()) as service:
        raw = started().body()
        async with http.post(service.endpoint + "/session-started", data=raw) as response:
            assert response.status == 401
        status, answer = await post(http, service, "/session-started", {"session_id": "s"})
        assert status == 400 and "user_identity" in answer["message"]


async def test_a_handler_that_fails_on_session_started_keeps_the_session(
    rooms: FakeRooms, http: aiohttp.ClientSession
) -> None:
    handler = StartedHandler(fail=True)
    async with runner(rooms, handler) as service:
        await post(http, service, "/join-room", {**join_body(), "pooled": True})
        await asyncio.wait_for(handler.join_seen.wait(), 2)
        assert await manager_client(http).session_started(service.endpoint, started()) is None
        await wait_until(lambda: len(handler.started) == 1)
        await asyncio.sleep(0.05)
        assert handler.left == [] and handler.cancelled == []
