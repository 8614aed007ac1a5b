"""The microservice SDK's HTTP side and room bookkeeping, with a fake LiveKit room.

No WebRTC here: `room_factory` hands the SDK a `FakeRoom` that records connect/disconnect calls
and lets a test fire LiveKit events such as `disconnected`. The runners here register with no
manager: they are given the signing secret and the LiveKit URL to trust, and every call is
signed as the manager signs it (tests/unit/test_signed_dispatch.py refuses the others).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from livekit import rtc

from session_manager.events.signing import sign_headers
from session_manager.sdk import (
    ExtraFieldsFormatter,
    JoinedSession,
    LeaveReason,
    MicroserviceRunner,
    SessionHandler,
)
from tests.polling import eventually as wait_until

TOKEN = "eyJhbGciOiJIUzI1NiJ9.secret-token-value.sig"
LIVEKIT_URL = "ws://127.0.0.1:7880"
SECRET = "whsec_" + base64.b64encode(b"sdk-unit-tests-signing-secret-32").decode()
# What a runner without a manager needs: the manager's secret, and the LiveKit to trust.
STANDALONE: dict[str, Any] = {"signing_secret": SECRET, "trusted_livekit_urls": [LIVEKIT_URL]}


class FakeRoom:
    """Stands in for rtc.Room: the parts of it the SDK uses."""

    def __init__(
        self,
        *,
        connect_error: BaseException | None = None,
        connect_gate: asyncio.Event | None = None,
    ) -> None:
        self.connect_error = connect_error
        self.connect_gate = connect_gate
        self.connect_calls: list[tuple[str, str]] = []
        self.disconnect_calls = 0
        self.connected = False
        self.listeners: dict[str, list[Callable[..., Any]]] = {}

    def on(self, event: str, callback: Callable[..., Any]) -> Callable[..., Any]:
        self.listeners.setdefault(event, []).append(callback)
        return callback

    def off(self, event: str, callback: Callable[..., Any]) -> None:
        if callback in self.listeners.get(event, []):
            self.listeners[event].remove(callback)

    def emit(self, event: str, *args: Any) -> None:
        for callback in list(self.listeners.get(event, [])):
            callback(*args)

    async def connect(self, url: str, token: str) -> None:
        self.connect_calls.append((url, token))
        if self.connect_gate is not None:
            await self.connect_gate.wait()
        if self.connect_error is not None:
            raise self.connect_error
        self.connected = True

    async def disconnect(self) -> None:
        self.disconnect_calls += 1
        if self.connected:
            self.connected = False
            # Like rtc.Room: our own disconnect also fires the `disconnected` event.
            self.emit("disconnected", rtc.DisconnectReason.CLIENT_INITIATED)

    def isconnected(self) -> bool:
        return self.connected


class FakeRooms:
    """room_factory that hands out prepared FakeRooms, then plain ones."""

    def __init__(self) -> None:
        self.prepared: list[FakeRoom] = []
        self.made: list[FakeRoom] = []

    def __call__(self) -> FakeRoom:
        room = self.prepared.pop(0) if self.prepared else FakeRoom()
        self.made.append(room)
        return room


class RecordingHandler(SessionHandler):
    def __init__(self, *, on_join_error: Exception | None = None) -> None:
        self.on_join_error = on_join_error
        self.joined: list[JoinedSession] = []
        self.left: list[tuple[str, str]] = []
        self.cancelled: list[str] = []
        self.join_seen = asyncio.Event()
        self.leave_seen = asyncio.Event()
        self.leave_gate: asyncio.Event | None = None

    async def on_join(self, session: JoinedSession) -> None:
        self.joined.append(session)
        self.join_seen.set()
        if self.on_join_error is not None:
            raise self.on_join_error
        try:
            await asyncio.Event().wait()  # serve until the SDK cancels us
        except asyncio.CancelledError:
            self.cancelled.append(session.session_id)
            raise

    async def on_leave(self, session: JoinedSession, reason: str) -> None:
        if self.leave_gate is not None:
            await self.leave_gate.wait()
        self.left.append((session.session_id, reason))
        self.leave_seen.set()


def join_body(session_id: str = "sess-1", room_name: str = "room-1") -> dict[str, str]:
    return {
        "session_id": session_id,
        "room_name": room_name,
        "service_identity": "svc-identity",
        "access_token": TOKEN,
        "livekit_url": LIVEKIT_URL,
    }


def serving(service: MicroserviceRunner) -> bool:
    try:
        return service.port > 0
    except RuntimeError:  # not serving yet
        return False


@pytest.fixture
def rooms() -> FakeRooms:
    return FakeRooms()


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler()


@pytest.fixture
async def service(rooms: FakeRooms, handler: RecordingHandler) -> AsyncIterator[MicroserviceRunner]:
    runner = MicroserviceRunner(
        "svc-1", handler, manager_url=None, room_factory=rooms, **STANDALONE, connect_timeout=0.5
    )
    await runner.start()
    yield runner
    await runner.aclose()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def post(
    http: aiohttp.ClientSession, service: MicroserviceRunner, path: str, body: Any
) -> tuple[int, dict[str, Any]]:
    """POST as the manager does: the body signed with the service's secret."""
    if isinstance(body, str):
        raw = body.encode()
    elif isinstance(body, bytes):
        raw = body
    else:
        raw = orjson.dumps(body)
    headers = {"Content-Type": "application/json", **sign_headers(SECRET, raw)}
    async with http.post(service.endpoint + path, data=raw, headers=headers) as response:
        return response.status, await response.json()


