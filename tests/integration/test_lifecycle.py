"""Sessions you can manage and a registry you can trust, over HTTP, on a real livekit-server."""

from __future__ import annotations

import asyncio
from typing import Any

import jwt
import pytest
from livekit import api

from session_manager.store import SqliteStore
from tests.conftest import room_names
from tests.fake_services import (
    ScriptedService,
    accept_without_joining,
    decline_with_503,
    register,
    wait_for_status,
)
from tests.integration.test_sessions import assert_envelope

pytestmark = pytest.mark.integration


async def create(manager: Any, status: int = 200, **body: Any) -> dict[str, Any]:
    response = await manager.post("/api/v1/create-session", json={"user_identity": "u", **body})
    assert response.status == status, await response.text()
    result: dict[str, Any] = await response.json()
    return result


async def test_duration_limit_ends_the_session_and_removes_the_room(
    manager: Any, livekit_api: api.LiveKitAPI
) -> None:
    # When it fires is for the unit tests, on a virtual clock; here: the limit, not anything
    # else, ends a session on a real LiveKit, and its room goes with it.
    body = await create(manager, required_services=[], metadata={"duration_limit": "3"})
    assert body["room_name"] in await room_names(livekit_api)
    view = await wait_for_status(manager, body["session_id"], "Terminated", timeout=60)
    assert view["reason"] == "duration limit of 3 s reached"
    assert body["room_name"] not in await room_names(livekit_api)


async def test_delete_sends_leave_room_removes_the_room_and_is_idempotent(
    manager: Any, livekit_api: api.LiveKitAPI
) -> None:
    async with ScriptedService(accept_without_joining).running() as service:
        await register(manager, "svc", service.endpoint)
        body = await create(manager, required_services=["svc"])
        response = await manager.delete(f"/api/v1/sessions/{body['session_id']}")
        assert response.status == 200
        view = await response.json()
        assert view["status"] == "Terminated"
        assert view["reason"] == "terminated by request"
        assert service.leave_requests == [
            {"session_id": body["session_id"], "room_name": body["room_name"]}
        ]
        assert body["room_name"] not in await room_names(livekit_api)
        again = await manager.delete(f"/api/v1/sessions/{body['session_id']}")
        assert again.status == 200
        assert (await again.json())["status"] == "Terminated"
    missing = await manager.delete("/api/v1/sessions/nope")
    assert missing.status == 404
    assert_envelope(await missing.json(), "NotFound")


async def test_listing_returns_exactly_what_was_created(manager: Any) -> None:
    created = [
        await create(manager, user_identity=user, required_services=[])
        for user in ("ann", "bob", "ann", "cid", "ann")
    ]
    await manager.delete(f"/api/v1/sessions/{created[0]['session_id']}")

    page = await (await manager.get("/api/v1/sessions?user_identity=ann&limit=2")).json()
    ids = [v["session_id"] for v in page["sessions"]]
    assert ids == [created[4]["session_id"], created[2]["session_id"]]
    rest = await (
        await manager.get(
            f"/api/v1/sessions?user_identity=ann&limit=2&cursor={page['next_cursor']}"
        )
    ).json()
    assert [v["session_id"] for v in rest["sessions"]] == [created[0]["session_id"]]
    assert rest["next_cursor"] is None

    ended = await (await manager.get("/api/v1/sessions?status=Terminated")).json()
    assert [v["session_id"] for v in ended["sessions"]] == [created[0]["session_id"]]
    everyone = await (await manager.get("/api/v1/sessions")).json()
    assert {v["session_id"] for v in everyone["sessions"]} == {c["session_id"] for c in created}

    bad = await manager.get("/api/v1/sessions?status=Sleeping")
    assert bad.status == 400
    assert_envelope(await bad.json(), "InvalidRequest")
    bad_cursor = await manager.get("/api/v1/sessions?cursor=%%%")
    assert bad_cursor.status == 400
    assert_envelope(await bad_cursor.json(), "InvalidRequest")


