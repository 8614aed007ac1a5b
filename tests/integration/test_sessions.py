"""create-session and the session's life on a real livekit-server."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import jwt
import pytest
from livekit import api

from examples.pong.pong import PongHandler
from session_manager.sdk import MicroserviceRunner
from session_manager.session.deps import TOKEN_MARGIN
from tests.conftest import FAST_SETTINGS, LiveKitUnderTest, room_names
from tests.fake_services import (
    ScriptedService,
    accept_without_joining,
    fail_with_500,
    register,
    wait_for_status,
)

pytestmark = pytest.mark.integration

JOIN_TIMEOUT_MESSAGE = "Timeout waiting for microservices to join"


def assert_envelope(body: dict[str, Any], error: str) -> None:
    assert set(body) == {"error", "message", "timestamp"}, body
    assert body["error"] == error, body
    assert body["timestamp"].endswith("Z")


async def test_session_without_services_is_ready_with_a_room_and_a_client_token(
    manager: Any, livekit: LiveKitUnderTest, livekit_api: api.LiveKitAPI
) -> None:
    response = await manager.post(
        "/api/v1/create-session",
        json={"user_identity": "user123", "user_name": "张三", "required_services": []},
    )
    assert response.status == 200
    body = await response.json()
    assert set(body) == {"session_id", "room_name", "access_token", "livekit_url", "status"}
    assert uuid.UUID(body["session_id"]).version == 4
    assert body["room_name"] == f"room-{body['session_id']}"
    assert body["status"] == "Ready"
    assert body["livekit_url"] == livekit.url

    rooms = await livekit_api.room.list_rooms(api.ListRoomsRequest(names=[body["room_name"]]))
    assert len(rooms.rooms) == 1
    assert body["session_id"] in rooms.rooms[0].metadata

    claims = api.TokenVerifier(livekit.api_key, livekit.api_secret).verify(body["access_token"])
    assert claims.identity == "user123"
    assert claims.name == "张三"
    assert claims.video is not None
    assert claims.video.room == body["room_name"]
    assert claims.video.room_join and claims.video.can_publish and claims.video.can_publish_data

    view = await (await manager.get(f"/api/v1/sessions/{body['session_id']}")).json()
    assert view["status"] == "Ready"
    assert view["user_name"] == "张三"
    assert view["services"] == []


async def test_custom_room_name_and_duration_limit_shape_room_and_token(
    manager: Any, livekit: LiveKitUnderTest
) -> None:
    room = f"meeting-room-{uuid.uuid4().hex[:8]}"
    response = await manager.post(
        "/api/v1/create-session",
        json={
            "user_identity": "user123",
            "room_name": room,
            "metadata": {"purpose": "语音助手对话", "duration_limit": "36000"},
            "required_services": [],
        },
    )
    body = await response.json()
    assert body["room_name"] == room
    token = api.TokenVerifier(livekit.api_key, livekit.api_secret).verify(body["access_token"])
    view = await (await manager.get(f"/api/v1/sessions/{body['session_id']}")).json()
    assert view["metadata"]["purpose"] == "语音助手对话"
    assert token.video is not None and token.video.room == room

    # The client's token lasts the whole session: the limit, plus join_timeout for the
    # services to come in, plus the margin for joining late and reconnecting; not the default
    # client_token_ttl (6 h, shorter than this session may run).
    claims = jwt.decode(body["access_token"], livekit.api_secret, algorithms=["HS256"])
    lifetime = 36000 + FAST_SETTINGS["join_timeout"] + TOKEN_MARGIN.total_seconds()
    assert claims["exp"] - claims["nbf"] == lifetime

    again = await manager.post(
        "/api/v1/create-session", json={"user_identity": "other", "room_name": room}
    )
    assert again.status == 400
    assert_envelope(await again.json(), "InvalidRequest")


async def test_service_built_with_the_sdk_joins_and_session_becomes_ready(
    manager: Any,
) -> None:
    async with MicroserviceRunner(
        "pong-it", PongHandler(), manager_url=str(manager.make_url("")).rstrip("/")
    ):
        response = await manager.post(
            "/api/v1/create-session",
            json={"user_identity": "alice", "required_services": ["pong-it"]},
        )
        assert response.status == 200
        body = await response.json()
        assert body["status"] in ("WaitingForServices", "Ready")
        view = await wait_for_status(manager, body["session_id"], "Ready")
        [service] = view["services"]
        assert service["service_id"] == "pong-it"
        assert service["state"] == "joined"
        assert isinstance(service["join_ms"], float) and service["join_ms"] > 0
        assert view["ready_ms"] is not None


async def test_wait_until_ready_answers_ready(manager: Any) -> None:
    async with MicroserviceRunner(
        "pong-wait", PongHandler(), manager_url=str(manager.make_url("")).rstrip("/")
    ):
        response = await manager.post(
            "/api/v1/create-session",
            json={
                "user_identity": "bob",
                "required_services": ["pong-wait"],
                "wait_until_ready": True,
                "timeout_secs": 15,
            },
        )
        assert response.status == 200
        assert (await response.json())["status"] == "Ready"


async def test_service_that_never_joins_gives_408_and_leaves_no_room(
    manager: Any, livekit_api: api.LiveKitAPI
) -> None:
    async with ScriptedService(accept_without_joining).running() as service:
        await register(manager, "never-joins", service.endpoint, type="ASR")
        before = await room_names(livekit_api)
        response = await manager.post(
            "/api/v1/create-session",
            json={
                "user_identity": "carol",
                "required_services": ["never-joins"],
                "wait_until_ready": True,
                "timeout_secs": 1,
            },
        )
        assert response.status == 408
        body = await response.json()
        assert_envelope(body, "Timeout")
        assert body["message"] == JOIN_TIMEOUT_MESSAGE
        [join] = service.join_requests
        assert await room_names(livekit_api) - before == set()
        view = await (await manager.get(f"/api/v1/sessions/{join['session_id']}")).json()
        assert view["status"] == "Terminated"
        assert view["reason"] == JOIN_TIMEOUT_MESSAGE
        assert join["room_name"] not in await room_names(livekit_api)


async def test_join_timeout_ends_a_session_nobody_waits_for(
    start_manager: Any, livekit_api: api.LiveKitAPI
) -> None:
    manager = await start_manager(join_timeout=1.0)
    async with ScriptedService(accept_without_joining).running() as service:
        await register(manager, "slow", service.endpoint)
        response = await manager.post(
            "/api/v1/create-session", json={"user_identity": "dave", "required_services": ["slow"]}
        )
        assert response.status == 200
        body = await response.json()
        assert body["status"] == "WaitingForServices"
        assert body["room_name"] in await room_names(livekit_api)
        view = await wait_for_status(manager, body["session_id"], "Terminated", timeout=5)
        assert view["reason"] == JOIN_TIMEOUT_MESSAGE
        assert view["services"][0]["state"] == "dispatched"
        assert body["room_name"] not in await room_names(livekit_api)


async def test_join_room_payload_follows_the_contract(
    manager: Any, livekit: LiveKitUnderTest
) -> None:
    async with ScriptedService(accept_without_joining).running() as service:
        await register(manager, "asr-contract", service.endpoint)
        body = await (
            await manager.post(
                "/api/v1/create-session",
                json={"user_identity": "erin", "required_services": ["asr-contract"]},
            )
        ).json()
        [join] = service.join_requests
        assert set(join) == {
            "session_id",
            "room_name",
            "service_identity",
            "access_token",
            "livekit_url",
            # added after the earlier implementation's five (issue 11)
            "session_metadata",
            "user_identity",
            "user_name",
        }
        assert (join["session_metadata"], join["user_identity"], join["user_name"]) == (
            {},
            "erin",
            None,
        )
        assert join["session_id"] == body["session_id"]
        assert join["room_name"] == body["room_name"]
        assert join["service_identity"] == "asr-contract"
        assert join["livekit_url"] == livekit.url
        claims = api.TokenVerifier(livekit.api_key, livekit.api_secret).verify(join["access_token"])
        assert claims.identity == "asr-contract"
        assert claims.kind == "agent"
        assert claims.video is not None and claims.video.room == body["room_name"]


async def test_failing_service_gives_502_and_leaves_no_room(
    manager: Any, livekit_api: api.LiveKitAPI
) -> None:
    async with ScriptedService(fail_with_500).running() as service:
        await register(manager, "broken", service.endpoint)
        before = await room_names(livekit_api)
        response = await manager.post(
            "/api/v1/create-session",
            json={"user_identity": "frank", "required_services": ["broken"]},
        )
        assert response.status == 502
        body = await response.json()
        assert_envelope(body, "MicroserviceUnavailable")
        assert "broken" in body["message"] and "500" in body["message"]
        # dispatch_attempts (2) twice: the first dispatch, then one redispatch to the same
        # instance; with no other instance of its type there is nothing else to try.
        assert len(service.join_requests) == 4
        assert await room_names(livekit_api) - before == set()


async def test_omitted_required_services_means_every_registered_service(manager: Any) -> None:
    async with ScriptedService(accept_without_joining).running() as service:
        await register(manager, "svc-a", service.endpoint)
        await register(manager, "svc-b", service.endpoint)
        body = await (
            await manager.post("/api/v1/create-session", json={"user_identity": "g"})
        ).json()
        view = await (await manager.get(f"/api/v1/sessions/{body['session_id']}")).json()
        assert sorted(s["service_id"] for s in view["services"]) == ["svc-a", "svc-b"]
        assert sorted(j["service_identity"] for j in service.join_requests) == ["svc-a", "svc-b"]


async def test_unregistered_required_service_is_400_and_creates_nothing(
    manager: Any, livekit_api: api.LiveKitAPI
) -> None:
    before = await room_names(livekit_api)
    response = await manager.post(
        "/api/v1/create-session", json={"user_identity": "h", "required_services": ["ghost"]}
    )
    assert response.status == 400
    body = await response.json()
    assert_envelope(body, "InvalidRequest")
    assert "ghost" in body["message"]
    assert await room_names(livekit_api) == before


async def test_room_finished_in_livekit_terminates_the_session(
    manager: Any, livekit_api: api.LiveKitAPI
) -> None:
    body = await (await manager.post("/api/v1/create-session", json={"user_identity": "i"})).json()
    await livekit_api.room.delete_room(api.DeleteRoomRequest(room=body["room_name"]))
    view = await wait_for_status(manager, body["session_id"], "Terminated", timeout=10)
    assert view["reason"] == "LiveKit room finished"


async def test_forged_webhook_is_refused(manager: Any) -> None:
    response = await manager.post(
        "/livekit/webhook",
        data=b'{"event": "room_finished", "room": {"name": "x"}}',
        headers={"Authorization": "not-a-jwt", "Content-Type": "application/webhook+json"},
    )
    assert response.status == 401
    assert_envelope(await response.json(), "Unauthorized")


async def test_registrations_survive_a_restart(start_manager: Any, manager: Any) -> None:
    await register(manager, "durable-1", "http://127.0.0.1:9")
    await manager.close()
    restarted = await start_manager()
    response = await restarted.post(
        "/api/v1/microservices/register",
        json={"service_id": "durable-1", "endpoint": "http://127.0.0.1:9"},
    )
    assert response.status == 400
    body = await response.json()
    assert_envelope(body, "InvalidRequest")
    assert body["message"] == "Service ID already exists"


@pytest.mark.parametrize("count", [20])
async def test_concurrent_sessions_each_get_their_own_room(
    manager: Any, livekit_api: api.LiveKitAPI, count: int
) -> None:
    responses = await asyncio.gather(
        *(
            manager.post("/api/v1/create-session", json={"user_identity": f"u{n}"})
            for n in range(count)
        )
    )
    bodies = [await r.json() for r in responses]
    assert all(r.status == 200 for r in responses)
    rooms = {b["room_name"] for b in bodies}
    assert len(rooms) == count
    assert rooms <= await room_names(livekit_api)
