"""Fast health checks for a plain HTTP service (issue 15): a service that registers with
`metadata.health_interval` 0.5 and keeps no presence connection fails over on health checks
alone, within about 2 s of a `kill -9`, heard by a real LiveKit client.

The real `session-manager` at its default settings (managed livekit-server on random ports),
two real `examples.pong` processes with `--health-interval 0.5` and the SDK's presence
connection turned off (`SESSION_MANAGER_PRESENCE=off`: what a service without the SDK does),
and a real LiveKit client. Needs the private network namespace of scripts/test.sh.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.e2e.failover_harness import (
    REGISTRATION_TIMEOUT,
    Pong,
    Stack,
    free_port,
    poll,
    pong_command,
    require_netns,
    running_manager,
)
from tests.e2e.processes import REPO_ROOT
from tests.e2e.test_failover import (
    ACTIVE_TIMEOUT,
    PONG_TIMEOUT,
    Timeline,
    first_of,
    only_slot,
    pinging,
    pong_from,
    watch_failover,
)
from tests.e2e.test_ping_pong import PONG, Client, connected_client

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

HEALTH_INTERVAL = 0.5
FAILOVER_BOUND = 5.0  # generous: the aim is about 2 s (see the README's detection table)
PLAIN_HTTP_ENV = {"SESSION_MANAGER_PRESENCE": "off"}


async def start_plain_pong(stack: Stack, service_id: str) -> Pong:
    """A pong registering with `health_interval` 0.5 and no presence connection; returns once
    the manager lists it Healthy."""
    port = free_port()
    command = [*pong_command(service_id, port, stack.api.base_url)]
    command += ["--health-interval", str(HEALTH_INTERVAL)]
    child = await stack.children.start(service_id, command, REPO_ROOT, env=PLAIN_HTTP_ENV)
    pong = Pong(service_id, f"http://127.0.0.1:{port}", child)

    async def registration() -> str | None:
        if not child.running:
            pytest.fail(f"{service_id} exited with {child.process.returncode}")
        status, body = await stack.api.call("GET", f"/api/v1/microservices/{service_id}")
        return str(body["status"]) if status == 200 else None

    await poll(registration, lambda s: s == "Healthy", REGISTRATION_TIMEOUT, f"{service_id} up")
    stack.pongs[service_id] = pong
    return pong


async def pong_not_from(client: Client, killed: str, timeout: float, timeline: Timeline) -> None:
    """Wait for the first b"pong" from anyone but `killed`. One whose sender LiveKit has not
    announced yet counts: `killed` was announced before the kill, and is dead."""

    async def listen() -> None:
        while True:
            packet = await client.packets.get()
            sender = packet.participant.identity if packet.participant is not None else None
            if packet.data == PONG and sender != killed:
                timeline.mark("first pong after the kill")
                return

    try:
        await asyncio.wait_for(listen(), timeout)
    except TimeoutError:
        pytest.fail(f"no pong from a replacement of {killed} within {timeout} s")


async def test_plain_http_service_with_half_second_checks_fails_over_within_2_s(
    tmp_path: Path,
) -> None:
    require_netns()
    async with running_manager(tmp_path, log_level="DEBUG") as stack:
        await start_plain_pong(stack, "plain-a")
        await start_plain_pong(stack, "plain-b")
        view = await stack.api.microservice("plain-a")
        assert view["metadata"]["health_interval"] == HEALTH_INTERVAL, view

        created = await stack.api.create_session("fast-health-user", ["type:PONG"])
        assert created["status"] == "Ready", created
        session_id = created["session_id"]
        first = only_slot(await stack.api.session(session_id))["service_id"]
        (other,) = set(stack.pongs) - {first}

        async with connected_client(created["livekit_url"], created["access_token"]) as client:
            async with pinging(client):
                await pong_from(client, first, PONG_TIMEOUT)
                await stack.api.wait_for_status(session_id, "Active", ACTIVE_TIMEOUT)

                timeline = Timeline()
                stack.pongs[first].child.process.kill()
                try:
                    await first_of(
                        pong_not_from(client, first, FAILOVER_BOUND, timeline),
                        watch_failover(stack.api, session_id, first, timeline),
                    )
                    await pong_from(client, other, PONG_TIMEOUT, timeline)
                    timeline.mark(f"pong from {other}, announced")
                finally:
                    print(f"plain HTTP, 0.5 s checks, SIGKILL of {first}: {timeline.report()}")
            view = await stack.api.wait_for_status(session_id, "Active", ACTIVE_TIMEOUT)

        heard = timeline.marks["first pong after the kill"]
        print(f"failover (kill -> first pong from the replacement): {heard:.2f} s")
        assert heard < FAILOVER_BOUND
        assert await stack.pongs[first].child.process.wait() == -9
        slot = only_slot(view)
        assert slot["service_id"] == other and slot["state"] == "joined", slot
        killed = await stack.api.microservice(first)
        assert killed["status"] == "Unhealthy" and killed["sessions"] == 0, killed
        # Health checks found it, not LiveKit: that would take ~20 s.
        assert "health" in str(killed["last_error"]), killed
