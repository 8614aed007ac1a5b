"""A manager configured with `store = "redis"` keeps its sessions and registrations in the real
redis-server of the test session (the store itself: tests/unit/test_redis_store.py)."""

from __future__ import annotations

from typing import Any

import pytest

from session_manager.api.routes import DAEMON
from session_manager.store.redis_store import RedisStore
from tests.conftest import ManagerFactory, RedisUnderTest

pytestmark = pytest.mark.integration


async def test_a_manager_on_redis_keeps_sessions_and_registrations_there(
    start_manager: ManagerFactory, redis_server: RedisUnderTest, redis_prefix: str
) -> None:
    manager: Any = await start_manager(
        store="redis", redis_url=redis_server.url, redis_prefix=redis_prefix, redis_timeout=1.0
    )
    assert isinstance(manager.app[DAEMON].store, RedisStore)
    assert (await manager.get("/health")).status == 200

    registered = await manager.post(
        "/api/v1/microservices/register",
        json={"service_id": "asr-1", "endpoint": "http://127.0.0.1:9", "metadata": {}},
    )
    assert registered.status == 200, await registered.text()
    created = await manager.post(
        "/api/v1/create-session", json={"user_identity": "user123", "required_services": []}
    )
    assert created.status == 200, await created.text()
    session_id = (await created.json())["session_id"]
    listed = await (await manager.get("/api/v1/sessions?user_identity=user123")).json()
    assert [s["session_id"] for s in listed["sessions"]] == [session_id]
    await manager.app[DAEMON].store.flush()

    # What the manager wrote, read back from Redis by a store of its own.
    reader = RedisStore(redis_server.url, prefix=redis_prefix)
    await reader.open()
    try:
        assert (await reader.get_session(session_id) or {})["user_identity"] == "user123"
        assert [s["service_id"] for s in await reader.load_services()] == ["asr-1"]
    finally:
        await reader.aclose()
