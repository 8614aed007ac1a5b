"""Signed dispatch and the SSRF guard with the real parts: the manager on the real livekit-server,
pong (examples/pong, built with the SDK) registering itself and learning its secret from the
answer, WebRTC into the room.

- the signed path ends Ready, and the manager's own join-room, replayed byte for byte, is
  refused by the SDK, like an unsigned one; anonymous leave-room calls end nothing;
- an operator's rotate-secret is in force at once: the service that was not told is refused
  (its health answers 401: Unhealthy) until it rotates itself and is Healthy again;
- a redirecting endpoint is not followed: the redirect's target, a real server on loopback,
  receives nothing.

Needs the private network namespace of scripts/test.sh (the SDK connects with WebRTC).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from examples.pong.pong import PongHandler
from session_manager.sdk import MicroserviceRunner
from session_manager.sdk.verification import SIGNED_HEADERS
from tests.conftest import free_port
from tests.fake_services import register, wait_for_status, wait_until
from tests.integration.test_sessions import assert_envelope

pytestmark = pytest.mark.integration


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int = 0


@dataclass
class RecordingProxy:
    """Stands between the manager and a service on loopback: forwards each call unchanged and
    records it (headers and body as the manager sent them)."""

    target: str = ""
    url: str = ""
    calls: list[Recorded] = field(default_factory=list)

    async def forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        call = Recorded(request.method, request.path, dict(request.headers), body)
        self.calls.append(call)
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED}
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http,
            http.request(
                request.method, self.target + request.path, data=body or None, headers=headers
            ) as response,
        ):
            call.status = response.status
            return web.Response(
                status=response.status,
                body=await response.read(),
                content_type=response.content_type,
            )

    @asynccontextmanager
    async def running(self) -> AsyncIterator[RecordingProxy]:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self.forward)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            yield self
        finally:
            await runner.cleanup()


FORWARDED = {"content-type", *SIGNED_HEADERS}


def manager_url(manager: Any) -> str:
    return str(manager.make_url("")).rstrip("/")


async def send(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http,
        http.post(url, data=body, headers=headers) as response,
    ):
        return response.status, await response.json()


async def pong_health(pong: MicroserviceRunner) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
        http.get(pong.endpoint + "/health") as response,
    ):
        body: dict[str, Any] = await response.json()
        return body


async def create_ready(manager: Any, user: str, service_id: str) -> dict[str, Any]:
    response = await manager.post(
        "/api/v1/create-session",
        json={
            "user_identity": user,
            "required_services": [service_id],
            "wait_until_ready": True,
            "timeout_secs": 20,
        },
    )
    body: dict[str, Any] = await response.json()
    assert response.status == 200, body
    assert body["status"] == "Ready", body
    return body


async def test_the_signed_path_ends_ready_and_a_replayed_or_unsigned_call_is_refused(
    manager: Any,
) -> None:
    async with RecordingProxy().running() as proxy:
        port = free_port()
        proxy.target = f"http://127.0.0.1:{port}"
        async with MicroserviceRunner(
            "pong-signed",
            PongHandler(),
            manager_url=manager_url(manager),
            port=port,
            advertise_url=proxy.url,  # the manager calls pong through the proxy
        ) as pong:
            created = await create_ready(manager, "signed-user", "pong-signed")
            await wait_until(
                lambda: pong_health(pong), lambda body: body["sessions"] == 1, "pong in the room"
            )

            [join] = [call for call in proxy.calls if call.path == "/join-room"]
            assert join.status == 200
            assert join.headers["webhook-signature"].startswith("v1,")
            signed = {k: v for k, v in join.headers.items() if k.lower() in FORWARDED}
            direct = proxy.target  # pong itself (pong.endpoint is the proxy it advertises)

            # The manager's own call, sent again byte for byte: refused as a replay.
            status, answer = await send(direct + "/join-room", join.body, signed)
            assert status == 401, answer
            assert answer["message"] == "Unauthorized: call replayed", answer
            # The same body without its signature: refused, and nothing joins.
            unsigned = {"Content-Type": "application/json"}
            status, answer = await send(direct + "/join-room", join.body, unsigned)
            assert status == 401 and answer["success"] is False, answer

            # Four anonymous leave-room calls used to end a session: now they end nothing.
            leave = (
                f'{{"session_id": "{created["session_id"]}", '
                f'"room_name": "{created["room_name"]}"}}'
            ).encode()
            for _ in range(4):
                status, answer = await send(direct + "/leave-room", leave, unsigned)
                assert status == 401, answer
            assert (await pong_health(pong))["sessions"] == 1
            view = await (await manager.get(f"/api/v1/sessions/{created['session_id']}")).json()
            assert view["status"] in ("Ready", "Active"), view

            # The manager's own leave-room (the session is deleted) is signed and obeyed.
            deleted = await manager.delete(f"/api/v1/sessions/{created['session_id']}")
            assert deleted.status == 200
            await wait_until(
                lambda: pong_health(pong), lambda body: body["sessions"] == 0, "pong left"
            )

            async def leaves() -> list[Recorded]:
                return [call for call in proxy.calls if call.path == "/leave-room"]

            await wait_until(  # pong may leave before its answer is back through the proxy
                leaves,
                lambda calls: calls and all(call.status == 200 for call in calls),
                "leave-room answered 200",
            )


async def test_a_rotated_secret_is_in_force_at_once_and_the_service_takes_a_new_one(
    start_manager: Any,
) -> None:
    manager = await start_manager(health_interval=0.2, unhealthy_after=1, healthy_after=1)

    async def registration() -> dict[str, Any]:
        view: dict[str, Any] = await (
            await manager.get("/api/v1/microservices/pong-rotating")
        ).json()
        return view

    async with MicroserviceRunner(
        "pong-rotating", PongHandler(), manager_url=manager_url(manager)
    ) as pong:
        await create_ready(manager, "before-rotation", "pong-rotating")

        # An operator rotates the secret and does not tell the service: the manager signs
        # with the new one at once, the service refuses it, and the registration turns
        # Unhealthy.
        rotated = await manager.post("/api/v1/microservices/pong-rotating/rotate-secret")
        assert rotated.status == 200
        view = await wait_until(
            registration, lambda view: view["status"] == "Unhealthy", "the refused health check"
        )
        assert view["last_error"] == "health answered HTTP 401", view

        # The service asks for a new secret itself (a restarted SDK service does the same).
        await pong.rotate_secret()
        await wait_until(registration, lambda view: view["status"] == "Healthy", "Healthy again")
        await create_ready(manager, "after-rotation", "pong-rotating")


async def test_a_redirecting_endpoint_is_not_followed(start_manager: Any) -> None:
    manager = await start_manager(health_interval=0.2)
    target_calls: list[str] = []

    async def target(request: web.Request) -> web.Response:
        target_calls.append(request.path)
        return web.json_response({"success": True, "message": "joined"})

    async with _server({"*": target}) as target_url:

        async def redirect(request: web.Request) -> web.Response:
            raise web.HTTPTemporaryRedirect(target_url + request.path)

        async with _server({"*": redirect}) as redirector:
            await register(manager, "redirecting", redirector, type="REDIRECT")
            response = await manager.post(
                "/api/v1/create-session",
                json={"user_identity": "redirected-user", "required_services": ["redirecting"]},
            )
            body = await response.json()
            if response.status == 200:  # answered before the dispatch ended: it ends failed
                view = await wait_for_status(manager, body["session_id"], "Terminated")
                assert "HTTP 307" in view["reason"], view
            else:
                assert response.status == 502, body
                assert_envelope(body, "MicroserviceUnavailable")
                assert "HTTP 307" in body["message"], body

            async def service_view() -> dict[str, Any]:
                view: dict[str, Any] = await (
                    await manager.get("/api/v1/microservices/redirecting")
                ).json()
                return view

            await wait_until(
                service_view,
                lambda view: view["last_error"] == "health answered HTTP 307",
                "the redirected health check",
            )
    assert target_calls == []  # neither the join-room (with its token) nor a health check


@asynccontextmanager
async def _server(routes: dict[str, Any]) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{path:.*}", routes["*"])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