async def health(http: aiohttp.ClientSession, service: MicroserviceRunner) -> dict[str, Any]:
    async with http.get(service.endpoint + "/health") as response:
        assert response.status == 200
        return dict(await response.json())


# --- join-room ---------------------------------------------------------------------------


async def test_join_room_connects_then_answers_and_calls_on_join(
    service: MicroserviceRunner, http: aiohttp.ClientSession, rooms: FakeRooms, handler: Any
) -> None:
    status, body = await post(http, service, "/join-room", join_body())

    assert status == 200
    assert body["success"] is True
    assert body["session_id"] == "sess-1"
    assert body["service_id"] == "svc-1"
    assert isinstance(body["message"], str) and body["message"]
    assert len(rooms.made) == 1
    room = rooms.made[0]
    assert room.connect_calls == [(LIVEKIT_URL, TOKEN)]
    assert room.connected  # connected before the answer went out
    await asyncio.wait_for(handler.join_seen.wait(), 2)
    (session,) = handler.joined
    assert (session.session_id, session.room_name, session.service_id) == (
        "sess-1",
        "room-1",
        "svc-1",
    )
    assert session.service_identity == "svc-identity"
    assert session.room is room
    assert service.sessions == frozenset({"sess-1"})


async def test_same_join_twice_connects_once_and_calls_on_join_once(
    service: MicroserviceRunner, http: aiohttp.ClientSession, rooms: FakeRooms, handler: Any
) -> None:
    first = await post(http, service, "/join-room", join_body())
    second = await post(http, service, "/join-room", join_body())

    assert first[0] == second[0] == 200
    assert second[1]["success"] is True
    assert len(rooms.made) == 1
    assert len(rooms.made[0].connect_calls) == 1
    # on_join is started before join-room answers: had the second request started one, it
    # would be ahead of the on_join of a session joined after it.
    await post(http, service, "/join-room", join_body("later", "room-later"))
    await wait_until(lambda: len(handler.joined) >= 2)
    assert [session.session_id for session in handler.joined] == ["sess-1", "later"]


