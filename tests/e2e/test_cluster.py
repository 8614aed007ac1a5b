"""Two real `session-manager` processes on one Redis and one LiveKit, end to end: the test
session's redis-server (`redis_server`, a key prefix of the test's own) and its external
livekit-server, whose webhooks go to `livekit.webhook_port` only, where manager A listens (the
"one load-balanced URL" case); manager B listens on a free port. Real pong services, a real
LiveKit client pinging on the data channel. What a user of either process sees:

- a session made on one process is read, changed and ended on the other;
- an SSE stream on one process carries what the other does, and resumes on the other with
  Last-Event-ID, with nothing lost or repeated;
- after a kill -9 of the process that owns a session, the other adopts it within about a lease:
  the call goes on, the session reads Active, and the survivor ends it itself;
- an instance with one place takes one session, whichever processes are asked at once;
- a service killed while its presence connection is held by one process is moved off it within
  seconds by the process that owns its session;
- a Redis restart refuses new sessions meanwhile (503, /health 503), the call goes on, and both
  processes recover by themselves.

The managers run with `lease_ttl` LEASE_TTL (2 s, not the default 5) so failovers are quick.
Needs the private network namespace of scripts/test.sh: WebRTC ignores loopback candidates.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from livekit.api import DeleteRoomRequest, LiveKitAPI

from tests.conftest import FAST_SETTINGS, LiveKitUnderTest, RedisUnderTest
from tests.e2e.failover_harness import (
    HTTP_TIMEOUT,
    Api,
    JsonDict,
    Pong,
    check_healthy,
    free_port,
    poll,
    require_netns,
    settings_flags,
    start_pong,
)
from tests.e2e.processes import (
    ManagerChild,
    ManagerProcesses,
    livekit_children,
    session_manager_command,
    session_manager_processes,
)
from tests.e2e.test_failover import first_disconnect, only_slot, pong_from
from tests.e2e.test_failover import pinging as pinging_only
from tests.e2e.test_ping_pong import connected_client
from tests.e2e.test_presence_failover import kill_and_hear_the_replacement
from tests.e2e.test_restart import (
    LIVE,
    LONGEST_SILENCE,
    Restarts,
    check_invariants,
    pinging,
    tagged_rooms,
)
from tests.fake_services import ScriptedService, accept_without_joining

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

LEASE_TTL = 2.0
PONG_SERVICE = "pong-cluster"
ACTIVE_TIMEOUT = 10.0
WAIT = 30.0  # deadline for anything the test waits for
# A dead owner's sessions are adopted about lease_ttl (plus a fifth, twice) after its last
# renewal; the bound is generous: this is not a benchmark.
ADOPTED_WITHIN = 4 * LEASE_TTL + 4
REDIS_DOWN = 2.5 * LEASE_TTL  # longer than a lease: every lease in Redis has run out meanwhile
TERMINATED_BY_REQUEST = "terminated by request"
CREATE = "/api/v1/create-session"


# ------------------------------------------------------------------------------ the managers


@dataclass
class Member:
    """One manager process of the cluster, as a user reaches it."""

    name: str
    port: int
    command: list[str]
    api: Api
    manager: ManagerChild


@dataclass
class Cluster:
    """A test's managers on one Redis (all in `processes`, stopped at the end), the children
    started beside them, and LiveKit as the test sees it."""

    processes: ManagerProcesses
    http: aiohttp.ClientSession
    livekit_api: LiveKitAPI
    deployment: str
    members: dict[str, Member] = field(default_factory=dict)

    @property
    def a(self) -> Member:
        return self.members["A"]

    @property
    def b(self) -> Member:
        return self.members["B"]

    async def start_member(self, name: str, port: int, command: list[str]) -> Member:
        """A manager beside the others, once its /health says healthy."""
        manager = await self.processes.start(command, alongside=True)
        api = Api(self.http, f"http://127.0.0.1:{port}")
        errors = (aiohttp.ClientError, TimeoutError, ValueError)
        await manager.wait_for_health(lambda: check_healthy(api), expected="healthy", errors=errors)
        assert not livekit_children(manager.child.pid), "a manager of an external LiveKit ran one"
        member = Member(name, port, command, api, manager)
        self.members[name] = member
        return member

    async def restart(self, member: Member) -> Member:
        """A new process with the same command (so on the same port) as a member now gone."""
        assert not member.manager.child.running, f"{member.name} still runs"
        return await self.start_member(member.name, member.port, member.command)

    async def start_pong(self, member: Member, service_id: str) -> Pong:
        """A pong process registering itself with `member`; returns once `member` lists it
        Healthy and the other processes know it too."""
        pong = await start_pong(self.processes.children, member.api, service_id)
        for other in self.members.values():
            await known_healthy(other, service_id)
        return pong

    def seen_from(self, member: Member) -> Restarts:
        """`member`'s API and LiveKit's rooms, for test_restart's invariant checks."""
        return Restarts(self.processes, member.api, self.livekit_api, self.deployment)

    async def rooms(self) -> dict[str, str]:
        return await tagged_rooms(self.livekit_api, self.deployment)


