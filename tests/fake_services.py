"""Microservices for integration tests: real HTTP servers on loopback whose join-room answers
are scripted, for the paths where a real service cannot be made to misbehave on cue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

JoinAnswer = Callable[[dict[str, Any]], Awaitable[web.StreamResponse]]


async def accept_without_joining(body: dict[str, Any]) -> web.StreamResponse:
    """Says yes and never enters the room: the manager must notice through LiveKit alone."""
    return web.json_response(
        {
            "success": True,
            "message": "will join",
            "session_id": body["session_id"],
            "service_id": body["service_identity"],
        }
    )


async def fail_with_500(body: dict[str, Any]) -> web.StreamResponse:
    return web.json_response({"success": False, "message": "boom"}, status=500)


async def decline_with_503(body: dict[str, Any]) -> web.StreamResponse:
    return web.json_response({"success": False, "message": "at capacity"}, status=503)


class ScriptedService:
    def __init__(self, answer: JoinAnswer, *, healthy: bool = True) -> None:
        self.answer = answer
        self.healthy = healthy
        self.join_requests: list[dict[str, Any]] = []
        self.leave_requests: list[dict[str, Any]] = []
        self.health_checks = 0
        self.endpoint = ""

    async def _leave_room(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.leave_requests.append(body)
        return web.json_response(
            {
                "success": True,
                "message": "left",
                "session_id": body["session_id"],
                "service_id": "scripted",
            }
        )

    async def _health(self, request: web.Request) -> web.StreamResponse:
        self.health_checks += 1
        if not self.healthy:
            return web.json_response({"status": "broken"}, status=500)
        return web.json_response({"status": "healthy"})

    async def _join_room(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.join_requests.append(body)
        return await self.answer(body)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[ScriptedService]:
        app = web.Application()
        app.router.add_post("/join-room", self._join_room)
        app.router.add_post("/leave-room", self._leave_room)
        app.router.add_get("/health", self._health)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        self.endpoint = f"http://127.0.0.1:{port}"
        try:
            yield self
        finally:
            await runner.cleanup()


async def register(client: Any, service_id: str, endpoint: str, **metadata: Any) -> None:
    response = await client.post(
        "/api/v1/microservices/register",
        json={"service_id": service_id, "endpoint": endpoint, "metadata": metadata},
    )
    assert response.status == 200, await response.text()


async def wait_for_status(
    client: Any, session_id: str, wanted: str, timeout: float = 15.0
) -> dict[str, Any]:
    """Poll the session until it reaches `wanted`; fail with the last view if it does not."""
    deadline = asyncio.get_running_loop().time() + timeout
    view: dict[str, Any] = {}
    while asyncio.get_running_loop().time() < deadline:
        response = await client.get(f"/api/v1/sessions/{session_id}")
        view = await response.json()
        if view.get("status") == wanted:
            return view
        await asyncio.sleep(0.05)
    raise AssertionError(f"session never became {wanted}; last view: {view}")


async def wait_until(
    fetch: Callable[[], Awaitable[Any]],
    done: Callable[[Any], bool],
    what: str,
    timeout: float = 15.0,
) -> Any:
    """Call `fetch` until `done` accepts what it returns, and return that; fail with the last
    value seen when `timeout` passes first."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await fetch()
        if done(value):
            return value
        if asyncio.get_running_loop().time() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout} s; last seen: {value!r}")
        await asyncio.sleep(0.05)
