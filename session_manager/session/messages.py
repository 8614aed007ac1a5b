"""What a session actor's inbox carries. One small dataclass per message; the actor dispatches on
the type. A message that wants an answer carries a future, and a failure goes back through it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from session_manager.dispatch import DispatchOutcome
from session_manager.livekit.webhooks import RoomEvent


@dataclass(frozen=True)
class CreateOptions:
    wait_until_ready: bool = False
    wait_timeout: float | None = None


@dataclass(frozen=True)
class SessionCreated:
    """The answer to create-session; carries the client's token, so it is never logged."""

    session_id: str
    room_name: str
    access_token: str
    livekit_url: str
    status: str


@dataclass(frozen=True)
class Start:
    """Create the room, mint the tokens, dispatch the services; answer `reply`."""

    options: CreateOptions
    reply: asyncio.Future[SessionCreated]


@dataclass(frozen=True)
class Adopt:
    """Take over a session a previous manager process left running: restart its timers from
    their stored deadlines and catch up with who is in its room now (`participants`, one
    participant_joined event each; None: LiveKit could not be asked, the room sweep will)."""

    participants: tuple[RoomEvent, ...] | None


@dataclass(frozen=True)
class Detach:
    """The manager is shutting down and keeps its sessions (shutdown_mode `keep`): stop this
    actor and leave the room, its client and its services as they are."""


@dataclass(frozen=True)
class RoomEventArrived:
    """A verified LiveKit webhook for this session's room."""

    event: RoomEvent


@dataclass(frozen=True)
class DispatchFinished:
    """A join-room call (with its retries) is over."""

    requirement: str
    service_id: str  # the instance it went to: the slot may have moved on since
    outcome: DispatchOutcome


@dataclass(frozen=True)
class AgentDispatchFinished:
    """LiveKit answered (or did not) the create_dispatch of an `agent:NAME` slot."""

    requirement: str
    dispatch_id: str | None  # None: the dispatch could not be made (`error` says why)
    error: str | None = None


@dataclass(frozen=True)
class JoinDeadlinePassed:
    """`join_timeout` after dispatch: every required service should have joined by now."""


@dataclass(frozen=True)
class WaitDeadlinePassed:
    """The creator's `timeout_secs` ran out before the session was Ready."""


@dataclass(frozen=True)
class DurationLimitReached:
    """`metadata.duration_limit` seconds since the session was created."""


@dataclass(frozen=True)
class ClientJoinDeadlinePassed:
    """`client_join_timeout` since creation and the user has never joined."""


@dataclass(frozen=True)
class ClientGraceExpired:
    """The user left `client_reconnect_grace` ago and has not come back."""


@dataclass(frozen=True)
class AddService:
    """Dispatch one more service (an id or `type:X`) into the running session."""

    requirement: str
    reply: asyncio.Future[Any]


@dataclass(frozen=True)
class RemoveService:
    """Ask a service to leave the session; the session no longer needs it."""

    service_id: str
    reply: asyncio.Future[Any]


class FailoverCause(StrEnum):
    """Why a slot moved to another instance (or was filled again): shown in the slot's view,
    the dispatch and join events, and the failover histogram's label."""

    PROCESS_LOST = "process lost"  # its presence connection was lost without a goodbye
    HEALTH = "health"  # its health checks failed `unhealthy_after` times
    LEFT_ROOM = "left room"  # LiveKit said it left the room
    DRAIN = "drain"  # it left the room while draining: a handover, no failure
    DISPATCH_FAILED = "dispatch failed"  # its join-room failed or was declined


@dataclass(frozen=True)
class InstanceLost:
    """An instance this session uses is known to be gone (it turned Unhealthy): `cause` says
    how it was found out; `gone_at` when it went, if known, `detected_at` when it was known."""

    service_id: str
    reason: str
    cause: FailoverCause = FailoverCause.HEALTH
    gone_at: datetime | None = None
    detected_at: datetime | None = None


@dataclass(frozen=True)
class Claim:
    """A warm pool's Ready member is handed to a user (`session.pool_member`): it becomes their
    session and answers `reply` with it, Ready."""

    user_identity: str
    user_name: str | None
    metadata: dict[str, Any]
    owner: str | None
    reply: asyncio.Future[SessionCreated]


@dataclass(frozen=True)
class Terminate:
    reason: str
    reply: asyncio.Future[Any] | None = None


SessionMessage = (
    Start
    | Adopt
    | Detach
    | RoomEventArrived
    | DispatchFinished
    | AgentDispatchFinished
    | JoinDeadlinePassed
    | WaitDeadlinePassed
    | DurationLimitReached
    | ClientJoinDeadlinePassed
    | ClientGraceExpired
    | AddService
    | RemoveService
    | InstanceLost
    | Claim
    | Terminate
)


def settle(
    future: asyncio.Future[Any] | None, result: Any = None, error: BaseException | None = None
) -> None:
    """Answer a caller unless it already went away (its handler was cancelled)."""
    if future is None or future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