def member_command(
    livekit: LiveKitUnderTest,
    redis_server: RedisUnderTest,
    redis_prefix: str,
    deployment: str,
    port: int,
    **overrides: Any,
) -> list[str]:
    """A manager of the test's cluster: its Redis store under the test's prefix, the external
    LiveKit, one deployment tag for the whole cluster, short timeouts and leases."""
    settings = {
        "port": port,
        "livekit_url": livekit.url,
        "livekit_api_key": livekit.api_key,
        "livekit_api_secret": livekit.api_secret,
        "store": "redis",
        "redis_url": redis_server.url,
        "redis_prefix": redis_prefix,
        "lease_ttl": LEASE_TTL,
        "deployment": deployment,
        "shutdown_mode": "keep",
        **FAST_SETTINGS,
        "log_level": "DEBUG",  # for the log tails printed when a test fails
        **overrides,
    }
    return session_manager_command() + settings_flags(settings)


@asynccontextmanager
async def cluster(
    tmp_path: Path,
    livekit: LiveKitUnderTest,
    livekit_api: LiveKitAPI,
    redis_server: RedisUnderTest,
    redis_prefix: str,
    **overrides: Any,
) -> AsyncIterator[Cluster]:
    """Managers A (on the port LiveKit posts its webhooks to) and B (on a free port), both
    healthy, for `session_manager_processes`: every process is stopped at the end, passed or
    failed, each checked (exit 0, or -SIGKILL for one the test killed). At the end the rooms
    of the test's deployment still in the shared LiveKit (sessions kept live at shutdown) are
    deleted."""
    require_netns()
    deployment = f"cluster-{uuid.uuid4().hex[:12]}"

    def command(port: int) -> list[str]:
        return member_command(livekit, redis_server, redis_prefix, deployment, port, **overrides)

    a_port, b_port = livekit.webhook_port, free_port()
    # No kept-alive connections: a member may be killed and another started on its port.
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT)
    try:
        async with (
            session_manager_processes(tmp_path, command(a_port)) as processes,
            aiohttp.ClientSession(connector=connector, timeout=timeout) as http,
        ):
            stack = Cluster(processes, http, livekit_api, deployment)
            await stack.start_member("A", a_port, command(a_port))
            await stack.start_member("B", b_port, command(b_port))
            yield stack
    finally:
        for name in await tagged_rooms(livekit_api, deployment):
            await livekit_api.room.delete_room(DeleteRoomRequest(room=name))


# ----------------------------------------------------------------------------------- helpers


