"""The commands the supervisor takes from its inbox: one small dataclass each, carrying a
future when the sender wants an answer. The front door builds them; the supervisor dispatches on
their type."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from session_manager.livekit.webhooks import RoomEvent
from session_manager.registry.health import HealthResults
from session_manager.session.messages import CreateOptions, SessionCreated
from session_manager.session.record import JsonDict
from session_manager.store.base import SessionCursor


@dataclass(frozen=True)
class Access:
    """Who sent a command, for the ownership checks the supervisor makes in its loop: the id of
    the caller's API key (never the key) and whether that key has the `admin` scope. Without
    API keys configured `owner` is None: nothing is owned and nothing is checked."""

    owner: str | None = None
    admin: bool = False

    def may_use(self, owner: str | None) -> bool:
        """Whether this caller may see or change what `owner` created or registered."""
        return self.owner is None or self.admin or owner == self.owner

    @property
    def owner_filter(self) -> str | None:
        """The owner a listing is narrowed to: None for an admin or without keys."""
        return None if self.admin else self.owner


OPEN_ACCESS = Access()


@dataclass(frozen=True)
class NewSession:
    user_identity: str
    user_name: str | None = None
    room_name: str | None = None
    metadata: JsonDict = field(default_factory=dict)
    required_services: list[str] | None = None
    options: CreateOptions = field(default_factory=CreateOptions)
    owner: str | None = None  # id of the API key that creates it (None without keys)


# commands -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateSession:
    spec: NewSession
    reply: asyncio.Future[SessionCreated]
    idempotency_key: str | None = None
    body_hash: str = ""


@dataclass(frozen=True)
class GetSession:
    session_id: str
    reply: asyncio.Future[JsonDict]
    access: Access = OPEN_ACCESS


@dataclass(frozen=True)
class ListSessions:
    status: str | None
    user_identity: str | None
    limit: int
    before: SessionCursor | None
    reply: asyncio.Future[list[JsonDict]]
    access: Access = OPEN_ACCESS


@dataclass(frozen=True)
class DeleteSession:
    session_id: str
    reply: asyncio.Future[JsonDict]
    access: Access = OPEN_ACCESS


@dataclass(frozen=True)
class AddSessionService:
    session_id: str
    requirement: str
    reply: asyncio.Future[JsonDict]
    access: Access = OPEN_ACCESS


@dataclass(frozen=True)
class RemoveSessionService:
    session_id: str
    service_id: str
    reply: asyncio.Future[JsonDict]
    access: Access = OPEN_ACCESS


@dataclass(frozen=True)
class RegisterService:
    service_id: str
    endpoint: str
    metadata: JsonDict
    reply: asyncio.Future[JsonDict]
    access: Access = OPEN_ACCESS  # its key id becomes the registration's owner


@dataclass(frozen=True)
class UpdateService:
    service_id: str
    endpoint: str | None
    metadata: JsonDict | None
    draining: bool | None
    reply: asyncio.Future[JsonDict]
    access: Access = OPEN_ACCESS


@dataclass(frozen=True)
class DrainService:
    service_id: str
    reply: asyncio.Future[JsonDict]
    access: Access = OPEN_ACCESS


@dataclass(frozen=True)
class DeregisterService:
    service_id: str
    reply: asyncio.Future[JsonDict]
    access: Access = OPEN_ACCESS


@dataclass(frozen=True)
class RotateServiceSecret:
    """A new signing secret for a registration; answered `{service_id, signing_secret}`."""

    service_id: str
    reply: asyncio.Future[JsonDict]
    access: Access = OPEN_ACCESS


@dataclass(frozen=True)
class GetService:
    service_id: str
    reply: asyncio.Future[JsonDict]
    access: Access = OPEN_ACCESS


@dataclass(frozen=True)
class ListServices:
    service_type: str | None
    status: str | None
    reply: asyncio.Future[list[JsonDict]]


@dataclass(frozen=True)
class LiveKitEvent:
    """A verified webhook; the supervisor hands it to the actor that owns the room."""

    event: RoomEvent


@dataclass(frozen=True)
class ActorExited:
    session_id: str
    task: asyncio.Task[None]


@dataclass(frozen=True)
class HealthChecked:
    """One round of the health monitor: the registry applies it, from the supervisor's loop."""

    results: HealthResults


@dataclass(frozen=True)
class ProcessLost:
    """An SDK instance's presence connection was lost without a goodbye and not restored
    within its grace (here or, in a cluster, on another process): its process is dead."""

    service_id: str
    gone_at: datetime  # when its connection went
    detected_at: datetime  # when the grace ran out and it was declared lost


@dataclass(frozen=True)
class LiveKitLost:
    """LiveKit went down. `rooms_lost`: every room is certainly gone (a managed single node
    that died); otherwise we cannot know until it answers again."""

    reason: str
    rooms_lost: bool


@dataclass(frozen=True)
class LiveKitBack:
    """LiveKit answers again: compare its rooms with the live sessions."""


@dataclass(frozen=True)
class ReconcileRooms:
    """Time to compare LiveKit's rooms with the live sessions (see the supervisor)."""


@dataclass(frozen=True)
class TendPools:
    """Time to end the warm pools' idle members and start the fills that are due."""


@dataclass(frozen=True)
class SessionsLost:
    """Another process of the cluster holds these sessions' leases now: give them up."""

    session_ids: list[str]


@dataclass(frozen=True)
class AdoptSessions:
    """Sessions whose owner is gone, claimed by this process: run an actor for each."""

    adoptions: list[Any]  # takeover.Adoption (not imported: the takeover imports commands' peers)


@dataclass(frozen=True)
class RemoteWebhook:
    """A webhook another process of the cluster received, for whichever process owns the room."""

    event: RoomEvent


@dataclass(frozen=True)
class ClusterLoads:
    """How many sessions hold a place on each instance across the cluster, as just read."""

    loads: dict[str, int]


@dataclass(frozen=True)
class RegistryChanged:
    """Another process changed a registration in the shared store: read it again."""

    service_id: str
    status: str | None  # its health there, for a registration new to this process


@dataclass(frozen=True)
class IoFinished:
    """A piece of I/O the supervisor ran outside its loop is done; `then` runs in the loop."""

    task: asyncio.Future[Any]
    then: Callable[[asyncio.Future[Any]], None]


SupervisorMessage = (
    CreateSession
    | GetSession
    | ListSessions
    | DeleteSession
    | AddSessionService
    | RemoveSessionService
    | RegisterService
    | UpdateService
    | DrainService
    | DeregisterService
    | RotateServiceSecret
    | GetService
    | ListServices
    | LiveKitEvent
    | ActorExited
    | HealthChecked
    | ProcessLost
    | LiveKitLost
    | LiveKitBack
    | ReconcileRooms
    | TendPools
    | SessionsLost
    | AdoptSessions
    | RemoteWebhook
    | RegistryChanged
    | ClusterLoads
    | IoFinished
)
