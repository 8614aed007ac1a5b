"""What a microservice author implements: one handler object, called once per joined session."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from enum import StrEnum

from livekit import rtc


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


@dataclass(frozen=True, slots=True)
class JoinedSession:
    """One session the service has joined. The room is connected when `on_join` sees it."""

    session_id: str
    room_name: str
    service_id: str
    service_identity: str
    livekit_url: str
    room: rtc.Room


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
