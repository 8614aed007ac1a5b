"""Every store keeps the same promises: sessions listed newest first with filters and cursors,
views readable right after they are queued, idempotency keys, old rows purged, and the same
health interface (capacity check, bounded flush). The Redis store runs on the test session's real
redis-server. Faults of the SQLite store: test_store_faults; Redis specifics: test_redis_store."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from session_manager.health_board import HealthBoard
from session_manager.store import MemoryStore, SqliteStore, Store
from session_manager.store.redis_store import RedisStore
from session_manager.store.retention import RetentionSweeper
from tests.conftest import RedisUnderTest


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    made: Store
    if request.param == "redis":
        # Asked for here only: the memory and SQLite runs need no redis-server.
        server: RedisUnderTest = request.getfixturevalue("redis_server")
        made = RedisStore(server.url, prefix=request.getfixturevalue("redis_prefix"))
    else:
        made = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "s.db")
    await made.open()
    yield made
    await made.aclose()


def view(
    session_id: str, created_at: str, status: str = "Active", user: str = "u"
) -> dict[str, Any]:
    return {
        "session_id": session_id,
        "created_at": created_at,
        "status": status,
        "user_identity": user,
        "room_name": f"room-{session_id}",
    }


async def test_a_queued_view_is_readable_at_once(store: Store) -> None:
    store.save_session(view("a", "2026-01-01T00:00:00.000Z"))
    assert (await store.get_session("a") or {})["status"] == "Active"
    store.save_session(view("a", "2026-01-01T00:00:00.000Z", status="Terminated"))
    await store.flush()
    assert (await store.get_session("a") or {})["status"] == "Terminated"


async def test_listing_pages_newest_first(store: Store) -> None:
    for n in range(5):
        store.save_session(
            view(f"s{n}", f"2026-01-01T00:00:0{n}.000Z", user="ann" if n % 2 else "bob")
        )
    first = await store.list_sessions(status=None, user_identity=None, limit=2, before=None)
    assert [v["session_id"] for v in first] == ["s4", "s3"]
    cursor = (first[-1]["created_at"], first[-1]["session_id"])
    rest = await store.list_sessions(status=None, user_identity=None, limit=10, before=cursor)
    assert [v["session_id"] for v in rest] == ["s2", "s1", "s0"]
    anns = await store.list_sessions(status=None, user_identity="ann", limit=10, before=None)
    assert [v["session_id"] for v in anns] == ["s3", "s1"]


async def test_old_ended_sessions_and_keys_are_purged(store: Store) -> None:
    store.save_session(view("old-ended", "2020-01-01T00:00:00.000Z", status="Terminated"))
    store.save_session(view("old-live", "2020-01-01T00:00:00.000Z", status="Active"))
    store.save_session(view("new-ended", "2099-01-01T00:00:00.000Z", status="Terminated"))
    await store.save_idempotency("old", {"body_hash": "h", "created_at": 1.0, "response": {}})
    await store.save_idempotency(
        "new", {"body_hash": "h", "created_at": time.time(), "response": {}}
    )
    await store.flush()

    sweeper = RetentionSweeper(store, session_retention=86400, idempotency_ttl=86400)
    assert await sweeper.sweep() == 2
    assert await store.get_session("old-ended") is None
    assert await store.get_session("old-live") is not None  # a live session is never purged
    assert await store.get_session("new-ended") is not None
    assert await store.get_idempotency("old") is None
    assert await store.get_idempotency("new") is not None


async def test_registrations_are_kept_until_deleted(store: Store) -> None:
    await store.save_service({"service_id": "a", "endpoint": "http://a"})
    await store.save_service({"service_id": "b", "endpoint": "http://b"})
    await store.delete_service("a")
    assert [s["service_id"] for s in await store.load_services()] == ["b"]


async def test_a_healthy_store_takes_new_sessions_and_flushes_in_time(store: Store) -> None:
    store.check_capacity()
    assert store.healthy
    store.save_session(view("a", "2026-01-01T00:00:00.000Z"))
    await store.flush(timeout=10)
    assert store.backlog == 0
    store.check_capacity()
    assert store.healthy


async def test_a_store_is_built_alike_whichever_kind(
    tmp_path: Path, redis_server: RedisUnderTest, redis_prefix: str
) -> None:
    board = HealthBoard()
    options: dict[str, Any] = {
        "board": board,
        "on_fatal": lambda reason: None,
        "max_pending": 100,
        "flush_timeout": 1.0,
    }
    for made in (
        MemoryStore(**options),
        SqliteStore(tmp_path / "s.db", **options),
        RedisStore(redis_server.url, prefix=redis_prefix, **options),
    ):
        await made.open()
        made.save_session(view("a", "2026-01-01T00:00:00.000Z"))
        await made.flush()
        assert (await made.get_session("a") or {})["session_id"] == "a"
        await made.aclose()
    assert board.healthy
