"""The storage contract the registry and the supervisor rely on."""

from __future__ import annotations

from typing import Any, Protocol

JsonDict = dict[str, Any]


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
