"""The storage contract the registry and the supervisor rely on."""

from __future__ import annotations

from typing import Any, Protocol

JsonDict = dict[str, Any]
SessionCursor = tuple[str, str]  # (created_at, session_id) of the last session already listed


def listed_before(view: JsonDict, cursor: SessionCursor | None) -> bool:
    return cursor is None or (view["created_at"], view["session_id"]) < cursor


def matches(view: JsonDict, status: str | None, user_identity: str | None) -> bool:
    return (status is None or view["status"] == status) and (
        user_identity is None or view["user_identity"] == user_identity
    )


class Store(Protocol):
    async def open(self) -> None: ...

    async def aclose(self) -> None:
        """Write what is still pending, then close."""

    async def save_service(self, service: JsonDict) -> None:
        """Insert or replace a registration; returns once it is durable."""

    async def delete_service(self, service_id: str) -> None: ...

    async def load_services(self) -> list[JsonDict]: ...

    def save_session(self, view: JsonDict) -> None:
        """Queue the latest view of a session. Never blocks: session actors call it after each
        change, and a burst of changes to one session is coalesced into one write."""

    async def get_session(self, session_id: str) -> JsonDict | None: ...

    async def flush(self) -> None:
        """Return once every view queued before the call is written."""

    async def list_sessions(
        self,
        *,
        status: str | None,
        user_identity: str | None,
        limit: int,
        before: SessionCursor | None,
    ) -> list[JsonDict]:
        """Newest first (created_at, then session_id, both descending), after `before`."""

    async def purge(self, *, sessions_created_before: str, keys_created_before: float) -> int:
        """Forget ended sessions created before the RFC 3339 time, and idempotency keys created
        before the epoch time; returns how many rows went."""

    async def save_idempotency(self, key: str, entry: JsonDict) -> None: ...

    async def get_idempotency(self, key: str) -> JsonDict | None: ...

    async def delete_idempotency(self, key: str) -> None: ...
