"""A store that forgets everything at exit: for tests and throw-away runs."""

from __future__ import annotations

from collections.abc import Callable

from session_manager.health_board import HealthBoard
from session_manager.store.base import JsonDict, SessionCursor, listed_before, matches


class MemoryStore:
    """Keeps the contract of `SqliteStore`, with nothing that can fail: every write is done at
    once, so the backlog is always empty and the store is always healthy. It takes the same
    keyword arguments so that both are built alike; it never has a reason to use them."""

    def __init__(
        self,
        *,
        board: HealthBoard | None = None,
        on_fatal: Callable[[str], None] | None = None,
        max_pending: int = 50_000,
        flush_timeout: float = 10.0,
        on_write: Callable[[bool, float], None] | None = None,
    ) -> None:
        self._services: dict[str, JsonDict] = {}
        self._sessions: dict[str, JsonDict] = {}
        self._idempotency: dict[str, JsonDict] = {}

    async def open(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def save_service(self, service: JsonDict) -> None:
        self._services[service["service_id"]] = service

    async def delete_service(self, service_id: str) -> None:
        self._services.pop(service_id, None)

    async def load_services(self) -> list[JsonDict]:
        return list(self._services.values())

    def save_session(self, view: JsonDict) -> None:
        self._sessions[view["session_id"]] = view

    async def get_session(self, session_id: str) -> JsonDict | None:
        return self._sessions.get(session_id)

    async def flush(self, timeout: float | None = None) -> None:
        return None

    def check_capacity(self) -> None:
        return None

    @property
    def healthy(self) -> bool:
        return True

    @property
    def backlog(self) -> int:
        return 0

    async def list_sessions(
        self,
        *,
        status: str | None,
        user_identity: str | None,
        limit: int,
        before: SessionCursor | None,
        owner: str | None = None,
    ) -> list[JsonDict]:
        views = [
            v
            for v in self._sessions.values()
            if matches(v, status, user_identity, owner) and listed_before(v, before)
        ]
        views.sort(key=lambda v: (v["created_at"], v["session_id"]), reverse=True)
        return views[:limit]

    async def purge(self, *, sessions_created_before: str, keys_created_before: float) -> int:
        old_sessions = [
            sid
            for sid, v in self._sessions.items()
            if v["status"] == "Terminated" and v["created_at"] < sessions_created_before
        ]
        old_keys = [
            k for k, e in self._idempotency.items() if e["created_at"] < keys_created_before
        ]
        for sid in old_sessions:
            del self._sessions[sid]
        for key in old_keys:
            del self._idempotency[key]
        return len(old_sessions) + len(old_keys)

    async def save_idempotency(self, key: str, entry: JsonDict) -> None:
        self._idempotency[key] = entry

    async def get_idempotency(self, key: str) -> JsonDict | None:
        return self._idempotency.get(key)

    async def delete_idempotency(self, key: str) -> None:
        self._idempotency.pop(key, None)
