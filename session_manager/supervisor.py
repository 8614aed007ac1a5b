"""The supervisor actor: takes the front door's commands from one inbox, spawns a session actor
per session, routes LiveKit webhooks to the actor that owns the room, and reaps actors that end.

Sessions are OTP `temporary` children: never restarted; when one ends (or crashes) it is cleaned
up, its services' capacity is given back, and its final view stays readable from the store.
The supervisor is also the registry's only caller for changes, so registrations and the load
counted against them change one command at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import TypeVar

from session_manager.clock import now_rfc3339
from session_manager.commands import (
    ActorExited,
    AddSessionService,
    CreateSession,
    DeleteSession,
    DeregisterService,
    DrainService,
    GetService,
    GetSession,
    IdempotentCreateFinished,
    ListServices,
    ListSessions,
    LiveKitEvent,
    NewSession,
    RegisterService,
    RemoveSessionService,
    ServiceHealthChanged,
    SupervisorMessage,
    UpdateService,
)
from session_manager.errors import (
    Conflict,
    InvalidRequest,
    ManagerError,
    NotFound,
    ShuttingDown,
)
from session_manager.events import EventLog, EventType
from session_manager.livekit.webhooks import RoomEvent
from session_manager.registry import Registry, ServiceRecord
from session_manager.registry.registry import HealthChange, ServiceStatus
from session_manager.session.actor import SessionActor, SessionDeps
from session_manager.session.messages import (
    AddService,
    InstanceLost,
    RemoveService,
    RoomEventArrived,
    SessionCreated,
    Start,
    Terminate,
    settle,
)
from session_manager.session.record import JsonDict, ServiceSlot, SessionRecord
from session_manager.session.states import SessionStatus
from session_manager.store.base import SessionCursor, Store

log = logging.getLogger(__name__)

T = TypeVar("T")
TERMINATED_BY_REQUEST = "terminated by request"


@dataclass
class _Child:
    actor: SessionActor
    task: asyncio.Task[None]


@dataclass
class _PendingCreate:
    """A create under an Idempotency-Key still in flight; retries wait for its outcome."""

    body_hash: str
    waiters: list[asyncio.Future[SessionCreated]]


class Supervisor:
    def __init__(
        self,
        registry: Registry,
        store: Store,
        deps: SessionDeps,
        *,
        events: EventLog,
        idempotency_ttl: float = 86400.0,
    ) -> None:
        self._events = events
        self._registry = registry
        self._store = store
        self._deps = deps
        self._idempotency_ttl = idempotency_ttl
        self._inbox: asyncio.Queue[SupervisorMessage] = asyncio.Queue()
        self._children: dict[str, _Child] = {}
        self._rooms: dict[str, str] = {}  # room name -> session id, for routing webhooks
        self._views: dict[str, JsonDict] = {}  # latest view of each live session
        self._pending_creates: dict[str, _PendingCreate] = {}
        self._accepting = True
        self.sessions_created = 0  # counters for /metrics
        self.sessions_ended = 0
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

    def live_statuses(self) -> dict[str, int]:
        """How many live sessions are in each status (from their published views)."""
        counts: dict[str, int] = {}
        for view in self._views.values():
            counts[view["status"]] = counts.get(view["status"], 0) + 1
        return counts

    def health_changed(self, change: HealthChange) -> None:
        """Called by the health monitor: record the change; sessions lose an instance that
        turned Unhealthy at once, instead of waiting for LiveKit to notice it is gone."""
        self.tell(ServiceHealthChanged(change))

    # lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._end_orphans()
        self._loop_task = asyncio.create_task(self._run(), name="supervisor")

    async def _end_orphans(self) -> None:
        """Sessions the store still holds as live lost their actor with the last process (it
        was killed, or crashed): end them properly — room deleted, Terminated with a reason."""
        reason = "session manager restarted while the session was live"
        for status in (S for S in SessionStatus if S is not SessionStatus.TERMINATED):
            before: SessionCursor | None = None
            while views := await self._store.list_sessions(
                status=status.value, user_identity=None, limit=100, before=before
            ):
                # A page at a time, in parallel: a LiveKit that is down costs one timeout, not
                # one per orphan.
                await asyncio.gather(*(self._end_orphan(view, reason) for view in views))
                before = (views[-1]["created_at"], views[-1]["session_id"])

    async def _end_orphan(self, view: JsonDict, reason: str) -> None:
        try:
            await asyncio.wait_for(
                self._deps.gateway.delete_room(view["room_name"]), self._deps.teardown_timeout
            )
        except (ManagerError, TimeoutError) as exc:
            log.warning(
                "orphaned room could not be deleted",
                extra={"session_id": view["session_id"], "error": str(exc) or "timeout"},
            )
        now = now_rfc3339()
        ended = {
            **view,
            "status": SessionStatus.TERMINATED.value,
            "reason": reason,
            "terminated_at": now,
            "updated_at": now,
        }
        self._store.save_session(ended)
        await self._store.flush()
        self._events.append(
            EventType.SESSION_TERMINATED, session_id=view["session_id"], data={"reason": reason}
        )
        log.warning(
            "ended a session left live by the previous process",
            extra={"session_id": view["session_id"], "was": view["status"]},
        )

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
            except Exception as exc:
                if not isinstance(exc, ManagerError):
                    log.exception(
                        "supervisor failed to handle a message",
                        extra={"message": type(message).__name__},
                    )
                settle(getattr(message, "reply", None), error=exc)

    async def _handle(self, message: SupervisorMessage) -> None:
        match message:
            case CreateSession():
                await self._create_session(message)
            case GetSession(session_id=session_id, reply=reply):
                settle(reply, await self._view(session_id))
            case ListSessions():
                views = await self._store.list_sessions(
                    status=message.status,
                    user_identity=message.user_identity,
                    limit=message.limit,
                    before=message.before,
                )
                settle(message.reply, views)
            case DeleteSession(session_id=session_id, reply=reply):
                child = self._children.get(session_id)
                if child is not None:
                    child.actor.tell(Terminate(TERMINATED_BY_REQUEST, reply))
                else:
                    settle(reply, await self._view(session_id))  # already ended: idempotent
            case AddSessionService(session_id=session_id, requirement=requirement, reply=reply):
                (await self._running_actor(session_id)).tell(AddService(requirement, reply))
            case RemoveSessionService(session_id=session_id, service_id=service_id, reply=reply):
                (await self._running_actor(session_id)).tell(RemoveService(service_id, reply))
            case LiveKitEvent(event=event):
                self._route(event)
            case ActorExited(session_id=session_id, task=task):
                self._reap(session_id, task)
            case ServiceHealthChanged(change=change):
                self._on_health_changed(change)
            case IdempotentCreateFinished(key=key, outcome=outcome):
                await self._finish_idempotent_create(key, outcome)
            case _:
                await self._handle_registry(message)

    async def _handle_registry(self, message: SupervisorMessage) -> None:
        registry = self._registry
        match message:
            case RegisterService(service_id=sid, endpoint=endpoint, metadata=meta, reply=reply):
                record = await registry.register(sid, endpoint, meta)
                self._registry_changed(
                    "microservice registered", EventType.MICROSERVICE_REGISTERED, record
                )
                settle(reply, record.view())
            case UpdateService(service_id=sid, endpoint=endpoint, metadata=meta, reply=reply):
                record = await registry.update(
                    sid, endpoint=endpoint, metadata=meta, draining=message.draining
                )
                self._registry_changed(
                    "microservice updated", EventType.MICROSERVICE_UPDATED, record
                )
                settle(reply, record.view())
            case DrainService(service_id=sid, reply=reply):
                record = await registry.set_draining(sid)
                self._registry_changed(
                    "microservice draining", EventType.MICROSERVICE_UPDATED, record
                )
                settle(reply, record.view())
            case DeregisterService(service_id=sid, reply=reply):
                record = await registry.deregister(sid)
                self._registry_changed(
                    "microservice deregistered", EventType.MICROSERVICE_DEREGISTERED, record
                )
                settle(reply, record.view())
            case GetService(service_id=sid, reply=reply):
                settle(reply, registry.get(sid).view())
            case ListServices(service_type=service_type, status=status, reply=reply):
                records = registry.listing(service_type=service_type, status=status)
                settle(reply, [record.view() for record in records])

    def _registry_changed(self, message: str, event: EventType, record: ServiceRecord) -> None:
        log.info(message, extra={"service_id": record.service_id})
        self._events.append(event, service_id=record.service_id, data=record.view())

    def _on_health_changed(self, change: HealthChange) -> None:
        self._events.append(
            EventType.MICROSERVICE_HEALTH_CHANGED,
            service_id=change.service_id,
            data={"old": change.old.value, "new": change.new.value, "error": change.error},
        )
        if change.new is not ServiceStatus.UNHEALTHY:
            return
        record = self._registry.find(change.service_id)
        for session_id in sorted(record.sessions) if record else ():
            child = self._children.get(session_id)
            if child is not None:
                child.actor.tell(InstanceLost(change.service_id, f"unhealthy: {change.error}"))

    # sessions --------------------------------------------------------------------------------

    async def _view(self, session_id: str) -> JsonDict:
        view = self._views.get(session_id) or await self._store.get_session(session_id)
        if view is None:
            raise NotFound(f"Session {session_id} not found")
        return view

    async def _running_actor(self, session_id: str) -> SessionActor:
        child = self._children.get(session_id)
        if child is None:
            await self._view(session_id)  # NotFound when it never existed
            raise Conflict(f"Session {session_id} has ended")
        return child.actor

    async def _create_session(self, message: CreateSession) -> None:
        if not self._accepting:
            raise ShuttingDown("the session manager is shutting down")
        key = message.idempotency_key
        if key is None:
            self._spawn_session(message.spec, message.reply)
            return
        pending = self._pending_creates.get(key)
        if pending is not None:
            self._check_same_body(key, pending.body_hash, message.body_hash)
            pending.waiters.append(message.reply)
            return
        stored = await self._store.get_idempotency(key)
        if stored is not None and time.time() - stored["created_at"] < self._idempotency_ttl:
            self._check_same_body(key, stored["body_hash"], message.body_hash)
            settle(message.reply, SessionCreated(**stored["response"]))
            return
        outcome: asyncio.Future[SessionCreated] = asyncio.get_running_loop().create_future()
        self._spawn_session(message.spec, outcome)
        self._pending_creates[key] = _PendingCreate(message.body_hash, [message.reply])
        outcome.add_done_callback(lambda done: self.tell(IdempotentCreateFinished(key, done)))

    @staticmethod
    def _check_same_body(key: str, known: str, given: str) -> None:
        if known != given:
            raise Conflict(f"Idempotency-Key {key} was used with a different request body")

    async def _finish_idempotent_create(
        self, key: str, outcome: asyncio.Future[SessionCreated]
    ) -> None:
        pending = self._pending_creates.pop(key)
        error = outcome.exception()
        if error is None:
            created = outcome.result()
            # The answer includes the client's token so that a retry gets the same answer.
            entry = {
                "body_hash": pending.body_hash,
                "created_at": time.time(),
                "response": created.__dict__,
            }
            try:
                await self._store.save_idempotency(key, entry)
            except Exception:
                log.exception("idempotency key could not be stored", extra={"key": key})
        for waiter in pending.waiters:
            settle(waiter, None if error else outcome.result(), error)

    def _spawn_session(self, spec: NewSession, reply: asyncio.Future[SessionCreated]) -> None:
        session_id = str(uuid.uuid4())
        room_name = spec.room_name or f"room-{session_id}"
        if room_name in self._rooms:
            raise InvalidRequest(f"Room name {room_name} is in use by another session")
        chosen = self._choose_services(spec.required_services)
        for record in chosen.values():
            self._registry.acquire(record.service_id, session_id)
        session = SessionRecord(
            session_id=session_id,
            room_name=room_name,
            user_identity=spec.user_identity,
            user_name=spec.user_name,
            metadata=spec.metadata,
            services={
                requirement: ServiceSlot(
                    requirement, record.service_id, record.endpoint, record.service_type
                )
                for requirement, record in chosen.items()
            },
        )
        actor = SessionActor(session, self._deps, self._publish)
        task = asyncio.create_task(actor.run(), name=f"session-{session_id}")
        task.add_done_callback(lambda done: self.tell(ActorExited(session_id, done)))
        self._children[session_id] = _Child(actor, task)
        self.sessions_created += 1
        self._rooms[room_name] = session_id
        log.debug(
            "session created",
            extra={"session_id": session_id, "room_name": room_name, "services": len(chosen)},
        )
        actor.tell(Start(spec.options, reply))

    def _choose_services(self, required: list[str] | None) -> dict[str, ServiceRecord]:
        """Pick an instance for each requirement, or refuse the whole session (nothing is
        reserved unless everything can be)."""
        if required is None:
            return {record.service_id: record for record in self._registry.defaults()}
        unknown = [
            r for r in required if not r.startswith("type:") and self._registry.find(r) is None
        ]
        if unknown:
            raise InvalidRequest(f"Required services not registered: {', '.join(unknown)}")
        chosen: dict[str, ServiceRecord] = {}
        for requirement in dict.fromkeys(required):
            taken = {record.service_id for record in chosen.values()}
            record = self._registry.choose(requirement, exclude=taken)
            if record.service_id in taken:
                raise InvalidRequest(f"{record.service_id} is required twice")
            chosen[requirement] = record
        return chosen

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
            self.sessions_ended += 1
        self._views.pop(session_id, None)
        self._registry.release_session(session_id)
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