async def known_healthy(member: Member, service_id: str) -> None:
    async def status() -> str | None:
        code, body = await member.api.call("GET", f"/api/v1/microservices/{service_id}")
        return str(body["status"]) if code == 200 else None

    await poll(status, lambda s: s == "Healthy", WAIT, f"{service_id} Healthy at {member.name}")


async def session_events(member: Member, session_id: str) -> list[JsonDict]:
    page = await member.api.ok("GET", f"/api/v1/events?session_id={session_id}&since=0&limit=1000")
    events: list[JsonDict] = page["events"]
    return events


def types_of(events: list[JsonDict]) -> list[str]:
    return [str(event["type"]) for event in events]


def in_order(types: list[str], wanted: list[str]) -> bool:
    """Whether `wanted` appears in `types` as a subsequence."""
    remaining = iter(types)
    return all(kind in remaining for kind in wanted)


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[JsonDict]:
    """The events of an SSE stream as they come (the whole event, from each `data:` line)."""
    fields: dict[str, str] = {}
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith(":"):
            continue  # keep-alive comment
        if line:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
            continue
        if "data" in fields:
            event: JsonDict = orjson.loads(fields["data"])
            assert event["id"] == int(fields["id"]) and event["type"] == fields["event"], fields
            yield event
        fields = {}


async def read_until(
    stream: AsyncIterator[JsonDict], done: Callable[[list[JsonDict]], bool], what: str
) -> list[JsonDict]:
    """Events from `stream` until `done` accepts those read so far."""
    read: list[JsonDict] = []

    async def reading() -> None:
        async for event in stream:
            read.append(event)
            if done(read):
                return
        pytest.fail(f"the stream ended before {what}; read {types_of(read)}")

    try:
        await asyncio.wait_for(reading(), WAIT)
    except TimeoutError:
        pytest.fail(f"{what} not streamed within {WAIT} s; read {types_of(read)}")
    return read


def of_session(events: list[JsonDict], session_id: str) -> list[str]:
    return types_of([event for event in events if event["session_id"] == session_id])


async def rooms_without(stack: Cluster, room: str) -> None:
    rooms = await stack.rooms()
    assert room not in rooms, f"{room} is still in LiveKit: {rooms}"


# ------------------------------------------------------------------------------------ the tests


async def test_a_session_made_on_one_process_is_read_changed_and_ended_on_the_other(
    tmp_path: Path,
    livekit: LiveKitUnderTest,
    livekit_api: LiveKitAPI,
    redis_server: RedisUnderTest,
    redis_prefix: str,
) -> None:
    """A session created on A without services; B reads it, B adds `type:PONG` to it (A owns
    it: A's actor dispatches the pong registered at A, which joins; the session goes Ready),
    a client hears pong, and B ends the session: Terminated, the room gone from LiveKit, the
    client's call over. Ownership never moved (no SessionAdopted)."""
    async with cluster(tmp_path, livekit, livekit_api, redis_server, redis_prefix) as stack:
        a, b = stack.a, stack.b
        await stack.start_pong(a, PONG_SERVICE)
        created = await a.api.ok("POST", CREATE, {"user_identity": "u1", "required_services": []})
        assert created["status"] == "Ready", created
        session_id, room = created["session_id"], created["room_name"]
        assert room in await stack.rooms()

        read = await b.api.session(session_id)
        assert read["status"] == "Ready" and read["room_name"] == room, read
        assert read["services"] == [], read

        added = await b.api.ok(
            "POST", f"/api/v1/sessions/{session_id}/services", {"service": "type:PONG"}
        )
        assert added["status"] == "WaitingForServices", added
        assert [slot["service_id"] for slot in added["services"]] == [PONG_SERVICE], added
        answered = time.monotonic()
        # B's reads come from Redis, where the owner writes its views behind: they may lag.
        await poll(
            partial(b.api.session, session_id),
            lambda view: bool(view["services"]),
            WAIT,
            "the added service in B's read",
        )
        print(f"B read the service it added {time.monotonic() - answered:.3f} s after its answer")
        ready = await poll(
            partial(b.api.session, session_id),
            lambda view: view["status"] == "Ready" and bool(view["services"]),
            WAIT,
            "the session Ready with the pong B added, read on B",
        )
        assert only_slot(ready)["service_id"] == PONG_SERVICE, ready
        assert only_slot(ready)["state"] == "joined", ready
        assert (await a.api.session(session_id))["status"] == "Ready"

        async with connected_client(created["livekit_url"], created["access_token"]) as client:
            disconnected = first_disconnect(client.room)
            async with pinging(client) as pongs:
                await pongs.heard_after(0.0, "from the pong B added")
            view = await b.api.wait_for_status(session_id, "Active", ACTIVE_TIMEOUT)
            assert view["client"]["joined"] is True, view

            ended = await b.api.ok("DELETE", f"/api/v1/sessions/{session_id}")
            assert ended["status"] == "Terminated", ended
            assert ended["reason"] == TERMINATED_BY_REQUEST, ended
            await rooms_without(stack, room)
            await asyncio.wait_for(disconnected, WAIT)  # the user sees the call end

        assert (await a.api.session(session_id))["status"] == "Terminated"
        kinds = types_of(await session_events(b, session_id))
        assert "SessionAdopted" not in kinds, kinds
        assert in_order(
            kinds,
            ["SessionCreated", "MicroserviceDispatched", "MicroserviceJoined", "ClientJoined"],
        ), kinds
        assert kinds[-1] == "SessionTerminated", kinds
        for member in (a, b):
            await check_invariants(stack.seen_from(member), answered=[session_id])


