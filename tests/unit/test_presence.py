"""Presence: the rules by which a dropped SDK connection is a dead process (and when it is not),
the route's bounds, and the SDK's client against a real manager app."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from session_manager.api.app import create_app
from session_manager.api.routes import DAEMON
from session_manager.registry.presence import REPLACED, PresenceBoard, PresencePolicy
from session_manager.sdk.presence import PresenceClient
from tests.unit.test_auth import SERVICE_KEY, assert_envelope, bearer, settings_for

POLICY = PresencePolicy(interval=0.05, timeout=1.0, grace=0.6)
PATH = "/presence/{service_id}"


class Manager:
    """A presence board behind a tiny app: what it declared lost, and when."""

    def __init__(self, policy: PresencePolicy = POLICY) -> None:
        self.lost: list[tuple[str, datetime, float]] = []
        self.draining: set[str] = set()
        self.shared: list[tuple[str, str]] = []
        self.board = PresenceBoard(
            policy,
            on_lost=lambda sid, gone_at: self.lost.append((sid, gone_at, time.monotonic())),
            is_draining=lambda sid: sid in self.draining,
            share=lambda state, sid, gone_at: self.shared.append((state, sid)),
        )

    async def handle(self, request: web.Request) -> web.StreamResponse:
        socket = web.WebSocketResponse(timeout=1.0)
        await socket.prepare(request)
        await self.board.serve(request.match_info["service_id"], socket)
        return socket

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(PATH, self.handle)
        return app


@pytest.fixture
async def manager() -> AsyncIterator[tuple[Manager, TestClient[Any, Any]]]:
    fake = Manager()
    async with TestClient(TestServer(fake.app())) as client:
        try:
            yield fake, client
        finally:
            for task in BEATERS:
                task.cancel()
            await asyncio.gather(*BEATERS, return_exceptions=True)
            BEATERS.clear()
            await fake.board.aclose()


BEATERS: set[asyncio.Task[None]] = set()  # each test's, cancelled by `manager`


async def connect(client: TestClient[Any, Any], service_id: str) -> aiohttp.ClientWebSocketResponse:
    """A connection that beats as the SDK does, until it is closed or killed."""
    socket = await client.ws_connect(f"/presence/{service_id}")
    hello = await socket.receive_json(timeout=1)
    assert hello == {"type": "hello", "interval": POLICY.interval, "timeout": POLICY.timeout}

    async def beat() -> None:
        while not socket.closed:
            try:
                await socket.send_str('{"type":"beat"}')
            except (ConnectionError, RuntimeError, aiohttp.ClientError):
                return
            await asyncio.sleep(POLICY.interval)

    BEATERS.add(asyncio.create_task(beat()))
    return socket


def kill(socket: aiohttp.ClientWebSocketResponse) -> None:
    """What the kernel does for a killed process: the socket closes, no close frame."""
    connection = socket._response.connection
    assert connection is not None and connection.transport is not None
    connection.transport.abort()


async def settle(seconds: float) -> None:
    await asyncio.sleep(seconds)


async def until(condition: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never met"
        await asyncio.sleep(0.01)


# --- the rules -----------------------------------------------------------------------------------


async def test_a_connection_lost_without_goodbye_is_a_death_after_the_grace(
    manager: tuple[Manager, TestClient[Any, Any]],
) -> None:
    fake, client = manager
    socket = await connect(client, "pong-a")
    killed = time.monotonic()
    kill(socket)
    await until(lambda: fake.lost)
    (service_id, gone_at, declared), *more = fake.lost
    assert service_id == "pong-a" and more == []
    # Not before the grace, and not long after it (the generous bound is for slow CI).
    assert POLICY.grace - 0.05 <= declared - killed < POLICY.grace + 1.0
    assert isinstance(gone_at, datetime)
    assert ("lost", "pong-a") in fake.shared


async def test_a_reconnect_within_the_grace_is_no_death(
    manager: tuple[Manager, TestClient[Any, Any]],
) -> None:
    fake, client = manager
    kill(await connect(client, "pong-a"))
    await until(lambda: "pong-a" in fake.board.pending())
    again = await connect(client, "pong-a")
    await settle(POLICY.grace * 3)
    assert fake.lost == []
    assert fake.board.connected() == {"pong-a"}
    await again.close()


async def test_a_goodbye_after_draining_is_no_death(
    manager: tuple[Manager, TestClient[Any, Any]],
) -> None:
    fake, client = manager
    socket = await connect(client, "pong-a")
    await socket.close(code=1000, message=b"goodbye")
    await settle(POLICY.grace * 3)
    assert fake.lost == [] and fake.board.pending() == set()


async def test_a_close_that_is_not_a_goodbye_counts_as_a_loss(
    manager: tuple[Manager, TestClient[Any, Any]],
) -> None:
    fake, client = manager
    socket = await connect(client, "pong-a")
    await socket.close(code=4001, message=b"reconnecting")
    await until(lambda: fake.lost)
    assert [sid for sid, _, _ in fake.lost] == ["pong-a"]


async def test_a_draining_instance_that_drops_is_no_death(
    manager: tuple[Manager, TestClient[Any, Any]],
) -> None:
    fake, client = manager
    socket = await connect(client, "pong-a")
    fake.draining.add("pong-a")
    kill(socket)
    await settle(POLICY.grace * 3)
    assert fake.lost == []


async def test_silence_is_a_death_even_without_a_closed_socket(
    manager: tuple[Manager, TestClient[Any, Any]],
) -> None:
    """A vanished host sends no FIN: the missing beats tell."""
    fake, client = manager
    await client.ws_connect("/presence/pong-a")  # never beats
    await until(lambda: fake.lost, timeout=POLICY.timeout + POLICY.grace + 2)
    assert [sid for sid, _, _ in fake.lost] == ["pong-a"]


async def test_the_managers_own_shutdown_judges_nothing(
    manager: tuple[Manager, TestClient[Any, Any]],
) -> None:
    fake, client = manager
    socket = await connect(client, "pong-a")
    kill(await connect(client, "pong-b"))
    await until(lambda: "pong-b" in fake.board.pending())
    await fake.board.aclose()
    closed = await socket.receive(timeout=2)
    assert closed.type is aiohttp.WSMsgType.CLOSE and closed.data == 1001
    await settle(POLICY.grace * 3)
    assert fake.lost == []  # neither the one it closed nor the one in its grace


async def test_a_new_connection_replaces_the_old_one(
    manager: tuple[Manager, TestClient[Any, Any]],
) -> None:
    fake, client = manager
    old = await connect(client, "pong-a")
    new = await connect(client, "pong-a")
    closed = await old.receive(timeout=2)
    assert closed.type is aiohttp.WSMsgType.CLOSE and closed.data == REPLACED
    await settle(POLICY.grace * 3)
    assert fake.lost == [] and fake.board.connected() == {"pong-a"}
    await new.close()


async def test_another_manager_seeing_the_instance_cancels_the_grace(
    manager: tuple[Manager, TestClient[Any, Any]],
) -> None:
    fake, client = manager
    kill(await connect(client, "pong-a"))
    await until(lambda: "pong-a" in fake.board.pending())
    fake.board.remote_seen("pong-a")  # its new stream is on another process of the cluster
    await settle(POLICY.grace * 3)
    assert fake.lost == []


async def test_a_loss_another_manager_declared_is_acted_on_unless_connected_here(
    manager: tuple[Manager, TestClient[Any, Any]],
) -> None:
    fake, client = manager
    socket = await connect(client, "pong-a")
    now = datetime.now().astimezone()
    fake.board.remote_lost("pong-a", now)  # it is connected here: that verdict is stale
    fake.board.remote_lost("pong-b", now)
    assert [sid for sid, _, _ in fake.lost] == ["pong-b"]
    await socket.close()


# --- the route on the real app, and the SDK's client ---------------------------------------------


@pytest.fixture
async def app_client(aiohttp_client: Any, tmp_path: Path) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = await aiohttp_client(
        create_app(
            settings_for(
                tmp_path,
                api_keys=[f"{SERVICE_KEY} service", "other-service-key-1f2e3d4c service"],
                presence_interval=0.05,
                presence_timeout=1.0,
                presence_grace=0.6,
            )
        )
    )
    registration = {"service_id": "pong-a", "endpoint": "http://127.0.0.1:9/", "metadata": {}}
    response = await client.post(
        "/api/v1/microservices/register", json=registration, headers=bearer(SERVICE_KEY)
    )
    assert response.status == 200, await response.text()
    return client


async def test_the_route_refuses_what_is_not_a_registered_instances_websocket(
    app_client: TestClient[Any, Any],
) -> None:
    path = "/api/v1/microservices/{}/presence"
    await assert_envelope(await app_client.get(path.format("pong-a")), 401, "Unauthorized")
    plain = await app_client.get(path.format("pong-a"), headers=bearer(SERVICE_KEY))
    await assert_envelope(plain, 400, "InvalidRequest")
    unknown = await app_client.get(path.format("nobody"), headers=bearer(SERVICE_KEY))
    await assert_envelope(unknown, 404, "NotFound")
    others = await app_client.get(
        path.format("pong-a"), headers=bearer("other-service-key-1f2e3d4c")
    )
    await assert_envelope(others, 403, "Forbidden")


async def test_a_message_past_the_bound_ends_the_connection(
    app_client: TestClient[Any, Any],
) -> None:
    socket = await app_client.ws_connect(
        "/api/v1/microservices/pong-a/presence", headers=bearer(SERVICE_KEY)
    )
    await socket.receive_json(timeout=1)
    await socket.send_str("x" * 5000)
    while True:
        message = await socket.receive(timeout=2)
        if message.type is not aiohttp.WSMsgType.TEXT:
            break
    assert message.type is aiohttp.WSMsgType.CLOSE and message.data == 1009  # too big


async def service_view(client: TestClient[Any, Any]) -> dict[str, Any]:
    response = await client.get("/api/v1/microservices/pong-a", headers=bearer(SERVICE_KEY))
    body: dict[str, Any] = await response.json()
    return body


async def test_the_sdk_client_holds_presence_and_its_goodbye_is_no_death(
    app_client: TestClient[Any, Any],
) -> None:
    daemon = app_client.app[DAEMON]
    url = str(app_client.make_url("/"))
    presence = PresenceClient(url, "pong-a", api_key=SERVICE_KEY)
    presence.start()
    try:
        await until(lambda: daemon.presence.connected() == {"pong-a"})
        await asyncio.sleep(2.5)  # many beats, timeouts long: still connected, once
        assert daemon.presence.connected() == {"pong-a"} and presence.connections == 1
    finally:
        await presence.aclose()
    await until(lambda: daemon.presence.connected() == set())
    await settle(1.2)
    assert daemon.presence.losses == 0
    assert (await service_view(app_client))["last_error"] != "process lost"


async def test_the_sdk_client_reconnects_at_once_when_dropped(
    app_client: TestClient[Any, Any],
) -> None:
    daemon = app_client.app[DAEMON]
    presence = PresenceClient(str(app_client.make_url("/")), "pong-a", api_key=SERVICE_KEY)
    presence.start()
    try:
        await until(lambda: presence.connections == 1 and daemon.presence.connected())
        # The manager's end goes as a network blip would take it: no close frame.
        for request_socket in list(daemon.presence._live.values()):
            transport = request_socket.socket._req.transport
            assert transport is not None
            transport.abort()
        await until(lambda: presence.connections == 2 and daemon.presence.connected())
        await settle(1.2)
        assert daemon.presence.losses == 0  # back within the grace
    finally:
        await presence.aclose()


async def test_a_lost_sdk_instance_is_unhealthy_with_process_lost(
    app_client: TestClient[Any, Any],
) -> None:
    daemon = app_client.app[DAEMON]
    socket = await app_client.ws_connect(
        "/api/v1/microservices/pong-a/presence", headers=bearer(SERVICE_KEY)
    )
    await socket.receive_json(timeout=1)
    kill(socket)
    await until(lambda: daemon.presence.losses == 1)
    await until(lambda: daemon.registry.get("pong-a").last_error == "process lost")
    view = await service_view(app_client)
    assert (view["status"], view["last_error"]) == ("Unhealthy", "process lost")
