"""End to end failover, deletion and client departure: the real `session-manager` (with its managed
livekit-server, on random ports), real pong processes and a real LiveKit client.

Needs the private network namespace of scripts/test.sh: WebRTC ignores loopback candidates.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from livekit import rtc

from tests.e2e.failover_harness import Api, JsonDict, Stack, poll, require_netns, running_manager
from tests.e2e.test_ping_pong import PONG, Client, connected_client, send_pings

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

PONG_TIMEOUT = 20.0  # first pong from a freshly joined service
FAILOVER_TIMEOUT = 60.0  # kill -> pong from the replacement; LiveKit must first notice the loss
SLOW_FAILOVER = 30.0  # slower than this is worth a loud line in the output
ACTIVE_TIMEOUT = 10.0
LEAVE_TIMEOUT = 10.0
CLIENT_GRACE = 2.0
CLIENT_GRACE_SLACK = 4.0  # Terminated at most this long after the grace has run out

FAST_SETTINGS: dict[str, float | int | str] = {
    "health_interval": 1,
    "health_timeout": 1,
    "unhealthy_after": 2,
    "dispatch_attempts": 2,
    "dispatch_timeout": 2,
    "dispatch_backoff": 0.1,
    "join_timeout": 20,
    "max_redispatch": 3,
    "log_level": "DEBUG",  # for the log tails printed when a test fails
}


# ------------------------------------------------------------------------------------ helpers


class Timeline:
    """Moments (seconds after a start) at which things were first seen."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.marks: dict[str, float] = {}

    def mark(self, what: str) -> None:
        self.marks.setdefault(what, round(time.monotonic() - self.start, 2))

    def report(self) -> str:
        ordered = sorted(self.marks.items(), key=lambda item: item[1])
        return ", ".join(f"{what} +{at:.2f} s" for what, at in ordered)


async def pong_from(
    client: Client, identity: str, timeout: float, timeline: Timeline | None = None
) -> None:
    """Wait for a b"pong" sent by `identity`; pongs from anyone else are skipped. LiveKit may
    announce a data-only participant seconds after its packets flow: those come with no sender
    (marked on `timeline`) and do not count."""

    async def listen() -> None:
        while True:
            packet = await client.packets.get()
            sender = packet.participant.identity if packet.participant is not None else None
            if packet.data == PONG and sender == identity:
                return
            if packet.data == PONG and sender is None and timeline is not None:
                timeline.mark("pong from a not yet announced sender")

    try:
        await asyncio.wait_for(listen(), timeout)
    except TimeoutError:
        pytest.fail(f"no pong from {identity} within {timeout} s")


@asynccontextmanager
async def pinging(client: Client) -> AsyncIterator[None]:
    """Ping the room every few hundred ms for as long as the block runs."""
    task = asyncio.create_task(send_pings(client.room), name="pinger")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def first_of(*coroutines: Coroutine[Any, Any, None]) -> None:
    """Run the coroutines until the first one finishes (its exception, if any, propagates);
    the others are cancelled."""
    tasks = [asyncio.create_task(coroutine) for coroutine in coroutines]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def only_slot(view: JsonDict) -> JsonDict:
    services = view["services"]
    assert len(services) == 1, services
    slot: JsonDict = services[0]
    return slot


async def watch_failover(api: Api, session_id: str, killed: str, timeline: Timeline) -> None:
    """Mark, from the manager's API, when it noticed the loss and when it replaced it; fail as
    soon as the session ends instead."""
    while True:
        view = await api.session(session_id)
        if view["status"] in ("Terminating", "Terminated"):
            pytest.fail(f"the session ended instead of failing over: {view['reason']}")
        slot = only_slot(view)
        if view["status"] != "Active":
            timeline.mark(f"session {view['status']}")
        if slot["service_id"] != killed:
            timeline.mark(f"slot given to {slot['service_id']}")
            if view["status"] == "Active" and slot["state"] == "joined":
                timeline.mark(f"{slot['service_id']} joined, session Active again")
        if (await api.microservice(killed))["status"] == "Unhealthy":
            timeline.mark(f"{killed} Unhealthy")
        await asyncio.sleep(0.1)


def on_participant_gone(room: rtc.Room, timeline: Timeline) -> None:
    def gone(participant: rtc.RemoteParticipant) -> None:
        timeline.mark(f"client told {participant.identity} left")

    room.on("participant_disconnected", gone)


def first_disconnect(room: rtc.Room) -> asyncio.Future[int]:
    """Resolves with the reason of the room's first `disconnected` event."""
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def disconnected(reason: int) -> None:
        if not future.done():
            future.set_result(reason)

    room.on("disconnected", disconnected)
    return future


async def status_changes(api: Api, session_id: str) -> list[str]:
    """The statuses one session went through, from the manager's event log."""
    page = await api.ok("GET", f"/api/v1/events?session_id={session_id}&since=0&limit=1000")
    return [
        event["data"]["new"] for event in page["events"] if event["type"] == "SessionStatusChanged"
    ]


def log_has_line(text: str, *needles: str) -> bool:
    return any(all(needle in line for needle in needles) for line in text.splitlines())


# ------------------------------------------------------------------------------------ the tests


