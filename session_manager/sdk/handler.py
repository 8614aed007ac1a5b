"""What a microservice author implements: one handler object, or one entrypoint function, called
once per joined session."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

from livekit import rtc
from pydantic import JsonValue


class LeaveReason(StrEnum):
    """Why the SDK left a session; passed to `SessionHandler.on_leave`.

    A room that closed by itself is reported as ``"room_disconnected:<LiveKit reason>"``, for
    example ``"room_disconnected:ROOM_DELETED"``; test it with
    ``reason.startswith(LeaveReason.ROOM_DISCONNECTED)``.
    """

    SHUTDOWN = "shutdown"
    LEAVE_REQUESTED = "leave_requested"
    ON_JOIN_FAILED = "on_join_failed"
    ROOM_DISCONNECTED = "room_disconnected"


def _no_metadata() -> Mapping[str, JsonValue]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class JoinedSession:
    """One session the service has joined. The room is connected when `on_join` sees it.

    `metadata` is the session's metadata as the user gave it at create-session (read-only;
    keys naming a credential — token, secret, password, authorization — are left out by the
    manager), `user_identity` and `user_name` whose session it is. A manager older than these
    fields sends none of them: `metadata` is then empty and `user_identity` None.

    `pooled`: the room is one of the manager's warm pool (`warm_pools`), joined before any
    user asked for it: `on_join` sees no user (`user_identity` None, `metadata` empty) and
    `SessionHandler.on_session_started` is called with the filled-in session once a user takes
    the room.
    """

    session_id: str
    room_name: str
    service_id: str
    service_identity: str
    livekit_url: str
    room: rtc.Room
    metadata: Mapping[str, JsonValue] = field(default_factory=_no_metadata)
    user_identity: str | None = None
    user_name: str | None = None
    pooled: bool = False


class SessionHandler(abc.ABC):
    """Subclass this and hand an instance to `MicroserviceRunner`.

    The same instance serves every session, so keep per-session state keyed by
    `session.session_id` (or local to `on_join`).
    """

    @abc.abstractmethod
    async def on_join(self, session: JoinedSession) -> None:
        """Runs in its own task once the room is connected.

        It may return right after registering room callbacks, or keep running for the whole
        session: the SDK cancels it (and waits for it) when the session ends. If it raises, the
        SDK logs the error and leaves the room with reason `LeaveReason.ON_JOIN_FAILED`.
        """

    async def on_leave(self, session: JoinedSession, reason: str) -> None:  # noqa: B027
        """Runs once per joined session after its `on_join` task has finished and the room is
        disconnected. `reason` is a `LeaveReason` value (see there for room disconnects)."""

    async def on_session_started(self, session: JoinedSession) -> None:  # noqa: B027
        """Runs when a warm pool's room this service joined ahead (`session.pooled`) is handed
        to a user: `session` is the same one `on_join` got, with `metadata`, `user_identity`
        and `user_name` filled in. Its own task, while `on_join` runs on; `on_leave` gets this
        session too. An error is logged. Optional: without it the service serves on as is."""


Entrypoint = Callable[[JoinedSession], Awaitable[None]]
"""``async def entrypoint(session: JoinedSession) -> None``, the livekit-agents style: given to
the runner instead of a `SessionHandler`, it is that handler's `on_join` exactly (see there)."""


class EntrypointHandler(SessionHandler):
    """The `SessionHandler` an entrypoint function stands for: its `on_join` is the function,
    its `on_leave` does nothing."""

    def __init__(self, entrypoint: Entrypoint) -> None:
        if not callable(entrypoint):
            raise TypeError("entrypoint must be an async function taking a JoinedSession")
        self.entrypoint = entrypoint

    async def on_join(self, session: JoinedSession) -> None:
        await self.entrypoint(session)