async def test_rest_alias_creates_the_same_way(manager: Any) -> None:
    response = await manager.post(
        "/api/v1/sessions", json={"user_identity": "rest", "required_services": []}
    )
    assert response.status == 200
    body = await response.json()
    assert set(body) == {"session_id", "room_name", "access_token", "livekit_url", "status"}
    assert body["status"] == "Ready"


async def test_registry_read_update_drain_and_deregister(manager: Any) -> None:
    await register(manager, "asr-1", "http://127.0.0.1:9001", type="ASR", max_sessions=4)
    await register(manager, "tts-1", "http://127.0.0.1:9002", type="TTS")

    listing = await (await manager.get("/api/v1/microservices?type=ASR")).json()
    assert [s["service_id"] for s in listing["microservices"]] == ["asr-1"]
    one = await (await manager.get("/api/v1/microservices/asr-1")).json()
    assert one["status"] == "Healthy" and one["max_sessions"] == 4 and one["draining"] is False

    response = await manager.put(
        "/api/v1/microservices/asr-1",
        json={"endpoint": "http://127.0.0.1:9003", "metadata": {"type": "ASR", "version": "2"}},
    )
    assert response.status == 200
    updated = await response.json()
    assert updated["endpoint"] == "http://127.0.0.1:9003"
    assert updated["metadata"]["version"] == "2"

    drained = await (await manager.post("/api/v1/microservices/asr-1/drain")).json()
    assert drained["draining"] is True
    listing = await (await manager.get("/api/v1/microservices?status=draining")).json()
    assert [s["service_id"] for s in listing["microservices"]] == ["asr-1"]
    back = await manager.put("/api/v1/microservices/asr-1", json={"draining": False})
    assert (await back.json())["draining"] is False
    await manager.post("/api/v1/microservices/asr-1/drain")

    response = await manager.delete("/api/v1/microservices/asr-1")
    assert response.status == 200
    gone = await manager.get("/api/v1/microservices/asr-1")
    assert gone.status == 404
    assert_envelope(await gone.json(), "NotFound")
    bad = await manager.put("/api/v1/microservices/tts-1", json={"endpoint": "nope"})
    assert bad.status == 400
    assert_envelope(await bad.json(), "InvalidRequest")


async def test_drained_instance_gets_no_new_session(manager: Any) -> None:
    async with (
        ScriptedService(accept_without_joining).running() as first,
        ScriptedService(accept_without_joining).running() as second,
    ):
        await register(manager, "pong-a", first.endpoint, type="PONG")
        await register(manager, "pong-b", second.endpoint, type="PONG")
        await manager.post("/api/v1/microservices/pong-a/drain")
        for _ in range(3):
            await create(manager, required_services=["type:PONG"])
        assert first.join_requests == []
        assert len(second.join_requests) == 3


async def test_declining_instance_makes_the_manager_pick_the_other(manager: Any) -> None:
    async with (
        ScriptedService(decline_with_503).running() as busy,
        ScriptedService(accept_without_joining).running() as free,
    ):
        # The instance with the most free capacity is chosen first: pong-busy, every time
        # (a decline gives its slot back). It declines, and the session goes to pong-free.
        await register(manager, "pong-busy", busy.endpoint, type="PONG", max_sessions=10)
        await register(manager, "pong-free", free.endpoint, type="PONG", max_sessions=2)
        bodies = [await create(manager, required_services=["type:PONG"]) for _ in range(2)]
        session_ids = [body["session_id"] for body in bodies]
        assert [r["session_id"] for r in busy.join_requests] == session_ids
        assert [r["session_id"] for r in free.join_requests] == session_ids
        for session_id in session_ids:
            view = await (await manager.get(f"/api/v1/sessions/{session_id}")).json()
            [slot] = view["services"]
            assert slot["service_id"] == "pong-free"
            assert slot["declined_by"] == ["pong-busy"]
            assert slot["redispatches"] == 0  # a decline is an answer, not a failure
        busy_view = await (await manager.get("/api/v1/microservices/pong-busy")).json()
        assert busy_view["sessions"] == 0