async def test_concurrent_joins_for_one_session_share_the_connection(
    service: MicroserviceRunner, http: aiohttp.ClientSession, rooms: FakeRooms
) -> None:
    gate = asyncio.Event()
    rooms.prepared.append(FakeRoom(connect_gate=gate))
    both = asyncio.gather(
        post(http, service, "/join-room", join_body()),
        post(http, service, "/join-room", join_body()),
    )
    await wait_until(lambda: bool(rooms.made) and bool(rooms.made[0].connect_calls))
    gate.set()
    results = await both

    assert [status for status, _ in results] == [200, 200]
    assert all(body["success"] for _, body in results)
    assert len(rooms.made) == 1
    assert len(rooms.made[0].connect_calls) == 1


async def test_two_sessions_get_two_rooms(
    service: MicroserviceRunner, http: aiohttp.ClientSession, rooms: FakeRooms
) -> None:
    await post(http, service, "/join-room", join_body("a", "room-a"))
    await post(http, service, "/join-room", join_body("b", "room-b"))

    assert len(rooms.made) == 2
    assert service.sessions == frozenset({"a", "b"})


@pytest.mark.parametrize(
    ("raw", "expected_session_id", "expected_in_message"),
    [
        (b"not json", None, "json"),
        (b"[1, 2]", None, "body"),
        (b'{"session_id": "sess-9", "room_name": "r"}', "sess-9", "access_token"),
        (b'{"session_id": 5, "room_name": "r"}', None, "session_id"),
    ],
)
async def test_malformed_join_body_gets_400_json(
    service: MicroserviceRunner,
    http: aiohttp.ClientSession,
    rooms: FakeRooms,
    raw: bytes,
    expected_session_id: str | None,
    expected_in_message: str,
) -> None:
    status, body = await post(http, service, "/join-room", raw)

    assert status == 400
    assert body["success"] is False
    assert body["session_id"] == expected_session_id
    assert body["service_id"] == "svc-1"
    assert expected_in_message in body["message"].lower()
    assert rooms.made == []


async def test_invalid_body_answer_does_not_echo_the_token(
    service: MicroserviceRunner, http: aiohttp.ClientSession
) -> None:
    bad = join_body()
    bad["livekit_url"] = ""  # invalid, while the token is present and valid
    bad_token = {**join_body(), "access_token": [TOKEN]}  # wrong type, token inside

    for payload in (bad, bad_token):
        status, body = await post(http, service, "/join-room", payload)
        assert status == 400
        assert TOKEN not in body["message"]