async def test_killed_service_is_replaced_and_pong_comes_back(tmp_path: Path) -> None:
    require_netns()
    async with running_manager(tmp_path, **FAST_SETTINGS) as stack:
        await stack.start_pong("pong-a")
        await stack.start_pong("pong-b")
        created = await stack.api.create_session("failover-user", ["type:PONG"])
        assert created["status"] == "Ready", created
        session_id = created["session_id"]
        slot = only_slot(await stack.api.session(session_id))
        assert slot["requirement"] == "type:PONG" and slot["type"] == "PONG", slot
        assert slot["state"] == "joined" and slot["redispatches"] == 0, slot
        first = slot["service_id"]
        (other,) = set(stack.pongs) - {first}

        async with connected_client(created["livekit_url"], created["access_token"]) as client:
            async with pinging(client):
                await pong_from(client, first, PONG_TIMEOUT)
                await stack.api.wait_for_status(session_id, "Active", ACTIVE_TIMEOUT)

                timeline = Timeline()
                stack.pongs[first].child.process.kill()
                on_participant_gone(client.room, timeline)
                try:
                    await first_of(
                        pong_from(client, other, FAILOVER_TIMEOUT, timeline),
                        watch_failover(stack.api, session_id, first, timeline),
                    )
                    timeline.mark(f"pong from {other}")
                    view = await stack.api.wait_for_status(session_id, "Active", ACTIVE_TIMEOUT)
                finally:
                    print(f"failover after SIGKILL of {first}: {timeline.report()}")
            await check_after_failover(stack, view, first, other, timeline)
            up = ["WaitingForServices", "Ready", "Active"]
            assert await status_changes(stack.api, session_id) == up + up, (
                "the slot was not refilled through WaitingForServices"
            )
            ended = await stack.api.ok("DELETE", f"/api/v1/sessions/{session_id}")
            assert ended["status"] == "Terminated", ended


async def check_after_failover(
    stack: Stack, view: JsonDict, killed: str, other: str, timeline: Timeline
) -> None:
    assert await stack.pongs[killed].child.process.wait() == -9
    slot = only_slot(view)
    assert slot["service_id"] == other, slot
    assert slot["endpoint"] == stack.pongs[other].url, slot
    assert slot["requirement"] == "type:PONG" and slot["type"] == "PONG", slot
    assert slot["state"] == "joined" and slot["joined_at"] is not None, slot
    assert slot["redispatches"] >= 1, slot
    assert view["status"] == "Active" and view["reason"] is None, view
    assert view["client"]["joined"] is True, view["client"]

    listing = await stack.api.ok("GET", "/api/v1/microservices?type=PONG")
    by_id = {entry["service_id"]: entry for entry in listing["microservices"]}
    assert set(by_id) == {killed, other}, listing
    assert by_id[killed]["status"] == "Unhealthy" and by_id[killed]["sessions"] == 0, by_id
    assert by_id[other]["status"] == "Healthy" and by_id[other]["sessions"] == 1, by_id

    pong_after = timeline.marks[f"pong from {other}"]
    if pong_after > SLOW_FAILOVER:
        print(f"SLOW FAILOVER: pong from {other} only {pong_after:.1f} s after the kill")


async def test_delete_session_sends_services_away_and_removes_room(tmp_path: Path) -> None:
    require_netns()
    async with running_manager(tmp_path, **FAST_SETTINGS) as stack:
        pong = await stack.start_pong("pong-del")
        created = await stack.api.create_session("deleting-user", ["pong-del"])
        session_id = created["session_id"]
        path = f"/api/v1/sessions/{session_id}"

        async with connected_client(created["livekit_url"], created["access_token"]) as client:
            disconnected = first_disconnect(client.room)
            async with pinging(client):
                await pong_from(client, "pong-del", PONG_TIMEOUT)
            await stack.api.wait_for_status(session_id, "Active", ACTIVE_TIMEOUT)
            assert (await pong.health(stack.api.http))["sessions"] == 1

            deleted = await stack.api.ok("DELETE", path)
            assert deleted["status"] == "Terminated", deleted
            assert deleted["reason"] == "terminated by request", deleted
            assert deleted["terminated_at"] is not None, deleted

            try:
                reason = await asyncio.wait_for(disconnected, LEAVE_TIMEOUT)
            except TimeoutError:
                pytest.fail(f"the client was not disconnected within {LEAVE_TIMEOUT} s")
            assert reason == rtc.DisconnectReason.ROOM_DELETED, (
                f"client disconnected with {rtc.DisconnectReason.Name(reason)}"  # type: ignore[arg-type]
            )

        await poll(
            lambda: pong.health(stack.api.http),
            lambda health: health["sessions"] == 0,
            LEAVE_TIMEOUT,
            "pong's /health sessions 0",
        )
        # Deleting the room alone would also empty pong; leave_requested proves leave-room came.
        assert log_has_line(pong.child.log_text(), "pong left", session_id, "'leave_requested'")
        listing = await stack.api.ok("GET", "/api/v1/microservices")
        (entry,) = (e for e in listing["microservices"] if e["service_id"] == "pong-del")
        assert entry["sessions"] == 0, entry

        assert await stack.api.ok("DELETE", path) == deleted
        assert await stack.api.session(session_id) == deleted


async def test_client_leaving_ends_session_after_grace(tmp_path: Path) -> None:
    require_netns()
    async with running_manager(tmp_path, client_reconnect_grace=CLIENT_GRACE) as stack:
        created = await stack.api.create_session("leaving-user", [])
        session_id = created["session_id"]
        async with connected_client(created["livekit_url"], created["access_token"]) as client:
            await stack.api.wait_for_status(session_id, "Active", ACTIVE_TIMEOUT)
            left = time.monotonic()
            await client.room.disconnect()

        limit = CLIENT_GRACE + CLIENT_GRACE_SLACK
        view = await stack.api.wait_for_status(session_id, "Terminated", limit)
        ended_after = time.monotonic() - left
        print(f"client left; session Terminated {ended_after:.2f} s later: {view['reason']!r}")
        assert view["reason"] == f"client left and did not return within {CLIENT_GRACE:g} s"
        assert view["client"]["joined"] is False, view["client"]
        assert view["client"]["left_at"] is not None, view["client"]
