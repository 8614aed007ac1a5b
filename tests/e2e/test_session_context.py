"""Services know their session, and LiveKit shows them as agents (issue 11, part 2): the manager
in-process on the real livekit-server, services in this process that really join the room
(with the `livekit` realtime package), and users that are real LiveKit clients.

- A service built with the SDK sees the session's metadata (credential keys left out), its
  user's identity and name; it is in the room as a participant of kind AGENT (ListParticipants,
  the participant_joined webhook, and what the user's client sees), and the manager still
  recognises it by its token's attributes.
- A service written for the earlier implementation, which reads only the five fields it knew,
  joins and serves the session as before.
- A room where only services (agents) are left is not closed by LiveKit before the manager's
  own deadlines for the user: a user back after LiveKit's 20 s departure timeout finds the
  session, and a user who never comes ends it with the manager's reason.

Needs the private network namespace of scripts/test.sh: WebRTC ignores loopback candidates.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from livekit import api, rtc

from session_manager.api.app import create_app
from session_manager.config import Settings
from session_manager.sdk import JoinedSession, MicroserviceRunner
from tests.conftest import LiveKitUnderTest, room_names
from tests.e2e.failover_harness import Api, JsonDict, poll
from tests.e2e.test_ping_pong import connected_client

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

WAIT = 30.0
LIVEKIT_DEPARTURE_TIMEOUT = 20  # livekit-server v1.13.5's default `room.departure_timeout`

METADATA = {
    "language": "zh-CN",
    "robot": {"id": "r2-d2", "api_token": "robot-secret"},
    "duration_limit": 900,
}
METADATA_FOR_SERVICES = {"language": "zh-CN", "robot": {"id": "r2-d2"}, "duration_limit": 900}
OLD_FIELDS = {"session_id", "room_name", "service_identity", "access_token", "livekit_url"}


@dataclass
class Manager:
    """The manager under test, with every webhook LiveKit posted to it, as posted."""

    client: TestClient[web.Request, web.Application]
    api: Api
    webhooks: list[JsonDict]

    @property
    def url(self) -> str:
        return str(self.client.make_url("/")).rstrip("/")

    def webhooks_about(self, identity: str, event: str) -> list[JsonDict]:
        return [
            hook
            for hook in self.webhooks
            if hook.get("event") == event
            and (hook.get("participant") or {}).get("identity") == identity
        ]


ManagerFactory = Callable[..., Awaitable[Manager]]


@pytest.fixture
async def start_manager_seeing_webhooks(
    aiohttp_client: Any, livekit: LiveKitUnderTest, make_settings: Callable[..., Settings]
) -> AsyncIterator[ManagerFactory]:
    """As tests/conftest.py's `start_manager`, keeping a copy of each webhook body."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as http:

        async def start(**overrides: Any) -> Manager:
            webhooks: list[JsonDict] = []

            @web.middleware
            async def keep_webhooks(request: web.Request, handler: Any) -> web.StreamResponse:
                if request.path == "/livekit/webhook":
                    webhooks.append(orjson.loads(await request.read()))  # read again after
                response: web.StreamResponse = await handler(request)
                return response

            app = create_app(make_settings(**overrides))
            app.middlewares.append(keep_webhooks)
            client: TestClient[web.Request, web.Application] = await aiohttp_client(
                app, server_kwargs={"port": livekit.webhook_port}
            )
            manager = Manager(client, Api(http, ""), webhooks)
            manager.api.base_url = manager.url
            return manager

        yield start


@dataclass
class SeenSessions:
    """An SDK entrypoint that keeps every session it is given, and serves it until it ends."""

    sessions: list[JoinedSession] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)

    async def __call__(self, session: JoinedSession) -> None:
        self.sessions.append(session)
        try:
            await asyncio.Event().wait()
        finally:
            self.ended.append(session.session_id)

    async def joined(self) -> list[JoinedSession]:
        return list(self.sessions)

    async def finished(self) -> list[str]:
        return list(self.ended)


@asynccontextmanager
async def sdk_service(manager: Manager, service_id: str) -> AsyncIterator[SeenSessions]:
    seen = SeenSessions()
    async with MicroserviceRunner(
        service_id, entrypoint=seen, manager_url=manager.url, metadata={"type": "CONTEXT"}
    ):
        yield seen


async def create(manager: Manager, required: list[str], **body: Any) -> JsonDict:
    return await manager.api.ok(
        "POST",
        "/api/v1/create-session",
        {"required_services": required, "wait_until_ready": True, **body},
    )


