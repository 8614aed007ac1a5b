"""The SDK in its own process: pong (examples/pong) as a child process, against the manager run
in-process on the real livekit-server. Connect failure and timeout, the drain at shutdown and the
refresh of a restarted service's registration, which tests/unit/test_sdk*.py prove with fakes.

Needs the private network namespace of scripts/test.sh: WebRTC ignores loopback candidates.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.e2e.failover_harness import JsonDict, Pong, Stack, poll, pongs_for
from tests.e2e.test_ping_pong import wait_for_log_line
from tests.integration.test_sessions import assert_envelope

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

PONG_CONNECT_TIMEOUT = 10  # MicroserviceRunner's default connect_timeout, which pong keeps
WAIT = 30.0
STOP_WAIT = 30.0


def manager_url(manager: Any) -> str:
    return str(manager.make_url("/")).rstrip("/")


async def create_with(stack: Stack, room: str) -> tuple[int, JsonDict]:
    return await stack.api.call(
        "POST",
        "/api/v1/create-session",
        {"user_identity": "unlucky-user", "room_name": room, "required_services": ["pong-sdk"]},
    )


@contextmanager
def silent_listener() -> Iterator[int]:
    """A loopback port that accepts connections (the kernel completes them) and never answers:
    a LiveKit that does not respond."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


async def stop(pong: Pong) -> int:
    """SIGTERM, once pong has logged its registration. A signal handled between the manager's
    answer and start() noting that it is registered skips the drain (a narrow race in the SDK's
    run_until_signal, reported separately); these tests are not about that window."""
    await wait_for_log_line(pong.child, "registered with the session manager", WAIT)
    pong.child.process.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(pong.child.process.wait(), STOP_WAIT)


# connecting -------------------------------------------------------------------------------
# The manager hands services the LiveKit URL it is configured to give out; pong trusts that one
# (it came with its registration) and connects there when told to join a room.


async def test_pong_answers_a_join_room_it_cannot_connect_with_an_error_the_creator_is_told(
    start_manager: Any, tmp_path: Path
) -> None:
    closed_port = free_port()  # nothing listens there
    manager = await start_manager(livekit_public_url=f"ws://127.0.0.1:{closed_port}")
    async with pongs_for(manager_url(manager), tmp_path) as stack:
        pong = await stack.start_pong("pong-sdk")
        status, answer = await create_with(stack, "room-refused")
        assert status == 502, answer
        assert_envelope(answer, "MicroserviceUnavailable")
        message = answer["message"]
        assert "HTTP 500" in message, message  # pong's answer, as the manager got it
        assert "Failed to join room room-refused: ConnectError: " in message, message
        assert "eyJ" not in message, message  # no token (a JWT) quoted back
        health = await pong.health(stack.api.http)
        assert health == {"status": "healthy", "service_id": "pong-sdk", "sessions": 0}, health


async def test_pong_answers_an_error_when_livekit_does_not_answer_within_its_connect_timeout(
    start_manager: Any, tmp_path: Path
) -> None:
    with silent_listener() as silent_port:
        # One join-room call, given longer than pong's own connect timeout.
        manager = await start_manager(
            livekit_public_url=f"ws://127.0.0.1:{silent_port}",
            dispatch_attempts=1,
            dispatch_timeout=3.0 * PONG_CONNECT_TIMEOUT,
            join_timeout=6.0 * PONG_CONNECT_TIMEOUT,
        )
        async with pongs_for(manager_url(manager), tmp_path) as stack:
            pong = await stack.start_pong("pong-sdk")
            status, answer = await create_with(stack, "room-silent")
            assert status == 502, answer
            assert_envelope(answer, "MicroserviceUnavailable")
            message = answer["message"]
            assert "HTTP 500" in message, message
            assert message.endswith(
                "Failed to join room room-silent: "
                f"TimeoutError: no connection within {PONG_CONNECT_TIMEOUT} s"
            ), message
            health = await pong.health(stack.api.http)
            assert health == {"status": "healthy", "service_id": "pong-sdk", "sessions": 0}
            assert pong.child.running


# registration -----------------------------------------------------------------------------


async def test_sigterm_makes_pong_drain_itself_at_the_manager_before_it_exits(
    manager: Any, tmp_path: Path
) -> None:
    async with pongs_for(manager_url(manager), tmp_path) as stack:
        pong = await stack.start_pong("pong-sdk")
        before = await stack.api.microservice("pong-sdk")
        assert before["draining"] is False, before

        assert await stop(pong) == 0
        assert "microservice stopped" in pong.child.log_text()
        after = await stack.api.microservice("pong-sdk")
        assert after["draining"] is True, after
        listing = await stack.api.ok("GET", "/api/v1/microservices?status=draining")
        assert [entry["service_id"] for entry in listing["microservices"]] == ["pong-sdk"]
        status, refused = await stack.api.call(
            "POST",
            "/api/v1/create-session",
            {"user_identity": "too-late-user", "required_services": ["type:PONG"]},
        )
        assert status == 503, refused
        assert_envelope(refused, "NoCapacity")


async def test_a_restarted_pong_refreshes_the_registration_the_restarted_manager_kept(
    start_manager: Any, tmp_path: Path
) -> None:
    # SQLite store (the default): registrations outlive the manager. Short health rounds, so
    # the restarted manager finds the new endpoint healthy quickly.
    settings = {"health_interval": 0.3, "health_timeout": 1.0}
    first_manager = await start_manager(**settings)
    async with pongs_for(manager_url(first_manager), tmp_path) as stack:
        first = await stack.start_pong("pong-sdk")
        assert await stop(first) == 0  # drains itself on the way out
        await first_manager.close()

        restarted = await start_manager(**settings)
        assert manager_url(restarted) == stack.api.base_url
        kept = await stack.api.microservice("pong-sdk")
        assert kept["endpoint"] == first.url and kept["draining"] is True, kept

        second = await stack.start_pong("pong-sdk", name="pong-sdk-restarted")
        assert second.url != first.url
        await wait_for_log_line(second.child, "registration refreshed", WAIT)
        refreshed = await stack.api.microservice("pong-sdk")
        assert refreshed["endpoint"] == second.url, refreshed
        assert refreshed["draining"] is False, refreshed
        assert refreshed["metadata"] == {"type": "PONG"}, refreshed

        created = await stack.api.create_session("returning-service-user", ["type:PONG"])
        assert created["status"] == "Ready", created
        [slot] = (await stack.api.session(created["session_id"]))["services"]
        assert slot["service_id"] == "pong-sdk" and slot["endpoint"] == second.url, slot
        await poll(
            lambda: second.health(stack.api.http),
            lambda body: body["sessions"] == 1,
            WAIT,
            "the restarted pong in the session's room",
        )