async def test_an_event_stream_follows_the_other_process_and_resumes_there(
    tmp_path: Path,
    livekit: LiveKitUnderTest,
    livekit_api: LiveKitAPI,
    redis_server: RedisUnderTest,
    redis_prefix: str,
) -> None:
    """An SSE subscriber on A (`GET /api/v1/events`) sees the events of a session created on
    B, disconnects, and while it is away B creates a second session and ends both. It resumes
    on B with Last-Event-ID: the two parts together are exactly the history both processes
    hold (no gap, no EventsDropped, nothing twice), in order."""
    async with cluster(tmp_path, livekit, livekit_api, redis_server, redis_prefix) as stack:
        a, b = stack.a, stack.b
        headers = {"Accept": "text/event-stream"}
        no_total = aiohttp.ClientTimeout(total=None, sock_read=WAIT)

        async with stack.http.get(
            f"{a.api.base_url}/api/v1/events", headers=headers, timeout=no_total
        ) as response:
            assert response.status == 200, await response.text()
            assert response.headers["Content-Type"].startswith("text/event-stream")
            first = await b.api.ok(
                "POST", CREATE, {"user_identity": "sse-1", "required_services": []}
            )
            one = first["session_id"]
            on_a = await read_until(
                sse_events(response),
                lambda read: "SessionReady" in of_session(read, one),
                "the Ready of the session created on B, on A",
            )
        assert in_order(of_session(on_a, one), ["SessionCreated", "SessionReady"]), on_a

        # While nobody listens, B makes a second session and ends both.
        second = await b.api.ok("POST", CREATE, {"user_identity": "sse-2", "required_services": []})
        two = second["session_id"]
        for session_id in (one, two):
            ended = await b.api.ok("DELETE", f"/api/v1/sessions/{session_id}")
            assert ended["status"] == "Terminated", ended

        resume = {**headers, "Last-Event-ID": str(on_a[-1]["id"])}
        async with stack.http.get(
            f"{b.api.base_url}/api/v1/events", headers=resume, timeout=no_total
        ) as response:
            assert response.status == 200, await response.text()
            on_b = await read_until(
                sse_events(response),
                lambda read: all(
                    "SessionTerminated" in of_session(read, sid) for sid in (one, two)
                ),
                "the end of both sessions, on B",
            )

        streamed = on_a + on_b
        ids = [event["id"] for event in streamed]
        kinds = types_of(streamed)
        print(f"streamed {len(on_a)} events on A, then {len(on_b)} on B after resuming")
        assert "EventsDropped" not in kinds, kinds
        assert len(set(ids)) == len(ids), f"an event streamed twice: {ids}"
        assert ids == sorted(ids), f"out of order: {ids}"
        for session_id in (one, two):
            assert in_order(
                of_session(streamed, session_id),
                ["SessionCreated", "SessionReady", "SessionTerminated"],
            ), of_session(streamed, session_id)
        assert of_session(on_a, two) == [], "the second session was made after A's stream ended"

        # Nothing missed: both processes' histories from the first streamed event to the last
        # are exactly what was streamed.
        since, last = ids[0] - 1, ids[-1]

        async def history(member: Member) -> list[int]:
            page = await member.api.ok("GET", f"/api/v1/events?since={since}&limit=1000")
            assert page["gap"] is False, page
            return [event["id"] for event in page["events"] if event["id"] <= last]

        for member in (a, b):
            kept = await poll(
                partial(history, member),
                lambda kept: bool(kept) and kept[-1] == last,
                WAIT,
                f"{member.name}'s history up to the last event streamed",
            )
            assert kept == ids, f"{member.name} holds {kept}; streamed {ids}"


