"""Sessions outlive the manager process, end to end: the real `session-manager` on the test
session's external livekit-server (its webhooks go to `livekit.webhook_port`, where each
manager of a test listens in turn) with the SQLite store, real pong processes, and a real
LiveKit client that pings on the data channel and hears pong.

A manager is stopped (SIGTERM, shutdown_mode keep) or killed (SIGKILL) and a new process is
started on the same port and data dir. What a user sees must not change:

- a call goes on while no manager runs, and afterwards the session reads Active, in the same
  room, and can be ended through the new process;
- after a kill at any moment (creates in flight, services not yet joined, a call going on), no
  room of this deployment is left without a live session, no session the test was answered for
  is lost, a live session has its room, and every status is right;
- a session's timers fire when they were due, not counted again from the restart.

Needs the private network namespace of scripts/test.sh: WebRTC ignores loopback candidates.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from livekit.api import DeleteRoomRequest, ListRoomsRequest, LiveKitAPI

from tests.conftest import FAST_SETTINGS, LiveKitUnderTest
from tests.e2e.failover_harness import (
    HTTP_TIMEOUT,
    Api,
    JsonDict,
    Pong,
    check_healthy,
    poll,
    require_netns,
    settings_flags,
    start_pong,
)
from tests.e2e.processes import (
    ManagerProcesses,
    livekit_children,
    session_manager_command,
    session_manager_processes,
)
from tests.e2e.test_failover import first_disconnect, only_slot
from tests.e2e.test_ping_pong import PONG, Client, connected_client, send_pings
from tests.fake_services import ScriptedService, accept_without_joining

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

LIVE = ("WaitingForServices", "Ready", "Active")
ROOM_TAG = "session_manager"  # the key of a room's metadata naming the deployment that made it
# The reasons a user reads (README, and the takeover's messages).
JOIN_TIMEOUT_REASON = "Timeout waiting for microservices to join"
CREATE_INTERRUPTED_REASON = "session manager stopped while the session was being created"
ENDED_UNANSWERED = (CREATE_INTERRUPTED_REASON, JOIN_TIMEOUT_REASON)

PONG_SERVICE = "pong-restart"
PONG_TIMEOUT = 20.0  # first pong from a freshly joined service; any pong after that
ACTIVE_TIMEOUT = 10.0
WAIT = 30.0  # deadline for anything else the test waits for
DOWNTIME = 2.0  # how long the call runs with no manager at all
LONGEST_SILENCE = 3.0  # pings go every 0.3 s: a longer wait for a pong means the call broke
BURST_INTERVAL = 0.01  # between the creates fired at a manager about to be killed
KILL_AFTER_ANSWERS = 3  # answers to those creates before the kill

STOPS = ["sigterm", "sigkill"]


# ------------------------------------------------------------------------------ the managers


def restart_settings(
    livekit: LiveKitUnderTest, data_dir: Path, deployment: str, **overrides: Any
) -> dict[str, Any]:
    """Every manager of a test: the external LiveKit (on the port its webhooks go to), one
    SQLite data dir, one deployment tag of its own, short timeouts."""
    return {
        "port": livekit.webhook_port,
        "livekit_url": livekit.url,
        "livekit_api_key": livekit.api_key,
        "livekit_api_secret": livekit.api_secret,
        "store": "sqlite",
        "data_dir": data_dir,
        "deployment": deployment,
        "shutdown_mode": "keep",
        **FAST_SETTINGS,
        "log_level": "DEBUG",  # for the log tails printed when a test fails
        **overrides,
    }


def deployment_of(metadata: str) -> str | None:
    """The deployment a room's metadata names in its "session_manager" key, if any."""
    try:
        parsed = json.loads(metadata)
    except ValueError:
        return None
    tag = parsed.get(ROOM_TAG) if isinstance(parsed, dict) else None
    return tag if isinstance(tag, str) else None


