"""Honest health on a real livekit-server: /health is 200 only while the manager can serve, and a
manager whose supervisor loop dies answers at once, turns 503 and exits non-zero."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from session_manager.api.app import create_app
from session_manager.api.routes import DAEMON
from session_manager.cli import EXIT_FATAL, serve
from session_manager.config import Settings
from session_manager.health_board import STORE

pytestmark = pytest.mark.integration


class LoopKiller(BaseException):
    """Gets past the supervisor's per-command error handling, as a bug in the loop would."""


def _bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    return sock


async def _until_up(http: aiohttp.ClientSession, url: str) -> None:
    async with asyncio.timeout(20):
        while True:
            try:
                async with http.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)


async def test_a_dead_supervisor_loop_answers_503_turns_health_and_exits_non_zero(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(port=0)
    app = create_app(settings)
    sock = _bound_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    serving = asyncio.create_task(serve(app, sock, settings))
    try:
        async with aiohttp.ClientSession() as http:
            await _until_up(http, f"{base}/health")
            supervisor = app[DAEMON].supervisor

            def die(message: object) -> None:
                raise LoopKiller()

            supervisor._handle = die  # type: ignore[method-assign]
            async with http.get(f"{base}/api/v1/microservices") as response:
                assert response.status == 503
                body: dict[str, Any] = await response.json()
                assert set(body) == {"error", "message", "timestamp"}
                assert body["error"] == "Unavailable"

            code = await asyncio.wait_for(serving, 30)
        assert code == EXIT_FATAL
    finally:
        if not serving.done():
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)


async def test_health_names_the_part_that_is_down_and_recovers(manager: Any) -> None:
    response = await manager.get("/health")
    assert response.status == 200
    assert set(await response.json()) == {"status", "timestamp", "version"}

    board = manager.app[DAEMON].board
    board.down(STORE, "writes failing: disk I/O error")
    response = await manager.get("/health")
    assert response.status == 503
    body = await response.json()
    assert body["status"] == "unhealthy"
    [problem] = body["problems"]
    assert problem["component"] == "store"
    assert problem["reason"] == "writes failing: disk I/O error"
    assert problem["since"].endswith("Z")

    # A create while the store is down is refused with an envelope, not accepted and lost.
    refused = await manager.post(
        "/api/v1/create-session", json={"user_identity": "u1", "required_services": []}
    )
    assert refused.status == 503
    assert (await refused.json())["error"] == "StoreUnavailable"

    board.up(STORE)
    response = await manager.get("/health")
    assert response.status == 200
    created = await manager.post(
        "/api/v1/create-session", json={"user_identity": "u1", "required_services": []}
    )
    assert created.status == 200


async def test_health_turns_503_when_shutdown_begins(manager: Any) -> None:
    manager.app[DAEMON].drain()
    response = await manager.get("/health")
    assert response.status == 503
    body = await response.json()
    assert body["problems"][0] == {
        "component": "supervisor",
        "reason": "shutting down",
        "since": body["problems"][0]["since"],
    }