async def test_a_killed_owner_s_session_is_adopted_by_the_other_process(
    tmp_path: Path,
    livekit: LiveKitUnderTest,
    livekit_api: LiveKitAPI,
    redis_server: RedisUnderTest,
    redis_prefix: str,
) -> None:
    """A client in a session created on A hears pong; A is killed (SIGKILL). A request B
    receives for the session at once is answered once B owns it; B adopts the session within
    about a lease (its SessionAdopted event, after comparing the room's participants with
    LiveKit); the client hears pong all along; B reads it Active. LiveKit's webhooks go to A's
    port only: a new process started there relays them to B again (the client leaving is
    seen by B). B ends the session itself: the room goes."""
    async with cluster(tmp_path, livekit, livekit_api, redis_server, redis_prefix) as stack:
        a, b = stack.a, stack.b
        await stack.start_pong(a, PONG_SERVICE)
        created = await a.api.create_session("kill-user", [PONG_SERVICE])
        assert created["status"] == "Ready", created
        session_id, room = created["session_id"], created["room_name"]
        rooms = await stack.rooms()
        assert room in rooms, rooms
        services_path = f"/api/v1/sessions/{session_id}/services"

        async with connected_client(created["livekit_url"], created["access_token"]) as client:
            disconnected = first_disconnect(client.room)
            async with pinging(client) as pongs:
                await pongs.heard_after(0.0, "from pong")
                await a.api.wait_for_status(session_id, "Active", ACTIVE_TIMEOUT)
                await b.api.wait_for_status(session_id, "Active", ACTIVE_TIMEOUT)

                call_start = time.monotonic()
                await a.manager.kill()
                killed = time.monotonic()
                # Asked of B while the owner is dead: B passes it on until the session has an
                # owner again (B itself), whose actor answers: pong is in it already.
                asked_at_once = asyncio.create_task(
                    b.api.call("POST", services_path, {"service": PONG_SERVICE})
                )

                events = await poll(
                    lambda: session_events(b, session_id),
                    lambda events: "SessionAdopted" in types_of(events),
                    WAIT,
                    "the session adopted by B",
                )
                adopted_after = time.monotonic() - killed
                adoption = next(e for e in events if e["type"] == "SessionAdopted")
                print(f"kill -9 of A: B adopted the session {adopted_after:.2f} s after")
                assert adopted_after < ADOPTED_WITHIN, f"adopted after {adopted_after:.2f} s"
                assert adoption["data"]["room_checked"] is True, adoption

                status, answer = await asked_at_once
                answered_after = time.monotonic() - killed
                print(f"a request made on B at the kill answered after {answered_after:.2f} s")
                assert status == 409 and answer["error"] == "Conflict", (status, answer)

                view = await b.api.session(session_id)
                assert view["status"] == "Active", view
                assert view["room_name"] == room, view
                assert view["client"]["joined"] is True, view["client"]
                slot = only_slot(view)
                assert slot["service_id"] == PONG_SERVICE and slot["state"] == "joined", slot
                assert (await stack.rooms()).get(room) == rooms[room], "not the same LiveKit room"

                await pongs.heard_after(killed + adopted_after, "after the adoption")
                silence = pongs.longest_silence(call_start, time.monotonic())
                print(f"longest wait for a pong across the kill: {silence:.2f} s")
                assert silence < LONGEST_SILENCE, f"no pong for {silence:.2f} s"
                assert not disconnected.done(), "the client was disconnected"
                await check_invariants(stack.seen_from(b), answered=[session_id])

                # LiveKit's webhooks go to A's port alone: a new process there relays them.
                a = await stack.restart(a)
        left = time.monotonic()  # the client left: LiveKit posts participant_left to A's port

        view = await poll(
            lambda: b.api.session(session_id),
            lambda view: view["client"]["joined"] is False,
            WAIT,
            "B told by the new A that the client left",
        )
        print(f"client left; B knew {time.monotonic() - left:.2f} s after")
        assert view["status"] in LIVE, view
        assert "SessionAdopted" not in types_of(
            [e for e in await session_events(b, session_id) if e["id"] > adoption["id"]]
        ), "the new A took the session over from B"

        ended = await b.api.ok("DELETE", f"/api/v1/sessions/{session_id}")
        assert ended["status"] == "Terminated", ended
        assert ended["reason"] == TERMINATED_BY_REQUEST, ended
        await rooms_without(stack, room)
        for member in (a, b):
            await check_invariants(stack.seen_from(member), answered=[session_id])