@dataclass
class Restarts:
    """One test's managers (one at a time, same port, same store) and the children started
    beside them, the manager's API, and LiveKit as the test sees it."""

    processes: ManagerProcesses
    api: Api
    livekit_api: LiveKitAPI
    deployment: str

    async def start_manager(self) -> None:
        manager = await self.processes.start()
        errors = (aiohttp.ClientError, TimeoutError, ValueError)
        await manager.wait_for_health(
            lambda: check_healthy(self.api), expected="healthy", errors=errors
        )
        assert not livekit_children(manager.child.pid), "a manager of an external LiveKit ran one"

    async def stop_manager(self) -> None:
        """SIGTERM: the manager must exit 0 (shutdown_mode keep leaves the sessions live)."""
        await self.processes.stop()

    async def kill_manager(self) -> None:
        await self.processes.kill()

    async def start_pong(self, service_id: str) -> Pong:
        return await start_pong(self.processes.children, self.api, service_id)

    async def register(self, service_id: str, endpoint: str, service_type: str) -> None:
        body = {"service_id": service_id, "endpoint": endpoint, "metadata": {"type": service_type}}
        await self.api.ok("POST", "/api/v1/microservices/register", body)

    async def create(self, body: JsonDict) -> JsonDict:
        return await self.api.ok("POST", "/api/v1/create-session", body)

    async def try_create(self, body: JsonDict) -> JsonDict | None:
        """The answer to a create, or None if none came (the manager was killed meanwhile)."""
        try:
            status, answer = await self.api.call("POST", "/api/v1/create-session", body)
        except (aiohttp.ClientError, ValueError):
            return None
        assert status == 200, f"create for {body['user_identity']}: HTTP {status}: {answer}"
        return answer

    async def sessions(self) -> dict[str, JsonDict]:
        """Every session the manager lists, by id."""
        found: dict[str, JsonDict] = {}
        path = "/api/v1/sessions?limit=500"
        while True:
            page = await self.api.ok("GET", path)
            found |= {view["session_id"]: view for view in page["sessions"]}
            if not page["next_cursor"]:
                return found
            path = f"/api/v1/sessions?limit=500&cursor={page['next_cursor']}"

    async def rooms(self) -> dict[str, str]:
        return await tagged_rooms(self.livekit_api, self.deployment)


async def tagged_rooms(livekit_api: LiveKitAPI, deployment: str) -> dict[str, str]:
    """The rooms LiveKit has that carry `deployment`'s tag: name -> LiveKit's sid of the room."""
    response = await livekit_api.room.list_rooms(ListRoomsRequest())
    return {
        room.name: room.sid for room in response.rooms if deployment_of(room.metadata) == deployment
    }


@asynccontextmanager
async def restarts(
    tmp_path: Path, livekit: LiveKitUnderTest, livekit_api: LiveKitAPI, **overrides: Any
) -> AsyncIterator[Restarts]:
    """Managers for `session_manager_processes` (every process stopped at the end, each
    checked: exit 0, or -SIGKILL for a killed one) with this test's own deployment tag. At the
    end the rooms of that tag still in the shared LiveKit (sessions a manager kept live at its
    last shutdown) are deleted."""
    require_netns()
    deployment = f"restart-{uuid.uuid4().hex[:12]}"
    settings = restart_settings(livekit, tmp_path / "state", deployment, **overrides)
    command = session_manager_command() + settings_flags(settings)
    # No kept-alive connections: each manager is a new process on the same port.
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT)
    try:
        async with (
            session_manager_processes(tmp_path, command) as processes,
            aiohttp.ClientSession(connector=connector, timeout=timeout) as http,
        ):
            manager_api = Api(http, f"http://127.0.0.1:{livekit.webhook_port}")
            yield Restarts(processes, manager_api, livekit_api, deployment)
    finally:
        for name in await tagged_rooms(livekit_api, deployment):
            await livekit_api.room.delete_room(DeleteRoomRequest(room=name))


# --------------------------------------------------------------------------- the user's call


