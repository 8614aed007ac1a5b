"""The supervisor actor: takes the front door's commands from one inbox, spawns a session actor
per session, routes LiveKit webhooks to the actor that owns the room, and reaps actors that end.

Sessions are OTP `temporary` children: never restarted; when one ends (or crashes) it is cleaned
up and its final view stays readable from the store.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TypeVar

from session_manager.errors import InvalidRequest, ManagerError, NotFound, ShuttingDown
from session_manager.livekit.webhooks import RoomEvent
from session_manager.registry import Registry
from session_manager.session.actor import SessionActor, SessionDeps
from session_manager.session.messages import (
    CreateOptions,
    RoomEventArrived,
    SessionCreated,
    Start,
    Terminate,
    settle,
)
from session_manager.session.record import JsonDict, ServiceSlot, SessionRecord
from session_manager.store.base import Store

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class NewSession:
    user_identity: str
    user_name: str | None = None
    room_name: str | None = None
    metadata: JsonDict = field(default_factory=dict)
    required_services: list[str] | None = None
    options: CreateOptions = field(default_factory=CreateOptions)


@dataclass(frozen=True)
class CreateSession:
    spec: NewSession
    reply: asyncio.Future[SessionCreated]


@dataclass(frozen=True)
class GetSession:
    session_id: str
    reply: asyncio.Future[JsonDict]


@dataclass(frozen=True)
class RegisterService:
    service_id: str
    endpoint: str
    metadata: JsonDict
    reply: asyncio.Future[JsonDict]


@dataclass(frozen=True)
class LiveKitEvent:
    """A verified webhook; the supervisor hands it to the actor that owns the room."""

    event: RoomEvent


@dataclass(frozen=True)
class ActorExited:
    session_id: str
    task: asyncio.Task[None]


SupervisorMessage = CreateSession | GetSession | RegisterService | LiveKitEvent | ActorExited


@dataclass
class _Child:
    actor: SessionActor
    task: asyncio.Task[None]


class Supervisor:
    def __init__(self, registry: Registry, store: Store, deps: SessionDeps) -> None:
        self._registry = registry
        self._store = store
        self._deps = deps
        self._inbox: asyncio.Queue[SupervisorMessage] = asyncio.Queue()
        self._children: dict[str, _Child] = {}
        self._rooms: dict[str, str] = {}  # room name -> session id, for routing webhooks
        self._views: dict[str, JsonDict] = {}  # latest view of each live session
        self._accepting = True
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False
        self._close_lock = asyncio.Lock()

    # the outside's interface -----------------------------------------------------------------

    def tell(self, message: SupervisorMessage) -> None:
        self._inbox.put_nowait(message)

    async def ask(self, make: Callable[[asyncio.Future[T]], SupervisorMessage]) -> T:
        """Send a command that carries a future and wait for the answer."""
        if self._closed:
            raise ShuttingDown("the session manager is shutting down")
        reply: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self.tell(make(reply))
        return await reply

    @property
    def live_sessions(self) -> int:
        return len(self._children)

    # lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="supervisor")

    def drain(self) -> None:
        """Refuse new sessions; the ones running go on."""
        self._accepting = False

    async def aclose(self, timeout: float) -> None:
        """End every session (rooms deleted), then stop. Idempotent."""
        async with self._close_lock:
            if self._closed:
                return
            self.drain()
            children = list(self._children.values())
            for child in children:
                child.actor.tell(Terminate("manager shutting down"))
            tasks = [child.task for child in children]
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=timeout)
                if pending:
                    log.warning(
                        "sessions still ending at shutdown; cancelling",
                        extra={"count": len(pending)},
                    )
                    for task in pending:
                        task.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
            self._closed = True
            if self._loop_task is not None:
                self._loop_task.cancel()
                with suppress(asyncio.CancelledError):
                    await self._loop_task
                self._loop_task = None
            self._refuse_leftovers()

    # the loop --------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            message = await self._inbox.get()
            try:
                await self._handle(message)
            except ManagerError as exc:
                settle(getattr(message, "reply", None), error=exc)
            except Exception as exc:
                log.exception(
                    "supervisor failed to handle a message",
                    extra={"message": type(message).__name__},
                )
                settle(getattr(message, "reply", None), error=exc)

    async def _handle(self, message: SupervisorMessage) -> None:
        match message:
            case CreateSession():
                self._create_session(message)
            case GetSession(session_id=session_id, reply=reply):
                view = self._views.get(session_id) or await self._store.get_session(session_id)
                if view is None:
                    raise NotFound(f"Session {session_id} not found")
                settle(reply, view)
            case RegisterService(service_id=sid, endpoint=endpoint, metadata=meta, reply=reply):
                record = await self._registry.register(sid, endpoint, meta)
                log.info("microservice registered", extra={"service_id": sid})
                settle(reply, record.view())
            case LiveKitEvent(event=event):
                self._route(event)
            case ActorExited(session_id=session_id, task=task):
                self._reap(session_id, task)

    def _create_session(self, message: CreateSession) -> None:
        if not self._accepting:
            raise ShuttingDown("the session manager is shutting down")
        spec = message.spec
        services = self._registry.resolve(spec.required_services)
        session_id = str(uuid.uuid4())
        room_name = spec.room_name or f"room-{session_id}"
        if room_name in self._rooms:
            raise InvalidRequest(f"Room name {room_name} is in use by another session")
        record = SessionRecord(
            session_id=session_id,
            room_name=room_name,
            user_identity=spec.user_identity,
            user_name=spec.user_name,
            metadata=spec.metadata,
            services={s.service_id: ServiceSlot(s.service_id, s.endpoint) for s in services},
        )
        actor = SessionActor(record, self._deps, self._publish)
        task = asyncio.create_task(actor.run(), name=f"session-{session_id}")
        task.add_done_callback(lambda done: self.tell(ActorExited(session_id, done)))
        self._children[session_id] = _Child(actor, task)
        self._rooms[room_name] = session_id
        log.info(
            "session created",
            extra={"session_id": session_id, "room_name": room_name, "services": len(services)},
        )
        actor.tell(Start(spec.options, message.reply))

    def _publish(self, view: JsonDict) -> None:
        """Called by session actors after each change: the only writer of a session's view."""
        self._views[view["session_id"]] = view
        self._store.save_session(view)

    def _route(self, event: RoomEvent) -> None:
        session_id = self._rooms.get(event.room_name)
        child = self._children.get(session_id) if session_id else None
        if child is None:
            # Not ours (another app's room) or a session already reaped: say so, then drop.
            log.debug(
                "webhook for a room no live session owns",
                extra={"room_name": event.room_name, "kind": event.kind},
            )
            return
        child.actor.tell(RoomEventArrived(event))

    def _reap(self, session_id: str, task: asyncio.Task[None]) -> None:
        child = self._children.pop(session_id, None)
        if child is not None:
            self._rooms.pop(child.actor.record.room_name, None)
        self._views.pop(session_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "session actor ended with an error",
                extra={"session_id": session_id},
                exc_info=task.exception(),
            )

    def _refuse_leftovers(self) -> None:
        while not self._inbox.empty():
            message = self._inbox.get_nowait()
            settle(
                getattr(message, "reply", None),
                error=ShuttingDown("the session manager is shutting down"),
            )