async def participants(livekit_api: api.LiveKitAPI, room: str) -> dict[str, api.ParticipantInfo]:
    response = await livekit_api.room.list_participants(api.ListParticipantsRequest(room=room))
    return {info.identity: info for info in response.participants}


async def until_known(client_room: rtc.Room, identity: str) -> rtc.RemoteParticipant:
    """The participant as the user's client knows it; LiveKit announces one that publishes no
    track to the others only every few seconds."""
    deadline = time.monotonic() + WAIT
    while identity not in client_room.remote_participants:
        if time.monotonic() > deadline:
            pytest.fail(f"the user's client never saw {identity}")
        await asyncio.sleep(0.1)
    return client_room.remote_participants[identity]


# --- an SDK service ---------------------------------------------------------------------------


async def test_a_service_sees_the_session_it_serves_and_is_in_the_room_as_an_agent(
    start_manager_seeing_webhooks: ManagerFactory, livekit_api: api.LiveKitAPI
) -> None:
    manager = await start_manager_seeing_webhooks()
    async with sdk_service(manager, "context-svc") as seen:
        created = await create(
            manager,
            ["context-svc"],
            user_identity="user-ctx",
            user_name="张三",
            metadata=METADATA,
        )
        assert created["status"] == "Ready", created  # the manager recognised it in the room

        # LiveKit may tell the manager the service is in the room before its entrypoint starts.
        [session] = await poll(seen.joined, bool, WAIT, "the entrypoint started")
        assert session.session_id == created["session_id"]
        assert session.room_name == created["room_name"]
        assert dict(session.metadata) == METADATA_FOR_SERVICES
        assert session.user_identity == "user-ctx"
        assert session.user_name == "张三"

        room = created["room_name"]
        service = (await participants(livekit_api, room))["context-svc"]
        assert service.kind == api.ParticipantInfo.Kind.AGENT
        assert service.attributes["session_manager.role"] == "service"
        joined = manager.webhooks_about("context-svc", "participant_joined")
        assert joined, manager.webhooks
        assert {hook["participant"]["kind"] for hook in joined} == {"AGENT"}, joined

        async with connected_client(created["livekit_url"], created["access_token"]) as user:
            view = await manager.api.wait_for_status(created["session_id"], "Active", WAIT)
            assert view["client"]["joined"] is True
            assert (await until_known(user.room, "context-svc")).kind == (
                rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
            )
            user_info = (await participants(livekit_api, room))["user-ctx"]
            assert user_info.kind == api.ParticipantInfo.Kind.STANDARD
            user_joined = manager.webhooks_about("user-ctx", "participant_joined")
            assert user_joined, manager.webhooks
            kinds = {hook["participant"].get("kind", "STANDARD") for hook in user_joined}
            assert kinds == {"STANDARD"}, user_joined

        ended = await manager.api.ok("DELETE", f"/api/v1/sessions/{created['session_id']}")
        assert ended["status"] == "Terminated", ended

        finished = await poll(seen.finished, bool, WAIT, "the entrypoint ended")
        assert finished == [created["session_id"]]


# --- a service of the earlier implementation --------------------------------------------------


@dataclass
class EarlierService:
    """Written for the earlier implementation: verifies nothing, reads the five fields it knew
    and ignores the rest, answers at once and joins the room with the token it was given."""

    bodies: list[JsonDict] = field(default_factory=list)
    rooms: dict[str, rtc.Room] = field(default_factory=dict)
    joining: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    async def join_room(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        session_id, room_name = body["session_id"], body["room_name"]
        identity, token, url = body["service_identity"], body["access_token"], body["livekit_url"]
        if session_id not in self.joining:
            self.joining[session_id] = asyncio.create_task(self.join(session_id, url, token))
        return web.json_response(
            {
                "success": True,
                "message": f"joined {room_name}",
                "session_id": session_id,
                "service_id": identity,
            }
        )

    async def join(self, session_id: str, url: str, token: str) -> None:
        room = rtc.Room()
        self.rooms[session_id] = room
        await asyncio.wait_for(room.connect(url, token), WAIT)

    async def leave_room(self, request: web.Request) -> web.Response:
        body = await request.json()
        joining = self.joining.pop(body["session_id"], None)
        if joining is not None:
            await asyncio.wait({joining})
        room = self.rooms.pop(body["session_id"], None)
        if room is not None:
            await room.disconnect()
        return web.json_response(
            {"success": True, "message": "left", "session_id": body["session_id"]}
        )

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "healthy"})

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        app = web.Application()
        app.router.add_post("/join-room", self.join_room)
        app.router.add_post("/leave-room", self.leave_room)
        app.router.add_get("/health", self.health)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            yield f"http://127.0.0.1:{runner.addresses[0][1]}"
        finally:
            for task in self.joining.values():
                task.cancel()
            await asyncio.gather(*self.joining.values(), return_exceptions=True)
            for room in self.rooms.values():
                await room.disconnect()
            await runner.cleanup()