async def test_a_service_lost_at_one_process_is_moved_by_the_owner_at_the_other(
    tmp_path: Path,
    livekit: LiveKitUnderTest,
    livekit_api: LiveKitAPI,
    redis_server: RedisUnderTest,
    redis_prefix: str,
) -> None:
    """Two pongs register at A, so A holds their presence connections; a session made on B
    (B owns it) is served by the first. kill -9 of that pong: A sees the connection drop
    without a goodbye and says so on the cluster bus, and B moves its session to the other
    pong within seconds, at the default health settings (which would take 20-30 s): the client
    hears the other pong, B's view says why the slot moved ("process lost"), and both
    processes list the dead instance Unhealthy."""
    async with cluster(tmp_path, livekit, livekit_api, redis_server, redis_prefix) as stack:
        a, b = stack.a, stack.b
        first = await stack.start_pong(a, "pong-first")
        created = await b.api.create_session("presence-user", ["type:PONG"])
        assert created["status"] == "Ready", created
        session_id = created["session_id"]
        assert only_slot(await b.api.session(session_id))["service_id"] == "pong-first"
        await stack.start_pong(a, "pong-other")

        async with connected_client(created["livekit_url"], created["access_token"]) as client:
            async with pinging_only(client):
                await pong_from(client, "pong-first", WAIT)
                await b.api.wait_for_status(session_id, "Active", ACTIVE_TIMEOUT)
                heard_after = await kill_and_hear_the_replacement(client, first, "pong-other")
                print(f"pong-first's presence at A, the session at B: heard in {heard_after:.2f} s")
                view = await b.api.wait_for_status(session_id, "Active", ACTIVE_TIMEOUT)

        slot = only_slot(view)
        assert (slot["service_id"], slot["state"]) == ("pong-other", "joined"), slot
        failover = slot["failover"]
        print(f"B's account: {failover}")
        assert (failover["cause"], failover["from_service_id"]) == ("process lost", "pong-first")
        for member in (a, b):
            lost = await member.api.microservice("pong-first")
            assert (lost["status"], lost["last_error"]) == ("Unhealthy", "process lost"), lost