async def test_no_capacity_is_503_and_creates_no_room(
    manager: Any, livekit_api: api.LiveKitAPI
) -> None:
    async with ScriptedService(accept_without_joining).running() as service:
        await register(manager, "pong-1", service.endpoint, type="PONG", max_sessions=1)
        await create(manager, required_services=["type:PONG"])
        before = await room_names(livekit_api)
        body = await create(manager, status=503, required_services=["type:PONG"])
        assert_envelope(body, "NoCapacity")
        assert await room_names(livekit_api) == before


async def test_unhealthy_service_is_not_chosen(start_manager: Any) -> None:
    manager = await start_manager(health_interval=0.1, health_timeout=0.5, unhealthy_after=2)
    async with (
        ScriptedService(accept_without_joining, healthy=False).running() as sick,
        ScriptedService(accept_without_joining).running() as well,
    ):
        await register(manager, "pong-sick", sick.endpoint, type="PONG")
        await register(manager, "pong-well", well.endpoint, type="PONG")
        for _ in range(100):
            view = await (await manager.get("/api/v1/microservices/pong-sick")).json()
            if view["status"] == "Unhealthy":
                break
            await asyncio.sleep(0.05)
        assert view["status"] == "Unhealthy"
        assert view["last_error"] == "health answered HTTP 500"
        for _ in range(3):
            await create(manager, required_services=["type:PONG"])
        assert sick.join_requests == []
        assert len(well.join_requests) == 3


async def test_idempotency_key_makes_one_room_not_two(
    manager: Any, livekit_api: api.LiveKitAPI
) -> None:
    before = await room_names(livekit_api)
    headers = {"Idempotency-Key": "order-42"}
    payload = {"user_identity": "idem", "required_services": []}
    first, second = await asyncio.gather(
        manager.post("/api/v1/create-session", json=payload, headers=headers),
        manager.post("/api/v1/create-session", json=payload, headers=headers),
    )
    one, two = await first.json(), await second.json()
    assert one == two
    third = await (
        await manager.post("/api/v1/create-session", json=payload, headers=headers)
    ).json()
    # The same session; its token is minted again once the answer is stored (none is kept).
    assert {k: v for k, v in third.items() if k != "access_token"} == {
        k: v for k, v in one.items() if k != "access_token"
    }
    claims = jwt.decode(third["access_token"], options={"verify_signature": False})
    assert (claims["sub"], claims["video"]["room"]) == ("idem", one["room_name"])
    assert await room_names(livekit_api) - before == {one["room_name"]}

    other = await manager.post(
        "/api/v1/create-session", json={**payload, "user_name": "x"}, headers=headers
    )
    assert other.status == 409
    assert_envelope(await other.json(), "Conflict")


async def test_services_added_and_removed_over_http(manager: Any) -> None:
    async with ScriptedService(accept_without_joining).running() as service:
        await register(manager, "late", service.endpoint, type="LATE")
        body = await create(manager, required_services=[])
        sid = body["session_id"]
        response = await manager.post(
            f"/api/v1/sessions/{sid}/services", json={"service": "type:LATE"}
        )
        assert response.status == 200
        view = await response.json()
        assert view["status"] == "WaitingForServices"
        assert [s["service_id"] for s in view["services"]] == ["late"]
        for _ in range(100):  # join-room goes out after the answer
            if service.join_requests:
                break
            await asyncio.sleep(0.02)
        assert [r["session_id"] for r in service.join_requests] == [sid]

        twice = await manager.post(f"/api/v1/sessions/{sid}/services", json={"service": "late"})
        assert twice.status == 409
        assert_envelope(await twice.json(), "Conflict")
        response = await manager.delete(f"/api/v1/sessions/{sid}/services/late")
        view = await response.json()
        assert view["services"] == [] and view["status"] == "Ready"
        missing = await manager.post("/api/v1/sessions/nope/services", json={"service": "late"})
        assert missing.status == 404
        assert_envelope(await missing.json(), "NotFound")


