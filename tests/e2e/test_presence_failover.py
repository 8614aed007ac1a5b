"""Failover of SDK services by presence, end to end: the real `session-manager` at its default
failover settings (its managed livekit-server on random ports), real pong processes, and a real
LiveKit client that pings and hears pong.

- `kill -9` of the pong serving a call: the client hears the other pong within seconds (the
  aim is 2 s; asserted generously, the measured time is printed) and the session is Active
  again, its slot telling why it moved and how long that took;
- a pong whose event loop stalls 1.5 s every 2 s keeps its session;
- a pong stopped with SIGTERM drains and hands its session over: no failure counted;
- a manager restart (shutdown_mode keep, SQLite, external LiveKit) fails nothing over.

Needs the private network namespace of scripts/test.sh: WebRTC ignores loopback candidates.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from livekit.api import LiveKitAPI

from tests.conftest import LiveKitUnderTest
from tests.e2e.failover_harness import (
    Api,
    JsonDict,
    Pong,
    Stack,
    poll,
    require_netns,
    running_manager,
)
from tests.e2e.test_failover import Timeline, only_slot, pinging, pong_from
from tests.e2e.test_ping_pong import PONG, Client, connected_client
from tests.e2e.test_restart import restarts, stop_or_kill
from tests.polling import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

PONG_TIMEOUT = 20.0  # first pong from a freshly joined service
FAILOVER_LIMIT = 5.0  # kill -> pong from the other instance; the aim is 2 s (a benchmark's job)
ACTIVE_TIMEOUT = 10.0
WATCH = 8.0  # how long a session is watched for a failover that must not come
STALLS_TIMEOUT = 30.0  # four stalls begun (three whole ones) take about 14 s
SETTINGS: dict[str, float | int | str] = {"log_level": "DEBUG"}  # defaults otherwise


async def first_pong_after(client: Client, moment: float, other: str, timeline: Timeline) -> None:
    """The first pong the replacement sends after `moment`. One with no sender yet (LiveKit
    announces a data-only participant late) counts once the killed one cannot have sent it."""
    while True:
        packet = await client.packets.get()
        if packet.data != PONG:
            continue
        sender = packet.participant.identity if packet.participant is not None else None
        if sender == other or (sender is None and time.monotonic() - moment > 0.2):
            timeline.mark(f"pong from {other}" if sender else "pong from an unannounced sender")
            return


async def kill_and_hear_the_replacement(client: Client, killed: Pong, other: str) -> float:
    """kill -9 of `killed`; fails unless the client hears `other` within FAILOVER_LIMIT.
    Returns the seconds from the kill to that pong."""
    timeline = Timeline()
    moment = time.monotonic()
    killed.child.process.kill()
    try:
        await asyncio.wait_for(first_pong_after(client, moment, other, timeline), FAILOVER_LIMIT)
    except TimeoutError:
        pytest.fail(f"no pong from {other} within {FAILOVER_LIMIT} s of the kill")
    finally:
        print(f"kill -9 of {killed.service_id} -> {timeline.report()}")
    return time.monotonic() - moment


async def served_call(stack: Stack, first_id: str, other_id: str) -> JsonDict:
    """`first_id` serves a new session of type PONG (it is the only instance when the session
    is made); then `other_id` is started beside it. Returns the create answer."""
    await stack.start_pong(first_id)
    created = await stack.api.create_session("presence-user", ["type:PONG"])
    assert created["status"] == "Ready", created
    assert only_slot(await stack.api.session(created["session_id"]))["service_id"] == first_id
    await stack.start_pong(other_id)
    return created


def stalls(pong: Pong) -> int:
    """How many times the service has begun to block its event loop so far."""
    return pong.child.log_text().count("stalling the event loop")


async def health_errors(api: Api, service_id: str) -> list[str | None]:
    page = await api.ok("GET", "/api/v1/events?type=MicroserviceHealthChanged&since=0&limit=1000")
    return [e["data"]["error"] for e in page["events"] if e["service_id"] == service_id]


async def test_a_killed_sdk_service_is_replaced_within_seconds(tmp_path: Path) -> None:
    require_netns()
    async with running_manager(tmp_path, **SETTINGS) as stack:
        created = await served_call(stack, "pong-a", "pong-b")
        session_id = created["session_id"]
        async with connected_client(created["livekit_url"], created["access_token"]) as client:
            async with pinging(client):
                await pong_from(client, "pong-a", PONG_TIMEOUT)
                await stack.api.wait_for_status(session_id, "Active", ACTIVE_TIMEOUT)

                heard_after = await kill_and_hear_the_replacement(
                    client, stack.pongs["pong-a"], "pong-b"
                )
                print(f"pong from the replacement {heard_after:.2f} s after kill -9")
                view = await stack.api.wait_for_status(session_id, "Active", ACTIVE_TIMEOUT)

        slot = only_slot(view)
        assert slot["service_id"] == "pong-b" and slot["state"] == "joined", slot
        failover = slot["failover"]
        assert failover["cause"] == "process lost" and failover["from_service_id"] == "pong-a"
        print(f"the manager's own account: {failover}")
        assert failover["detect_ms"] < 1500 and failover["failover_ms"] < FAILOVER_LIMIT * 1000
        killed_view = await stack.api.microservice("pong-a")
        assert (killed_view["status"], killed_view["last_error"]) == ("Unhealthy", "process lost")
        assert await health_errors(stack.api, "pong-a") == ["process lost"]
        metrics = await stack.api.http.get(f"{stack.api.base_url}/metrics")
        text = await metrics.text()
        assert 'session_manager_failover_seconds_count{cause="process lost"} 1.0' in text


async def test_a_slow_but_alive_service_keeps_its_session(tmp_path: Path) -> None:
    require_netns()
    async with running_manager(tmp_path, **SETTINGS) as stack:
        slow = await stack.start_pong("pong-slow", "--stall-every", "2", "--stall-for", "1.5")
        created = await stack.api.create_session("slow-user", ["type:PONG"])
        session_id = created["session_id"]
        await stack.start_pong("pong-spare")  # somewhere a failover could go
        async with connected_client(created["livekit_url"], created["access_token"]) as client:
            async with pinging(client):
                await pong_from(client, "pong-slow", PONG_TIMEOUT)
                await stack.api.wait_for_status(session_id, "Active", ACTIVE_TIMEOUT)
                # Watch the live session through three whole stalls, counted in the service's
                # own log rather than assumed from a sleep: one stall every 3.5 s.
                stalls_before = stalls(slow)
                await eventually(lambda: stalls(slow) >= stalls_before + 4, timeout=STALLS_TIMEOUT)
                await pong_from(client, "pong-slow", PONG_TIMEOUT)  # still the one answering
        view = await stack.api.session(session_id)
        slot = only_slot(view)
        assert view["status"] == "Active", view
        assert (slot["service_id"], slot["redispatches"], slot["failover"]) == (
            "pong-slow",
            0,
            None,
        ), slot
        assert (await stack.api.microservice("pong-slow"))["status"] == "Healthy"
        assert await health_errors(stack.api, "pong-slow") == []


async def test_a_draining_service_hands_over_without_a_failure(tmp_path: Path) -> None:
    require_netns()
    async with running_manager(tmp_path, **SETTINGS) as stack:
        created = await served_call(stack, "pong-a", "pong-b")
        session_id = created["session_id"]
        async with connected_client(created["livekit_url"], created["access_token"]) as client:
            async with pinging(client):
                await pong_from(client, "pong-a", PONG_TIMEOUT)
                await stack.api.wait_for_status(session_id, "Active", ACTIVE_TIMEOUT)
                pong_a = stack.pongs["pong-a"].child.process
                pong_a.terminate()  # SIGTERM: drain at the manager, leave, say goodbye
                await pong_from(client, "pong-b", PONG_TIMEOUT)
                assert await asyncio.wait_for(pong_a.wait(), 15) == 0
                view = await stack.api.wait_for_status(session_id, "Active", ACTIVE_TIMEOUT)
        slot = only_slot(view)
        assert slot["service_id"] == "pong-b", slot
        assert slot["failover"]["cause"] == "drain", slot
        await asyncio.sleep(1.0)  # past the presence grace: its goodbye was no death
        drained = await stack.api.microservice("pong-a")
        assert drained["draining"] is True and drained["last_error"] != "process lost", drained
        assert "process lost" not in await health_errors(stack.api, "pong-a")


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
async def test_a_manager_restart_fails_nothing_over(
    tmp_path: Path, livekit: LiveKitUnderTest, livekit_api: LiveKitAPI, stop: str
) -> None:
    async with restarts(tmp_path, livekit, livekit_api) as stack:
        await stack.start_manager()
        await stack.start_pong("pong-r1")
        created = await stack.api.create_session("restart-user", ["type:PONG"])
        session_id = created["session_id"]
        spare = await stack.start_pong("pong-r2")  # where a false failover would go
        async with connected_client(created["livekit_url"], created["access_token"]) as client:
            async with pinging(client):
                await pong_from(client, "pong-r1", PONG_TIMEOUT)
                await stack.api.wait_for_status(session_id, "Active", ACTIVE_TIMEOUT)
                await stop_or_kill(stack, stop)
                await asyncio.sleep(1.0)  # the presence connections are down meanwhile
                await stack.start_manager()
                await asyncio.sleep(WATCH / 2)  # the SDKs reconnect; nothing must move
                await pong_from(client, "pong-r1", PONG_TIMEOUT)
        view = await stack.api.session(session_id)
        slot = only_slot(view)
        assert view["status"] == "Active", view
        assert (slot["service_id"], slot["redispatches"], slot["failover"]) == (
            "pong-r1",
            0,
            None,
        ), slot
        for service_id in ("pong-r1", "pong-r2"):
            assert (await stack.api.microservice(service_id))["last_error"] != "process lost"
        # The presence came back to the new process: a kill now is seen by it at once.
        spare.child.process.kill()  # serving nothing
        await poll(
            lambda: stack.api.microservice("pong-r2"),
            lambda v: v["last_error"] == "process lost",
            5.0,
            "pong-r2 known lost by the new manager",
        )