async def test_an_instance_with_one_place_takes_one_session_across_processes(
    tmp_path: Path,
    livekit: LiveKitUnderTest,
    livekit_api: LiveKitAPI,
    redis_server: RedisUnderTest,
    redis_prefix: str,
) -> None:
    """An instance registered (at A) with max_sessions 1; creates requiring it sent at once to
    A and B, four each: exactly one is 200, the others 503 NoCapacity, and one session holds
    it across the cluster. The session is ended by the other process; once its place is given
    back, a race again has one winner. Three rounds. (examples.pong has no --max-sessions: a
    scripted service, which accepts join-room and never joins, is the instance.)"""
    only = ScriptedService(accept_without_joining)
    rounds, per_member = 3, 4
    async with (
        only.running(),
        cluster(tmp_path, livekit, livekit_api, redis_server, redis_prefix) as stack,
    ):
        a, b = stack.a, stack.b
        registration = {
            "service_id": "only-one",
            "endpoint": only.endpoint,
            "metadata": {"type": "ONE", "max_sessions": 1},
        }
        await a.api.ok("POST", "/api/v1/microservices/register", registration)
        for member in (a, b):
            await known_healthy(member, "only-one")

        winners: list[str] = []
        for round_ in range(rounds):
            members = [a, b] * per_member
            races = 0
            while True:  # until the place given back by the last round is free again
                races += 1
                bodies = [
                    {
                        "user_identity": f"cap-{round_}-{races}-{i}",
                        "required_services": ["type:ONE"],
                    }
                    for i in range(len(members))
                ]
                answers = await asyncio.gather(
                    *(
                        m.api.call("POST", CREATE, body)
                        for m, body in zip(members, bodies, strict=True)
                    )
                )
                statuses = [status for status, _ in answers]
                assert statuses.count(200) <= 1, f"two sessions on one place: {answers}"
                for status, answer in answers:
                    if status != 200:
                        assert status == 503, answers
                        assert set(answer) == {"error", "message", "timestamp"}, answer
                        assert answer["error"] == "NoCapacity", answer
                if 200 in statuses:
                    break
                assert round_ > 0, f"nobody got the free place: {answers}"
                assert races < 100, "the place of the ended session was never given back"
                await asyncio.sleep(0.1)
            index = statuses.index(200)
            winner, by = answers[index][1], members[index]
            assert winner["status"] == "WaitingForServices", winner
            session_id = winner["session_id"]
            winners.append(session_id)
            print(f"round {round_ + 1}: won on {by.name} after {races} race(s)")

            for member in (a, b):
                sessions = await stack.seen_from(member).sessions()
                on_it = {
                    sid
                    for sid, view in sessions.items()
                    if view["status"] in LIVE
                    and any(slot["service_id"] == "only-one" for slot in view["services"])
                }
                assert on_it == {session_id}, f"{member.name} lists on the instance: {on_it}"

            other = b if by is a else a
            ended = await other.api.ok("DELETE", f"/api/v1/sessions/{session_id}")
            assert ended["status"] == "Terminated", ended

        asked = {request["session_id"] for request in only.join_requests}
        assert asked == set(winners), f"join-room for {asked}; sessions answered: {winners}"
        for member in (a, b):
            await check_invariants(stack.seen_from(member), answered=winners)


