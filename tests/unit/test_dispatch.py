"""join-room against microservices that misbehave: 500, hangs, refused connections, not JSON.

The misbehaving services are real HTTP servers on loopback (aioresponses does not work with the
aiohttp release we use), each answering from a script of responses, one per call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import orjson
import pytest
from aiohttp import web

from session_manager.dispatch import DispatchPolicy, JoinRoomRequest, MicroserviceClient
from tests.conftest import free_port

REQUEST = JoinRoomRequest("sid", "room-sid", "asr-1", "secret-token", "ws://127.0.0.1:7880")
OK_BODY = {"success": True, "message": "joined", "session_id": "sid", "service_id": "asr-1"}

Answer = Callable[[], Awaitable[web.Response]]


def reply(status: int = 200, json: object = None, text: str | None = None) -> Answer:
    async def answer() -> web.Response:
        if text is not None:
            return web.Response(status=status, text=text, content_type="text/html")
        return web.json_response(json, status=status)

    return answer


def hang() -> Answer:
    async def answer() -> web.Response:
        await asyncio.sleep(10)
        return web.json_response(OK_BODY)

    return answer


class ScriptedEndpoint:
    """A join-room server answering call n with script[n] (the last entry repeats)."""

    def __init__(self) -> None:
        self.script: list[Answer] = []
        self.bodies: list[bytes] = []
        self.content_types: list[str] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.read())
        self.content_types.append(request.headers.get("Content-Type", ""))
        answer = self.script[min(len(self.bodies), len(self.script)) - 1]
        return await answer()

    @property
    def calls(self) -> int:
        return len(self.bodies)


@pytest.fixture
async def endpoint() -> AsyncIterator[ScriptedEndpoint]:
    scripted = ScriptedEndpoint()
    app = web.Application()
    app.router.add_post("/join-room", scripted.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    scripted.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield scripted
    await runner.cleanup()


@pytest.fixture
async def client() -> AsyncIterator[MicroserviceClient]:
    async with aiohttp.ClientSession() as http:
        yield MicroserviceClient(http, DispatchPolicy(timeout=0.3, attempts=3, backoff=0.01))


async def test_success_sends_the_contract_payload(
    client: MicroserviceClient, endpoint: ScriptedEndpoint
) -> None:
    endpoint.script = [reply(json=OK_BODY)]
    outcome = await client.join_room(endpoint.url, REQUEST)
    assert outcome.ok and outcome.attempts == 1 and outcome.message == "joined"
    assert endpoint.content_types == ["application/json"]
    assert orjson.loads(endpoint.bodies[0]) == {
        "session_id": "sid",
        "room_name": "room-sid",
        "service_identity": "asr-1",
        "access_token": "secret-token",
        "livekit_url": "ws://127.0.0.1:7880",
        # added after the five of the earlier implementation (tests/unit/test_join_room_context.py)
        "session_metadata": {},
        "user_identity": "",
        "user_name": None,
    }


async def test_500_is_retried_then_succeeds(
    client: MicroserviceClient, endpoint: ScriptedEndpoint
) -> None:
    endpoint.script = [reply(500, {"message": "warming up"}), reply(json=OK_BODY)]
    outcome = await client.join_room(endpoint.url, REQUEST)
    assert outcome.ok and outcome.attempts == 2 and endpoint.calls == 2


async def test_500_every_time_fails_after_all_attempts(
    client: MicroserviceClient, endpoint: ScriptedEndpoint
) -> None:
    endpoint.script = [reply(500, {"message": "model not loaded"})]
    outcome = await client.join_room(endpoint.url, REQUEST)
    assert not outcome.ok
    assert outcome.attempts == 3 and endpoint.calls == 3
    assert outcome.error == "join-room answered HTTP 500: model not loaded"


async def test_a_hanging_service_times_out_each_attempt(
    client: MicroserviceClient, endpoint: ScriptedEndpoint
) -> None:
    endpoint.script = [hang()]
    outcome = await client.join_room(endpoint.url, REQUEST)
    # Each of the three calls was cut by the 0.3 s timeout (the error says so), not answered
    # by the endpoint, whose answer would come only after 10 s.
    assert not outcome.ok and outcome.attempts == 3 and endpoint.calls == 3
    assert outcome.error == "join-room timed out after 0.3s"


async def test_a_hang_then_an_answer_succeeds(
    client: MicroserviceClient, endpoint: ScriptedEndpoint
) -> None:
    endpoint.script = [hang(), reply(json=OK_BODY)]
    outcome = await client.join_room(endpoint.url, REQUEST)
    assert outcome.ok and outcome.attempts == 2


async def test_refused_connection_is_retried_then_reported(client: MicroserviceClient) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    outcome = await client.join_room(closed, REQUEST)
    assert not outcome.ok and outcome.attempts == 3
    # Generic on purpose: the connection error's own words (addresses, errno) are not told.
    assert outcome.error == "join-room failed: endpoint not reachable"


async def test_body_that_is_not_json_fails_without_retry(
    client: MicroserviceClient, endpoint: ScriptedEndpoint
) -> None:
    endpoint.script = [reply(text="<html>ok</html>")]
    outcome = await client.join_room(endpoint.url, REQUEST)
    assert not outcome.ok and outcome.attempts == 1
    assert outcome.error == "join-room answered with a body that is not JSON"


async def test_json_that_is_not_an_object_fails(
    client: MicroserviceClient, endpoint: ScriptedEndpoint
) -> None:
    endpoint.script = [reply(json=["success"])]
    outcome = await client.join_room(endpoint.url, REQUEST)
    assert not outcome.ok
    assert outcome.error == "join-room answered with JSON that is not an object"


async def test_success_false_is_a_decline(
    client: MicroserviceClient, endpoint: ScriptedEndpoint
) -> None:
    endpoint.script = [reply(json={"success": False, "message": "at capacity"})]
    outcome = await client.join_room(endpoint.url, REQUEST)
    assert not outcome.ok and outcome.declined and outcome.attempts == 1
    assert outcome.error == "service declined join-room: at capacity"


@pytest.mark.parametrize("status", [409, 503])
async def test_409_and_503_are_declines_answered_at_once(
    client: MicroserviceClient, endpoint: ScriptedEndpoint, status: int
) -> None:
    endpoint.script = [reply(status, {"message": "draining"})]
    outcome = await client.join_room(endpoint.url, REQUEST)
    assert not outcome.ok and outcome.declined
    assert endpoint.calls == 1  # no retry, no back-off: the manager asks another instance
    assert outcome.error == f"service declined join-room: HTTP {status}: draining"


async def test_4xx_is_not_retried(client: MicroserviceClient, endpoint: ScriptedEndpoint) -> None:
    endpoint.script = [reply(404, text="no such route")]
    outcome = await client.join_room(endpoint.url, REQUEST)
    assert not outcome.ok and not outcome.declined and outcome.attempts == 1
    assert outcome.error == "join-room answered HTTP 404"