class Pongs:
    """When the client heard each pong (time.monotonic())."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.heard: list[float] = []

    async def listen(self) -> None:
        while True:
            packet = await self.client.packets.get()
            if packet.data == PONG:
                self.heard.append(time.monotonic())

    async def heard_after(self, moment: float, what: str) -> None:
        async def latest() -> float:
            return self.heard[-1] if self.heard else 0.0

        await poll(latest, lambda last: last > moment, PONG_TIMEOUT, f"a pong {what}")

    def longest_silence(self, start: float, end: float) -> float:
        """The longest time between start, the pongs heard in between, and end."""
        moments = [start, *(at for at in self.heard if start < at < end), end]
        return max(later - earlier for earlier, later in itertools.pairwise(moments))


@asynccontextmanager
async def pinging(client: Client) -> AsyncIterator[Pongs]:
    """Ping the room every few hundred ms while the block runs, noting every pong heard."""
    pongs = Pongs(client)
    tasks = [
        asyncio.create_task(send_pings(client.room), name="pinger"),
        asyncio.create_task(pongs.listen(), name="pong listener"),
    ]
    try:
        yield pongs
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ------------------------------------------------------------------------------------ checks


def moment(view: JsonDict, name: str) -> datetime:
    value = view[name]
    assert isinstance(value, str), f"{name} of {view['session_id']}: {value!r}"
    return datetime.fromisoformat(value)


def seconds_from_creation(view: JsonDict, name: str) -> float:
    return (moment(view, name) - moment(view, "created_at")).total_seconds()


async def check_invariants(stack: Restarts, answered: Iterable[str]) -> dict[str, JsonDict]:
    """The issue's invariants, from the manager's API and LiveKit's room list: no room of this
    deployment without a session the manager reads as not ended (no room leaked), every session
    the test was answered for readable, and every running session's room in LiveKit (no session
    lost). The sessions are listed before and after the rooms, so a session ending meanwhile
    makes neither a false leak nor a false loss. Returns the sessions listed last, by id."""
    before = await stack.sessions()
    rooms = await stack.rooms()
    after = await stack.sessions()
    owned = {view["room_name"] for view in before.values() if view["status"] != "Terminated"}
    leaked = set(rooms) - owned
    assert not leaked, f"rooms no live session owns: {leaked}; sessions: {before}"
    lost = {
        view["session_id"]: view["status"]
        for view in after.values()
        if view["status"] in LIVE and view["room_name"] not in rooms
    }
    assert not lost, f"live sessions whose room LiveKit does not have: {lost}"
    for session_id in answered:
        assert session_id in after, f"session {session_id} was answered and is not listed"
        await stack.api.session(session_id)  # and readable on its own
    return after


async def stop_or_kill(stack: Restarts, stop: str) -> None:
    if stop == "sigterm":
        await stack.stop_manager()  # exits 0
    else:
        await stack.kill_manager()


# ------------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("stop", STOPS)
async def test_a_call_goes_on_through_a_restart(
    tmp_path: Path, livekit: LiveKitUnderTest, livekit_api: LiveKitAPI, stop: str
) -> None:
    """A client talking to pong; the manager is stopped (SIGTERM: exit 0, shutdown_mode keep)
    or killed (kill -9 during Active), and a new one started on the same port and data dir.
    The client hears pong all along, with no manager running too; the new process reads the
    session Active in the same LiveKit room (same sid), and ends it when asked."""
    async with restarts(tmp_path, livekit, livekit_api) as stack:
        await stack.start_manager()
        await stack.start_pong(PONG_SERVICE)
        created = await stack.api.create_session("restart-user", [PONG_SERVICE])
        assert created["status"] == "Ready", created
        session_id, room = created["session_id"], created["room_name"]
        rooms = await stack.rooms()
        assert room in rooms, f"{room} is not in LiveKit with this deployment's tag: {rooms}"

        async with connected_client(created["livekit_url"], created["access_token"]) as client:
            disconnected = first_disconnect(client.room)
            async with pinging(client) as pongs:
                await pongs.heard_after(0.0, "from pong")
                await stack.api.wait_for_status(session_id, "Active", ACTIVE_TIMEOUT)

                call_start = time.monotonic()
                await stop_or_kill(stack, stop)
                down = time.monotonic()
                await asyncio.sleep(DOWNTIME)
                await pongs.heard_after(down, "while no manager runs")

                await stack.start_manager()
                up = time.monotonic()
                # After a kill the store may hold it as Ready (the Active view not yet written):
                # the new process finds the user in the room and reads it Active again.
                view = await stack.api.wait_for_status(session_id, "Active", ACTIVE_TIMEOUT)
                assert view["room_name"] == room, view
                assert view["client"]["joined"] is True, view["client"]
                slot = only_slot(view)
                assert slot["service_id"] == PONG_SERVICE and slot["state"] == "joined", slot
                assert (await stack.rooms()).get(room) == rooms[room], "not the same LiveKit room"

                await pongs.heard_after(up, "after the restart")
                silence = pongs.longest_silence(call_start, time.monotonic())
                print(
                    f"{stop}: manager down {up - down:.2f} s, longest wait for a pong "
                    f"{silence:.2f} s, {len(pongs.heard)} pongs"
                )
                assert silence < LONGEST_SILENCE, f"no pong for {silence:.2f} s"
                assert not disconnected.done(), "the client was disconnected"
                await check_invariants(stack, answered=[session_id])

            ended = await stack.api.ok("DELETE", f"/api/v1/sessions/{session_id}")
            assert ended["status"] == "Terminated", ended
            assert ended["reason"] == "terminated by request", ended
            assert room not in await stack.rooms()
            await asyncio.wait_for(disconnected, WAIT)  # the user sees the call end
        await check_invariants(stack, answered=[session_id])


async def test_a_kill_during_creates_loses_no_answered_session(
    tmp_path: Path, livekit: LiveKitUnderTest, livekit_api: LiveKitAPI
) -> None:
    """kill -9 with creates in flight: sessions whose creators wait on a service that holds its
    join-room answer, and a stream of creates without services, killed the instant a few of
    those are answered. After the restart every answered session is live with its room; one
    whose creator had no answer is ended or live with its room; no room is left over; those
    whose service never joined end at their join deadline."""
    release = asyncio.Event()

    async def answer_when_released(body: dict[str, Any]) -> web.StreamResponse:
        await release.wait()
        return await accept_without_joining(body)

    held = ScriptedService(answer_when_released)
    waiting, burst = 6, 40
    async with held.running():
        try:
            # dispatch_timeout: the held join-room keeps its creator waiting until the kill.
            async with restarts(tmp_path, livekit, livekit_api, dispatch_timeout=60) as stack:
                await stack.start_manager()
                await stack.register("held", held.endpoint, "HELD")

                waiters = [
                    asyncio.create_task(
                        stack.try_create(
                            {"user_identity": f"waiting-{i}", "required_services": ["held"]}
                        )
                    )
                    for i in range(waiting)
                ]

                async def held_calls() -> int:
                    return len(held.join_requests)

                await poll(held_calls, lambda n: n >= waiting, WAIT, "every join-room held")
                # Creates without services, one every few ms; the kill comes the instant a few
                # are answered, with the next ones at every step of their creation.
                quick: list[asyncio.Task[JsonDict | None]] = []
                quick_answers: list[JsonDict] = []
                enough_answered = asyncio.Event()

                async def create_quick(i: int) -> JsonDict | None:
                    body = {"user_identity": f"quick-{i}", "required_services": []}
                    answer = await stack.try_create(body)
                    if answer is not None:
                        quick_answers.append(answer)
                        if len(quick_answers) >= KILL_AFTER_ANSWERS:
                            enough_answered.set()
                    return answer

                async def stream_creates() -> None:
                    for i in range(burst):
                        quick.append(asyncio.create_task(create_quick(i)))
                        await asyncio.sleep(BURST_INTERVAL)

                streaming = asyncio.create_task(stream_creates())
                try:
                    await asyncio.wait_for(enough_answered.wait(), WAIT)
                finally:
                    streaming.cancel()
                await stack.kill_manager()

                answers = await asyncio.gather(*waiters, *quick)
                answered = {answer["session_id"]: answer for answer in answers if answer}
                assert answered, "no create was answered before the kill"
                assert all(answer["status"] == "Ready" for answer in answered.values()), answers
                in_flight = waiting + len(quick) - len(answered)
                print(f"kill with {len(answered)} creates answered, {in_flight} in flight")

                await stack.start_manager()
                sessions = await check_invariants(stack, answered)
                wrong = {
                    session_id: (view["status"], view["reason"])
                    for session_id, view in sessions.items()
                    if session_id in answered and view["status"] not in LIVE
                }
                assert not wrong, f"sessions answered before the kill and not live after: {wrong}"
                for view in sessions.values():  # the others: ended, or live with their room
                    if view["status"] not in LIVE:
                        assert view["status"] in ("Terminating", "Terminated"), view
                        assert view["reason"] in ENDED_UNANSWERED, view

                def waiting_ones(views: dict[str, JsonDict]) -> list[JsonDict]:
                    return [v for v in views.values() if v["user_identity"].startswith("waiting-")]

                ended = await poll(
                    stack.sessions,
                    lambda views: all(v["status"] == "Terminated" for v in waiting_ones(views)),
                    FAST_SETTINGS["join_timeout"] + WAIT,
                    "every session whose service never joined Terminated",
                )
                for view in waiting_ones(ended):
                    assert view["reason"] in ENDED_UNANSWERED, view
                await check_invariants(stack, answered)

                # What is live is the new process's to end, as any other session: the rooms go.
                live = [sid for sid, view in ended.items() if view["status"] in LIVE]
                assert set(answered) <= set(live), ended
                for session_id in live:
                    view = await stack.api.ok("DELETE", f"/api/v1/sessions/{session_id}")
                    assert view["status"] == "Terminated", view
                assert await stack.rooms() == {}
        finally:
            release.set()  # lets the held join-room calls end before the service stops


async def test_a_kill_while_waiting_for_services_keeps_the_join_deadline(
    tmp_path: Path, livekit: LiveKitUnderTest, livekit_api: LiveKitAPI
) -> None:
    """kill -9 while a session waits for a service that accepted join-room but never joins.
    The new process adopts it still WaitingForServices, asks the service again, and ends it
    with the join-timeout reason at its join deadline from creation, not from the restart."""
    join_timeout, kill_after = 12.0, 4.0
    never = ScriptedService(accept_without_joining)
    async with (
        never.running(),
        restarts(tmp_path, livekit, livekit_api, join_timeout=join_timeout) as stack,
    ):
        await stack.start_manager()
        await stack.register("never", never.endpoint, "NEVER")
        created = await stack.create(
            {"user_identity": "waiting-user", "required_services": ["never"]}
        )
        assert created["status"] == "WaitingForServices", created
        session_id, room = created["session_id"], created["room_name"]
        await asyncio.sleep(kill_after)
        view = await stack.api.session(session_id)
        assert view["status"] == "WaitingForServices", view
        assert only_slot(view)["state"] == "dispatched", view
        await stack.kill_manager()
        asked = len(never.join_requests)

        await stack.start_manager()
        view = await stack.api.session(session_id)
        assert view["status"] == "WaitingForServices", view
        assert view["room_name"] == room, view
        await check_invariants(stack, answered=[session_id])

        async def join_calls() -> int:
            return len(never.join_requests)

        # Its join-room may have been lost with the killed process: the new one asks again.
        await poll(join_calls, lambda n: n > asked, WAIT, "join-room sent again")

        ended = await stack.api.wait_for_status(session_id, "Terminated", join_timeout + WAIT)
        assert ended["reason"] == JOIN_TIMEOUT_REASON, ended
        took = seconds_from_creation(ended, "terminated_at")
        print(f"join deadline {join_timeout:g} s: Terminated {took:.2f} s after creation")
        assert join_timeout - 1 <= took <= join_timeout + 3, (
            f"ended {took:.2f} s after creation: the join deadline was not kept across the restart"
        )
        assert room not in await stack.rooms()
        await check_invariants(stack, answered=[session_id])


@pytest.mark.parametrize("stop", STOPS)
async def test_a_duration_limit_fires_on_time_across_a_restart(
    tmp_path: Path, livekit: LiveKitUnderTest, livekit_api: LiveKitAPI, stop: str
) -> None:
    """A call with metadata.duration_limit 8 s; the manager is stopped (or killed) 4 s after
    creation and started again. The session ends "duration limit of 8 s reached" about 8 s
    after its creation (counted again from the restart it would be 12 s or more), and the
    user's call ends with it."""
    limit, stop_after = 8, 4.0
    async with restarts(tmp_path, livekit, livekit_api) as stack:
        await stack.start_manager()
        await stack.start_pong(PONG_SERVICE)
        created = await stack.create(
            {
                "user_identity": "limited-user",
                "required_services": [PONG_SERVICE],
                "wait_until_ready": True,
                "metadata": {"duration_limit": limit},
            }
        )
        assert created["status"] == "Ready", created
        session_id, room = created["session_id"], created["room_name"]

        async with connected_client(created["livekit_url"], created["access_token"]) as client:
            disconnected = first_disconnect(client.room)
            async with pinging(client) as pongs:
                await pongs.heard_after(0.0, "from pong")
                view = await stack.api.wait_for_status(session_id, "Active", ACTIVE_TIMEOUT)
                created_at = moment(view, "created_at")

                def age() -> float:
                    return (datetime.now(UTC) - created_at).total_seconds()

                await asyncio.sleep(max(0.0, stop_after - age()))
                stopped = age()
                await stop_or_kill(stack, stop)
                await stack.start_manager()
                restarted = age()
                ended = await stack.api.wait_for_status(session_id, "Terminated", WAIT)
            await asyncio.wait_for(disconnected, WAIT)  # the room went, and the call with it

        assert ended["reason"] == f"duration limit of {limit} s reached", ended
        took = seconds_from_creation(ended, "terminated_at")
        print(
            f"{stop}: limit {limit} s; stopped {stopped:.2f} s and back {restarted:.2f} s after "
            f"creation; Terminated {took:.2f} s after creation"
        )
        assert limit - 1 <= took <= limit + 3, (
            f"ended {took:.2f} s after creation: the limit was not kept across the restart"
        )
        assert room not in await stack.rooms()
        await check_invariants(stack, answered=[session_id])
