"""The storage contract the registry and the supervisor rely on.

A store never fails silently: a write or read that cannot be done raises `StoreUnavailable`
(a 503 for the API caller) after a bounded wait, and a store whose session writer is failing or
behind says so (`healthy`, `check_capacity`, and the health board it was given).
"""

from __future__ import annotations

from typing import Any, Protocol

JsonDict = dict[str, Any]
SessionCursor = tuple[str, str]  # (created_at, session_id) of the last session already listed


def listed_before(view: JsonDict, cursor: SessionCursor | None) -> bool:
    return cursor is None or (view["created_at"], view["session_id"]) < cursor


def matches(
    view: JsonDict, status: str | None, user_identity: str | None, owner: str | None = None
) -> bool:
    return (
        (status is None or view["status"] == status)
        and (user_identity is None or view["user_identity"] == user_identity)
        and (owner is None or view.get("owner") == owner)
    )


class Store(Protocol):
    async def open(self) -> None:
        """Raises `StartupFailed` (one line naming the file and the problem) if the store
        cannot be used at all: a corrupt or unreadable database, a data_dir that is no
        directory."""

    async def aclose(self) -> None:
        """Write what is still pending (bounded by the store's flush timeout), then close;
        nothing of the store is left running."""

    async def save_service(self, service: JsonDict) -> None:
        """Insert or replace a registration; returns once it is durable. Raises
        `StoreUnavailable` if it could not be written within the store's bounded retries."""

    async def delete_service(self, service_id: str) -> None: ...

    async def load_services(self) -> list[JsonDict]: ...

    def save_session(self, view: JsonDict) -> None:
        """Queue the latest view of a session. Never blocks and never refuses: session actors
        call it after each change, and a burst of changes to one session is coalesced into one
        write. New sessions are gated by `check_capacity` instead."""

    async def get_session(self, session_id: str) -> JsonDict | None: ...

    async def flush(self, timeout: float | None = None) -> None:
        """Return once every view queued before the call is written. Waits at most `timeout`
        seconds (None: the store's flush timeout), then raises `StoreUnavailable`; raises it at
        once if the session writer has stopped."""

    def check_capacity(self) -> None:
        """Cheap and synchronous: raises `StoreUnavailable` if the store cannot take a new
        session now (too many views waiting to be written, or the writer has stopped)."""

    @property
    def healthy(self) -> bool:
        """False while writes are failing, the backlog is at its bound, or the writer stopped."""

    @property
    def backlog(self) -> int:
        """Session views waiting to be written."""

    async def list_sessions(
        self,
        *,
        status: str | None,
        user_identity: str | None,
        limit: int,
        before: SessionCursor | None,
        owner: str | None = None,
    ) -> list[JsonDict]:
        """Newest first (created_at, then session_id, both descending), after `before`; only
        those created with the API key whose id is `owner`, when it is given."""

    async def purge(self, *, sessions_created_before: str, keys_created_before: float) -> int:
        """Forget ended sessions created before the RFC 3339 time, and idempotency keys created
        before the epoch time; returns how many rows went."""

    async def save_idempotency(self, key: str, entry: JsonDict) -> None: ...

    async def get_idempotency(self, key: str) -> JsonDict | None: ...

    async def delete_idempotency(self, key: str) -> None: ...