async def test_a_redis_restart_refuses_new_sessions_and_the_call_goes_on(
    tmp_path: Path,
    livekit: LiveKitUnderTest,
    livekit_api: LiveKitAPI,
    redis_server: RedisUnderTest,
    redis_prefix: str,
) -> None:
    """A client in a session created on A hears pong. Redis is stopped (saving its data, like
    a persistent Redis) for longer than a lease, then started again. Meanwhile creates on
    both processes are 503 with the error envelope and /health is 503 naming the store or
    the cluster, and the client hears pong. Afterwards both recover by themselves (/health
    200, creates work), the session still reads Active on both, the call still goes on, and
    it can be ended from B."""
    async with cluster(tmp_path, livekit, livekit_api, redis_server, redis_prefix) as stack:
        a, b = stack.a, stack.b
        await stack.start_pong(a, PONG_SERVICE)
        created = await a.api.create_session("outage-user", [PONG_SERVICE])
        assert created["status"] == "Ready", created
        session_id, room = created["session_id"], created["room_name"]
        body = {"user_identity": "during-outage", "required_services": []}
        answered = [session_id]

        async with connected_client(created["livekit_url"], created["access_token"]) as client:
            disconnected = first_disconnect(client.room)
            async with pinging(client) as pongs:
                await pongs.heard_after(0.0, "from pong")
                await a.api.wait_for_status(session_id, "Active", ACTIVE_TIMEOUT)

                call_start = time.monotonic()
                await asyncio.to_thread(redis_server.stop)  # SHUTDOWN SAVE
                stopped = time.monotonic()
                try:
                    for member in (a, b):
                        _, health = await poll(
                            partial(member.api.call, "GET", "/health"),
                            lambda answer: answer[0] == 503,
                            WAIT,
                            f"{member.name}'s /health 503",
                        )
                        components = {problem["component"] for problem in health["problems"]}
                        assert components & {"store", "cluster"}, health
                        status, envelope = await member.api.call("POST", CREATE, body)
                        assert status == 503, (member.name, status, envelope)
                        assert set(envelope) == {"error", "message", "timestamp"}, envelope
                        print(f"{member.name} during the outage: {envelope['error']}, {health}")
                    await asyncio.sleep(max(0.0, REDIS_DOWN - (time.monotonic() - stopped)))
                    await pongs.heard_after(stopped, "while Redis is down")
                finally:
                    # In this thread: a server started from a worker thread dies with it.
                    redis_server.start()
                back = time.monotonic()
                print(f"Redis down {back - stopped:.2f} s")

                for member in (a, b):
                    await poll(
                        partial(member.api.call, "GET", "/health"),
                        lambda answer: answer[0] == 200,
                        WAIT,
                        f"{member.name}'s /health 200 again",
                    )
                    recovered = time.monotonic() - back
                    print(f"{member.name} healthy {recovered:.2f} s after Redis came back")
                    fresh = await member.api.ok("POST", CREATE, {**body, "user_identity": "after"})
                    assert fresh["status"] == "Ready", fresh
                    answered.append(fresh["session_id"])

                for member in (a, b):
                    view = await member.api.session(session_id)
                    assert view["status"] == "Active", (member.name, view)
                    assert view["room_name"] == room, view
                    assert view["client"]["joined"] is True, view["client"]
                    assert only_slot(view)["state"] == "joined", view
                await pongs.heard_after(time.monotonic(), "after Redis came back")
                silence = pongs.longest_silence(call_start, time.monotonic())
                print(f"longest wait for a pong across the Redis restart: {silence:.2f} s")
                assert silence < LONGEST_SILENCE, f"no pong for {silence:.2f} s"
                assert not disconnected.done(), "the client was disconnected"
                moved = "SessionAdopted" in types_of(await session_events(b, session_id))
                print(f"the session {'moved to B' if moved else 'stayed with A'} meanwhile")
                for member in (a, b):
                    await check_invariants(stack.seen_from(member), answered=answered)

            ended = await b.api.ok("DELETE", f"/api/v1/sessions/{session_id}")
            assert ended["status"] == "Terminated", ended
            await rooms_without(stack, room)
            await asyncio.wait_for(disconnected, WAIT)