async def test_connect_failure_answers_500_without_leaking_the_token(
    service: MicroserviceRunner,
    http: aiohttp.ClientSession,
    rooms: FakeRooms,
    handler: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    error = rtc.ConnectError(f"failed to connect to {LIVEKIT_URL}/rtc?access_token={TOKEN}")
    rooms.prepared.append(FakeRoom(connect_error=error))

    status, body = await post(http, service, "/join-room", join_body())

    assert status == 500
    assert body["success"] is False
    assert body["session_id"] == "sess-1"
    assert body["service_id"] == "svc-1"
    assert "failed to connect" in body["message"]
    assert TOKEN not in body["message"]
    assert TOKEN not in caplog.text
    assert handler.joined == []
    assert service.sessions == frozenset()
    assert (await health(http, service))["sessions"] == 0

    # A failed join leaves nothing behind: the next attempt connects afresh.
    status, body = await post(http, service, "/join-room", join_body())
    assert (status, body["success"]) == (200, True)
    assert len(rooms.made) == 2


async def test_connect_timeout_answers_500_and_drops_the_late_connection(
    service: MicroserviceRunner, http: aiohttp.ClientSession, rooms: FakeRooms, handler: Any
) -> None:
    gate = asyncio.Event()
    slow = FakeRoom(connect_gate=gate)
    rooms.prepared.append(slow)

    status, body = await post(http, service, "/join-room", join_body())

    assert status == 500
    assert body["success"] is False
    assert "no connection within 0.5 s" in body["message"]
    assert service.sessions == frozenset()
    # The native connect finishing later must not leave a ghost participant in the room.
    gate.set()
    await wait_until(lambda: slow.disconnect_calls == 1)
    assert not slow.connected
    assert handler.joined == []


# --- health --------------------------------------------------------------------------------


async def test_health_counts_joined_sessions(
    service: MicroserviceRunner, http: aiohttp.ClientSession
) -> None:
    assert await health(http, service) == {
        "status": "healthy",
        "service_id": "svc-1",
        "sessions": 0,
    }

    await post(http, service, "/join-room", join_body("a", "room-a"))
    await post(http, service, "/join-room", join_body("b", "room-b"))
    assert (await health(http, service))["sessions"] == 2

    await post(http, service, "/leave-room", {"session_id": "a", "room_name": "room-a"})
    assert (await health(http, service))["sessions"] == 1


# --- leave-room ----------------------------------------------------------------------------


async def test_leave_room_disconnects_cancels_on_join_and_calls_on_leave(
    service: MicroserviceRunner, http: aiohttp.ClientSession, rooms: FakeRooms, handler: Any
) -> None:
    await post(http, service, "/join-room", join_body())
    await asyncio.wait_for(handler.join_seen.wait(), 2)

    status, body = await post(
        http, service, "/leave-room", {"session_id": "sess-1", "room_name": "room-1"}
    )

    assert status == 200
    assert body["success"] is True
    assert body["session_id"] == "sess-1"
    assert body["service_id"] == "svc-1"
    room = rooms.made[0]
    assert room.disconnect_calls == 1 and not room.connected
    assert handler.cancelled == ["sess-1"]
    assert handler.left == [("sess-1", LeaveReason.LEAVE_REQUESTED)]
    assert service.sessions == frozenset()


async def test_leave_unknown_session_is_a_successful_no_op(
    service: MicroserviceRunner, http: aiohttp.ClientSession, handler: Any
) -> None:
    status, body = await post(
        http, service, "/leave-room", {"session_id": "nope", "room_name": "room-x"}
    )

    assert status == 200
    assert body["success"] is True
    assert body["session_id"] == "nope"
    assert "not joined" in body["message"]
    assert handler.left == []


async def test_leave_twice_calls_on_leave_once(
    service: MicroserviceRunner, http: aiohttp.ClientSession, handler: Any
) -> None:
    await post(http, service, "/join-room", join_body())
    leave = {"session_id": "sess-1", "room_name": "room-1"}
    await post(http, service, "/leave-room", leave)
    status, body = await post(http, service, "/leave-room", leave)

    assert (status, body["success"]) == (200, True)
    assert "not joined" in body["message"]
    assert len(handler.left) == 1


async def test_malformed_leave_body_gets_400_json(
    service: MicroserviceRunner, http: aiohttp.ClientSession
) -> None:
    status, body = await post(http, service, "/leave-room", {"room_name": "room-1"})

    assert status == 400
    assert body["success"] is False
    assert body["session_id"] is None
    assert "session_id" in body["message"]


async def test_leave_while_connecting_cancels_the_join(
    service: MicroserviceRunner, http: aiohttp.ClientSession, rooms: FakeRooms, handler: Any
) -> None:
    gate = asyncio.Event()
    rooms.prepared.append(FakeRoom(connect_gate=gate))
    joining = asyncio.create_task(post(http, service, "/join-room", join_body()))
    await wait_until(lambda: bool(rooms.made) and bool(rooms.made[0].connect_calls))

    status, body = await post(http, service, "/leave-room", {"session_id": "sess-1"})
    join_status, join_answer = await joining

    assert (status, body["success"]) == (200, True)
    assert join_status == 500
    assert join_answer["success"] is False
    assert "cancelled" in join_answer["message"]
    assert handler.joined == [] and handler.left == []
    gate.set()  # the abandoned native connect completes: the SDK disconnects it
    await wait_until(lambda: rooms.made[0].disconnect_calls == 1)


# --- rooms closing by themselves, failing handlers ------------------------------------------


async def test_room_disconnecting_by_itself_ends_the_session(
    service: MicroserviceRunner, http: aiohttp.ClientSession, rooms: FakeRooms, handler: Any
) -> None:
    await post(http, service, "/join-room", join_body())
    await asyncio.wait_for(handler.join_seen.wait(), 2)
    room = rooms.made[0]

    room.connected = False  # the manager deleted the room
    room.emit("disconnected", rtc.DisconnectReason.ROOM_DELETED)
    await asyncio.wait_for(handler.leave_seen.wait(), 2)

    assert handler.left == [("sess-1", "room_disconnected:ROOM_DELETED")]
    assert handler.left[0][1].startswith(LeaveReason.ROOM_DISCONNECTED)
    assert handler.cancelled == ["sess-1"]
    assert service.sessions == frozenset()
    assert (await health(http, service))["sessions"] == 0
    # The session can be joined again afterwards.
    status, _ = await post(http, service, "/join-room", join_body())
    assert status == 200
    assert len(rooms.made) == 2


async def test_a_room_that_drops_us_right_after_a_repeated_join_room_is_joined_again(
    service: MicroserviceRunner, http: aiohttp.ClientSession, rooms: FakeRooms, handler: Any
) -> None:
    """LiveKit removed the service and told the manager first: the manager's join-room comes
    while the service still thinks it is in the room ("Already in room"); when the room then
    drops it, it joins again with that newer request instead of staying out."""
    await post(http, service, "/join-room", join_body())
    await asyncio.wait_for(handler.join_seen.wait(), 2)
    status, answer = await post(http, service, "/join-room", join_body())
    assert status == 200 and answer["message"].startswith("Already in room")

    room = rooms.made[0]
    room.connected = False
    room.emit("disconnected", rtc.DisconnectReason.PARTICIPANT_REMOVED)

    await wait_until(lambda: len(rooms.made) == 2 and len(rooms.made[1].connect_calls) == 1)
    await wait_until(lambda: service.sessions == frozenset({"sess-1"}))
    assert handler.left == [("sess-1", "room_disconnected:PARTICIPANT_REMOVED")]


async def test_a_room_dropping_us_without_a_repeated_join_room_stays_left(
    service: MicroserviceRunner, http: aiohttp.ClientSession, rooms: FakeRooms, handler: Any
) -> None:
    await post(http, service, "/join-room", join_body())
    await asyncio.wait_for(handler.join_seen.wait(), 2)
    room = rooms.made[0]
    room.connected = False
    room.emit("disconnected", rtc.DisconnectReason.PARTICIPANT_REMOVED)
    await asyncio.wait_for(handler.leave_seen.wait(), 2)
    # A later join-room for another session is handled after the teardown: by then a rejoin
    # of the first would have been started.
    await post(http, service, "/join-room", join_body("later", "room-later"))
    assert len(rooms.made) == 2  # the first room and the later session's: no third
    assert service.sessions == frozenset({"later"})


async def test_on_join_failure_leaves_the_room(
    rooms: FakeRooms, http: aiohttp.ClientSession
) -> None:
    handler = RecordingHandler(on_join_error=RuntimeError("boom"))
    async with MicroserviceRunner(
        "svc-1", handler, manager_url=None, room_factory=rooms, **STANDALONE
    ) as service:
        status, _ = await post(http, service, "/join-room", join_body())
        await asyncio.wait_for(handler.leave_seen.wait(), 2)

        assert status == 200  # the room was joined; the handler failed afterwards
        assert handler.left == [("sess-1", LeaveReason.ON_JOIN_FAILED)]
        assert rooms.made[0].disconnect_calls == 1
        assert service.sessions == frozenset()


# --- shutdown ------------------------------------------------------------------------------


async def test_aclose_leaves_every_room_and_is_idempotent(
    rooms: FakeRooms, handler: RecordingHandler, http: aiohttp.ClientSession
) -> None:
    service = MicroserviceRunner(
        "svc-1", handler, manager_url=None, room_factory=rooms, **STANDALONE
    )
    await service.start()
    endpoint = service.endpoint
    await post(http, service, "/join-room", join_body("a", "room-a"))
    await post(http, service, "/join-room", join_body("b", "room-b"))
    await wait_until(lambda: len(handler.joined) == 2)

    await asyncio.gather(service.aclose(), service.aclose())
    await service.aclose()

    assert sorted(handler.left) == [("a", "shutdown"), ("b", "shutdown")]
    assert sorted(handler.cancelled) == ["a", "b"]
    assert [room.disconnect_calls for room in rooms.made] == [1, 1]
    assert service.sessions == frozenset()
    with pytest.raises(aiohttp.ClientConnectionError):
        await http.get(endpoint + "/health")


async def test_join_during_shutdown_is_refused_with_503(
    rooms: FakeRooms, handler: RecordingHandler, http: aiohttp.ClientSession
) -> None:
    service = MicroserviceRunner(
        "svc-1", handler, manager_url=None, room_factory=rooms, **STANDALONE
    )
    await service.start()
    await post(http, service, "/join-room", join_body("a", "room-a"))
    handler.leave_gate = asyncio.Event()  # hold the shutdown inside on_leave
    closing = asyncio.create_task(service.aclose())
    await wait_until(lambda: rooms.made[0].disconnect_calls == 1)

    status, body = await post(http, service, "/join-room", join_body("b", "room-b"))
    async with http.get(service.endpoint + "/health") as response:
        health_status, health_body = response.status, await response.json()
    handler.leave_gate.set()
    await closing

    assert (status, body["success"]) == (503, False)
    assert body["session_id"] == "b"
    assert health_status == 503 and health_body["status"] == "shutting_down"
    assert len(rooms.made) == 1
    assert handler.left == [("a", "shutdown")]


async def test_shutdown_aborts_a_join_in_progress(
    rooms: FakeRooms, handler: RecordingHandler, http: aiohttp.ClientSession
) -> None:
    service = MicroserviceRunner(
        "svc-1", handler, manager_url=None, room_factory=rooms, **STANDALONE, connect_timeout=30
    )
    await service.start()
    rooms.prepared.append(FakeRoom(connect_gate=asyncio.Event()))
    joining = asyncio.create_task(post(http, service, "/join-room", join_body()))
    await wait_until(lambda: bool(rooms.made) and bool(rooms.made[0].connect_calls))

    await asyncio.wait_for(service.aclose(), 5)
    status, body = await joining

    assert status == 503
    assert body["success"] is False
    assert handler.joined == [] and handler.left == []


async def test_run_until_signal_serves_until_the_signal_then_shuts_down(
    rooms: FakeRooms, handler: RecordingHandler, http: aiohttp.ClientSession
) -> None:
    service = MicroserviceRunner(
        "svc-1", handler, manager_url=None, room_factory=rooms, **STANDALONE
    )
    running = asyncio.create_task(service.run_until_signal(signals=(signal.SIGUSR1,)))
    await wait_until(lambda: serving(service))
    status, _ = await post(http, service, "/join-room", join_body())
    assert status == 200
    # Never send the signal unless the SDK's handler is in place: by default it kills pytest.
    assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None)

    os.kill(os.getpid(), signal.SIGUSR1)
    await asyncio.wait_for(running, 5)

    assert handler.left == [("sess-1", "shutdown")]
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handler removed again


async def test_runner_rejects_a_second_start(rooms: FakeRooms, handler: RecordingHandler) -> None:
    async with MicroserviceRunner(
        "svc-1", handler, manager_url=None, room_factory=rooms, **STANDALONE
    ) as service:
        with pytest.raises(RuntimeError, match="only once"):
            await service.start()


def test_log_formatter_shows_extra_fields_after_the_fixed_message() -> None:
    record = logging.LogRecord(
        "session_manager.sdk", logging.INFO, __file__, 1, "joined room", None, None
    )
    record.session_id = "sess-1"
    record.room_name = "room-1"

    line = ExtraFieldsFormatter("%(levelname)s %(message)s").format(record)

    assert line == "INFO joined room room_name='room-1' session_id='sess-1'"