async def test_a_service_that_reads_only_the_old_fields_still_serves_sessions(
    start_manager_seeing_webhooks: ManagerFactory, livekit_api: api.LiveKitAPI
) -> None:
    manager = await start_manager_seeing_webhooks()
    earlier = EarlierService()
    async with earlier.running() as endpoint:
        await manager.api.ok(
            "POST",
            "/api/v1/microservices/register",
            {"service_id": "earlier-svc", "endpoint": endpoint, "metadata": {"type": "OLD"}},
        )
        created = await create(
            manager, ["type:OLD"], user_identity="user-old", user_name="李四", metadata=METADATA
        )
        assert created["status"] == "Ready", created

        [body] = earlier.bodies
        assert OLD_FIELDS <= set(body)
        assert set(body) - OLD_FIELDS == {"session_metadata", "user_identity", "user_name"}
        assert body["session_metadata"] == METADATA_FOR_SERVICES
        assert (body["user_identity"], body["user_name"]) == ("user-old", "李四")
        room = created["room_name"]
        assert "earlier-svc" in await participants(livekit_api, room)

        async with connected_client(created["livekit_url"], created["access_token"]):
            view = await manager.api.wait_for_status(created["session_id"], "Active", WAIT)
            [slot] = view["services"]
            assert (slot["service_id"], slot["state"]) == ("earlier-svc", "joined"), slot

        await manager.api.ok("DELETE", f"/api/v1/sessions/{created['session_id']}")
        assert earlier.rooms == {}  # its leave-room came
        assert room not in await room_names(livekit_api)


# --- LiveKit keeps a room of agents for the manager's deadlines --------------------------------


async def test_a_user_back_after_livekits_departure_timeout_finds_the_session(
    start_manager_seeing_webhooks: ManagerFactory, livekit_api: api.LiveKitAPI
) -> None:
    """LiveKit closes a room where only agents are `departure_timeout` (20 s) after the last
    participant left; the manager's `client_reconnect_grace` is longer, and the room lasts it."""
    manager = await start_manager_seeing_webhooks(client_reconnect_grace=45.0)
    async with sdk_service(manager, "context-svc"):
        created = await create(manager, ["context-svc"], user_identity="user-back")
        session_id, room = created["session_id"], created["room_name"]
        async with connected_client(created["livekit_url"], created["access_token"]):
            await manager.api.wait_for_status(session_id, "Active", WAIT)
        await poll(
            lambda: manager.api.session(session_id),
            lambda view: view["client"]["joined"] is False,
            WAIT,
            "the user seen leaving",
        )
        await asyncio.sleep(LIVEKIT_DEPARTURE_TIMEOUT + 3)

        assert room in await room_names(livekit_api)
        assert (await manager.api.session(session_id))["status"] == "Active"
        async with connected_client(created["livekit_url"], created["access_token"]):
            view = await poll(
                lambda: manager.api.session(session_id),
                lambda view: view["client"]["joined"] is True,
                WAIT,
                "the user seen back",
            )
            assert view["status"] == "Active" and view["reason"] is None, view
            [slot] = view["services"]
            assert slot["state"] == "joined" and slot["redispatches"] == 0, slot


async def test_a_user_who_never_joins_ends_the_session_with_the_managers_reason(
    start_manager_seeing_webhooks: ManagerFactory, livekit_api: api.LiveKitAPI
) -> None:
    """With only the service (an agent) in it, LiveKit would close the room `room_empty_timeout`
    after creating it; the room lasts until the manager's `client_join_timeout` ends it."""
    manager = await start_manager_seeing_webhooks(room_empty_timeout=2, client_join_timeout=8.0)
    async with sdk_service(manager, "context-svc"):
        created = await create(manager, ["context-svc"], user_identity="user-away")

        ended = await manager.api.wait_for_status(created["session_id"], "Terminated", WAIT)
        assert ended["reason"] == "client did not join within 8 s", ended
        assert created["room_name"] not in await room_names(livekit_api)
