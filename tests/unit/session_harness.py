"""In-memory stand-ins for LiveKit and the microservices, and a harness that drives the
supervisor and its session actors through their inboxes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from session_manager.commands import (
    CreateSession,
    GetSession,
    LiveKitEvent,
    NewSession,
    RemoveSessionService,
)
from session_manager.dispatch import DispatchOutcome, JoinRoomRequest, SessionStartedRequest
from session_manager.errors import Conflict, NotFound, SessionGone
from session_manager.events import EventLog
from session_manager.livekit.gateway import LiveKitEndpoint
from session_manager.livekit.webhooks import (
    AGENT_NAME_ATTRIBUTES,
    KIND_AGENT,
    ROLE_ATTRIBUTE,
    ROLE_SERVICE,
    SESSION_ATTRIBUTE,
    RoomEvent,
)
from session_manager.registry import Registry
from session_manager.session.messages import CreateOptions, SessionCreated
from session_manager.session.states import SessionStatus
from session_manager.store import MemoryStore
from session_manager.supervisor import Supervisor

S = SessionStatus
NO_SUCH_SERVICE = "no-such-service"  # what `Harness.inbox_handled` asks a session to remove


@dataclass
class FakeGateway:
    endpoint: LiveKitEndpoint = field(
        default_factory=lambda: LiveKitEndpoint("http://lk", "ws://lk", "key", "secret")
    )
    rooms: set[str] = field(default_factory=set)
    deleted: list[str] = field(default_factory=list)
    fail_create: BaseException | None = None
    removed: list[tuple[str, str]] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)  # room name -> its metadata
    # room name -> who LiveKit says is in it (for a manager that takes a room over)
    participants: dict[str, list[RoomEvent]] = field(default_factory=dict)
    # LiveKit's agent dispatches: id -> (room, agent name, metadata), as created
    dispatches: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    deleted_dispatches: list[str] = field(default_factory=list)
    fail_dispatch: BaseException | None = None

    async def create_dispatch(self, room: str, agent_name: str, metadata: str) -> str:
        if self.fail_dispatch is not None:
            raise self.fail_dispatch
        dispatch_id = f"AD_{len(self.dispatches) + 1}"
        self.dispatches[dispatch_id] = (room, agent_name, metadata)
        return dispatch_id

    async def delete_dispatch(self, dispatch_id: str, room: str) -> None:
        self.deleted_dispatches.append(dispatch_id)

    async def create_room(
        self, name: str, *, metadata: str, empty_timeout: int, departure_timeout: int = 0
    ) -> None:
        if self.fail_create is not None:
            raise self.fail_create
        self.rooms.add(name)
        self.metadata[name] = metadata

    async def delete_room(self, name: str) -> None:
        self.rooms.discard(name)
        self.deleted.append(name)

    async def list_rooms(self) -> dict[str, str]:
        return {name: self.metadata.get(name, "") for name in self.rooms}

    async def list_participants(self, room: str) -> tuple[RoomEvent, ...] | None:
        return tuple(self.participants.get(room, ())) if room in self.rooms else None

    async def remove_participant(self, room: str, identity: str) -> None:
        self.removed.append((room, identity))

    async def update_room_metadata(self, room: str, metadata: str) -> None:
        self.metadata[room] = metadata

    def mint_token(self, *, identity: str, room_name: str, ttl: timedelta, **_: Any) -> str:
        return f"token:{identity}:{room_name}:{int(ttl.total_seconds())}"


def agent_present(room: str, name: str, sid: str, joined: bool = True) -> RoomEvent:
    """A livekit-agents participant as LiveKit reports it (see `Harness.agent`)."""
    return RoomEvent(
        kind="participant_joined" if joined else "participant_left",
        room_name=room,
        identity=f"agent-AJ_{sid}",
        participant_sid=sid,
        attributes=dict.fromkeys(AGENT_NAME_ATTRIBUTES, name),
        participant_kind=KIND_AGENT,
    )


@dataclass
class FakeMicroservices:
    outcomes: dict[str, DispatchOutcome] = field(default_factory=dict)
    requests: list[JoinRoomRequest] = field(default_factory=list)

    left: list[tuple[str, str]] = field(default_factory=list)

    # service id -> a gate its join-room calls wait on until the test opens it
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    cancelled: list[str] = field(default_factory=list)  # join-room calls the actor cancelled

    async def join_room(self, endpoint: str, request: JoinRoomRequest) -> DispatchOutcome:
        self.requests.append(request)
        gate = self.gates.get(request.service_identity)
        if gate is not None:
            try:
                await gate.wait()
            except asyncio.CancelledError:
                self.cancelled.append(request.service_identity)
                raise
        return self.outcomes.get(request.service_identity, DispatchOutcome(True, 1))

    async def leave_room(
        self, endpoint: str, session_id: str, room_name: str, *, service_id: str | None = None
    ) -> str | None:
        self.left.append((endpoint, session_id))
        return None

    # session-started calls (a warm pool's room handed to a user), as sent
    started: list[SessionStartedRequest] = field(default_factory=list)

    async def session_started(self, endpoint: str, request: SessionStartedRequest) -> str | None:
        self.started.append(request)
        return None


@dataclass
class Harness:
    supervisor: Supervisor
    gateway: FakeGateway
    microservices: FakeMicroservices
    registry: Registry
    events: EventLog
    store: MemoryStore | None = None  # the supervisor's store: what it holds after a shutdown

    async def create(
        self, *, idempotency_key: str | None = None, body_hash: str = "", **spec: Any
    ) -> SessionCreated:
        options = CreateOptions(
            wait_until_ready=spec.pop("wait_until_ready", False),
            wait_timeout=spec.pop("wait_timeout", None),
        )
        new = NewSession(
            user_identity=spec.pop("user_identity", "user123"), options=options, **spec
        )
        result: SessionCreated = await self.supervisor.ask(
            lambda r: CreateSession(new, r, idempotency_key, body_hash)
        )
        return result

    def joined(
        self, created: SessionCreated, identity: str, role: str = ROLE_SERVICE, **more: str
    ) -> None:
        self.webhook(
            "participant_joined", created.room_name, identity, role, created.session_id, **more
        )

    def left(
        self, created: SessionCreated, identity: str, role: str = ROLE_SERVICE, **more: str
    ) -> None:
        self.webhook(
            "participant_left", created.room_name, identity, role, created.session_id, **more
        )

    def agent(
        self, created: SessionCreated, name: str, *, joined: bool = True, sid: str = "PA_agent"
    ) -> None:
        """LiveKit's webhook for a livekit-agents worker's participant: kind AGENT, an identity
        of the framework's choosing, the agent name in its attributes, none of ours."""
        self.supervisor.tell(LiveKitEvent(agent_present(created.room_name, name, sid, joined)))

    async def ask(self, make: Callable[[asyncio.Future[Any]], Any]) -> Any:
        return await self.supervisor.ask(make)

    async def view(self, session_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.supervisor.ask(lambda r: GetSession(session_id, r))
        return result

    def webhook(
        self,
        kind: str,
        room: str,
        identity: str | None = None,
        role: str | None = None,
        session_id: str | None = None,
        *,
        event_id: str = "",
        participant_sid: str = "",
    ) -> None:
        attributes = {ROLE_ATTRIBUTE: role, SESSION_ATTRIBUTE: session_id} if role else {}
        self.supervisor.tell(
            LiveKitEvent(
                RoomEvent(
                    kind=kind,
                    room_name=room,
                    event_id=event_id,
                    identity=identity,
                    participant_sid=participant_sid,
                    role=role,
                    attributes={k: v for k, v in attributes.items() if v is not None},
                )
            )
        )

    async def until(self, session_id: str, status: SessionStatus) -> dict[str, Any]:
        return await self.until_view(session_id, lambda view: view["status"] == status.value)

    async def until_view(
        self, session_id: str, condition: Callable[[dict[str, Any]], bool]
    ) -> dict[str, Any]:
        """Views are published by the actor after it handles a message: poll for the change."""
        for _ in range(200):
            view = await self.view(session_id)
            if condition(view):
                return view
            await asyncio.sleep(0.01)
        raise AssertionError(f"condition never met: {view}")

    async def inbox_handled(self, session_id: str) -> None:
        """Return once the session's actor has handled every message sent to it before this
        call (webhooks, health results, timers that fired). A request that changes nothing,
        removing a service the session does not have, goes through the supervisor's inbox and
        then the actor's behind them; the actor handles its inbox in order, so its answer
        proves that whatever those earlier messages were going to do, they have done."""
        try:
            await self.supervisor.ask(
                lambda r: RemoveSessionService(session_id, NO_SUCH_SERVICE, r)
            )
        except (NotFound, Conflict, SessionGone):
            return  # the answer expected: nothing to remove (or the session has ended)
        raise AssertionError(f"session {session_id} removed {NO_SUCH_SERVICE!r}")

    async def eventually(self, condition: Callable[[], bool], what: str) -> None:
        """Poll state a fake records but nothing signals (say, a leave-room call made by a
        task the actor spawned); fail naming `what` if it never holds."""
        for _ in range(500):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"never happened: {what}")