async def test_sessions_left_by_a_killed_manager_are_taken_over_at_start(
    start_manager: Any, make_settings: Any, livekit_api: api.LiveKitAPI
) -> None:
    """What a killed manager leaves behind: sessions marked live in its store, their rooms in
    LiveKit (or not any more), and a room whose session was never stored."""
    settings = make_settings(deployment="takeover-test")
    store = SqliteStore(settings.data_dir / "session-manager.sqlite3")
    await store.open()
    tag = '{"session_manager": "takeover-test"}'
    for session_id in ("kept", "lost"):
        store.save_session(
            {
                "session_id": session_id,
                "room_name": f"room-{session_id}",
                "status": "Ready",
                "user_identity": "crash",
                "created_at": "2026-01-01T00:00:00.000Z",
                "services": [],
            }
        )
    await store.aclose()
    for room in ("room-kept", "room-stray"):
        await livekit_api.room.create_room(api.CreateRoomRequest(name=room, metadata=tag))

    manager = await start_manager(deployment="takeover-test")

    kept = await (await manager.get("/api/v1/sessions/kept")).json()
    assert kept["status"] == "Ready"
    lost = await (await manager.get("/api/v1/sessions/lost")).json()
    assert lost["status"] == "Terminated"
    assert lost["reason"].startswith("room lost")
    rooms = await room_names(livekit_api)
    assert "room-kept" in rooms and "room-stray" not in rooms
    # The adopted session is the manager's as any other: it ends when asked.
    ended = await (await manager.delete("/api/v1/sessions/kept")).json()
    assert ended["status"] == "Terminated"
    assert "room-kept" not in await room_names(livekit_api)


async def test_a_shutdown_keeps_sessions_for_the_next_process(
    start_manager: Any, livekit_api: api.LiveKitAPI
) -> None:
    first = await start_manager(shutdown_mode="keep")
    body = await create(first, required_services=[], metadata={"duration_limit": 3600})
    sid, room = body["session_id"], body["room_name"]
    await first.close()  # what SIGTERM does
    assert room in await room_names(livekit_api)

    second = await start_manager(shutdown_mode="end")
    view = await (await second.get(f"/api/v1/sessions/{sid}")).json()
    assert view["status"] == "Ready"
    assert view["deadlines"]["duration_limit"] >= view["created_at"]
    await second.close()  # shutdown_mode end: sessions end, rooms go
    assert room not in await room_names(livekit_api)


async def test_metrics_tell_what_runs(manager: Any) -> None:
    await register(manager, "asr-m", "http://127.0.0.1:9", type="ASR")
    for _ in range(2):
        await create(manager, required_services=[])
    ended = await create(manager, required_services=[])
    await manager.delete(f"/api/v1/sessions/{ended['session_id']}")
    for _ in range(100):  # the supervisor counts an ended session once its actor is reaped
        text = await (await manager.get("/metrics")).text()
        if "session_manager_sessions_ended_total 1.0" in text:
            break
        await asyncio.sleep(0.02)
    lines = set(text.splitlines())
    assert 'session_manager_sessions{status="Ready"} 2.0' in lines
    assert "session_manager_sessions_created_total 3.0" in lines
    assert "session_manager_sessions_ended_total 1.0" in lines
    assert (
        'session_manager_microservice_sessions{draining="false",service_id="asr-m",'
        'status="Healthy"} 0.0'
    ) in lines
    assert "# TYPE session_manager_webhook_deliveries_total counter" in lines
