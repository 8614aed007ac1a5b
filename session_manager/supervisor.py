"""The supervisor actor owns its loop: it takes the front door's commands from one inbox, spawns a
session actor per session, routes LiveKit webhooks to the actor that owns the room, and reaps
actors that end.

Sessions are OTP `temporary` children: never restarted; when one ends (or crashes) it is cleaned
up, its services' capacity is given back, and its final view stays readable from the store.
The supervisor is the registry's one writer: registrations, health results and load change only
from its loop, one command at a time.

Ownership and the limits on sessions and registrations are checked in the loop too. Each command
from the front door carries the caller's `Access` (its API key's id, and whether it is admin): a
session created with another key is NotFound, as if it did not exist; a registration made with
another key is Forbidden. Past `max_live_sessions` a create is AtCapacity, past
`max_sessions_per_user` or `max_services` TooManyRequests.

Its loop never waits on I/O: reads of the store, idempotency look-ups and writes, registration
writes and LiveKit room listings run as tasks it owns (`_offload`); what must change state when
they finish comes back through the inbox as `IoFinished`. If the loop itself dies, every waiting
caller is answered at once, /health turns 503 and `on_fatal` has the process exit non-zero.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from session_manager.clock import utc_now
from session_manager.cluster.bus import SessionCommand
from session_manager.cluster.node import ClusterNode
from session_manager.commands import (
    OPEN_ACCESS,
    Access,
    ActorExited,
    AddSessionService,
    AdoptSessions,
    ClusterLoads,
    CreateSession,
    DeleteSession,
    DeregisterService,
    DrainService,
    GetService,
    GetSession,
    HealthChecked,
    IoFinished,
    ListServices,
    ListSessions,
    LiveKitBack,
    LiveKitEvent,
    LiveKitLost,
    NewSession,
    ProcessLost,
    ReconcileRooms,
    RegisterService,
    RegistryChanged,
    RemoteWebhook,
    RemoveSessionService,
    RotateServiceSecret,
    SessionsLost,
    SupervisorMessage,
    TendPools,
    UpdateService,
)
from session_manager.errors import (
    AtCapacity,
    Conflict,
    Forbidden,
    InvalidRequest,
    LiveKitUnavailable,
    ManagerError,
    NotFound,
    ShuttingDown,
    StoreUnavailable,
    TooManyRequests,
    Unhealthy,
)
from session_manager.events import EventLog, EventType
from session_manager.health_board import CLUSTER, LIVEKIT, STORE, SUPERVISOR, HealthBoard
from session_manager.livekit.webhooks import RoomEvent
from session_manager.periodic import Periodic
from session_manager.pools import Pool, WarmPools, WarmPoolSetting, pool_view
from session_manager.registry import Registry, ServiceRecord
from session_manager.registry.health import HealthResults
from session_manager.registry.registry import HealthChange, ServiceStatus
from session_manager.session.actor import SessionActor
from session_manager.session.deps import (
    SessionDeps,
    created_by,
    mint_client_token,
    room_session,
)
from session_manager.session.messages import (
    AddService,
    Adopt,
    Claim,
    CreateOptions,
    FailoverCause,
    InstanceLost,
    RemoveService,
    RoomEventArrived,
    SessionCreated,
    SessionMessage,
    Start,
    Terminate,
    settle,
)
from session_manager.session.pool_member import PoolMemberActor
from session_manager.session.record import AGENT_PREFIX, JsonDict, ServiceSlot, SessionRecord
from session_manager.session.states import LIVE_STATUSES, SessionStatus
from session_manager.store.base import Store
from session_manager.supervision import cancel_and_wait, watch
from session_manager.takeover import Adoption

log = logging.getLogger(__name__)

T = TypeVar("T")
TERMINATED_BY_REQUEST = "terminated by request"
# A caller is never left waiting longer than this, whatever happens inside (the longest wait a
# caller can ask for, timeout_secs, is 3600 s).
ASK_TIMEOUT = 3700.0
SEEN_WEBHOOKS = 10_000  # webhook ids remembered, so one LiveKit sends twice is acted on once
PROCESS_LOST = "process lost"  # a lost instance's last_error, and its health event's error
# Retry-After (seconds) of a create refused by max_live_sessions or max_sessions_per_user, and
# of a registration refused by max_services: sessions end and services leave in that time scale.
LIMIT_RETRY_AFTER = 10
POOL_TEND_INTERVAL = 0.5  # seconds between looks at the warm pools (expiry, fills due)
NO_USER = ""  # a warm pool member's user_identity until it is handed out (never a user's)


@dataclass
class _Child:
    actor: SessionActor
    task: asyncio.Task[None]
    started: float = field(default_factory=time.monotonic)


@dataclass
class _PendingCreate:
    """A create under an Idempotency-Key not yet stored; retries with the key wait for it."""

    body_hash: str
    spec: NewSession
    waiters: list[asyncio.Future[SessionCreated]]


class Supervisor:
    def __init__(
        self,
        registry: Registry,
        store: Store,
        deps: SessionDeps,
        *,
        events: EventLog,
        board: HealthBoard | None = None,
        on_fatal: Callable[[str], None] | None = None,
        idempotency_ttl: float = 86400.0,
        startup_timeout: float = 10.0,
        room_sweep_interval: float = 60.0,
        max_live_sessions: int = 10_000,
        max_sessions_per_user: int | None = None,
        max_services: int = 10_000,
        keep_sessions_at_shutdown: bool = False,
        cluster: ClusterNode | None = None,
        warm_pools: list[WarmPoolSetting] | None = None,
    ) -> None:
        self._cluster = cluster
        self._pools = WarmPools(warm_pools or ())
        self._pool_tending = Periodic(
            "pool-keeper", self._ask_to_tend_pools, interval=POOL_TEND_INTERVAL
        )
        self._events = events
        self._keep_sessions_at_shutdown = keep_sessions_at_shutdown
        self._max_live_sessions = max_live_sessions
        self._max_sessions_per_user = max_sessions_per_user
        self._max_services = max_services
        self._live_per_user: dict[str, int] = {}  # user_identity -> its live sessions
        self._registry = registry
        self._store = store
        self._deps = deps
        self._board = board or HealthBoard()
        self._on_fatal = on_fatal
        self._idempotency_ttl = idempotency_ttl
        self._startup_timeout = startup_timeout
        self._inbox: asyncio.Queue[SupervisorMessage] = asyncio.Queue()
        self._children: dict[str, _Child] = {}
        self._rooms: dict[str, str] = {}  # room name -> session id, for routing webhooks
        self._views: dict[str, JsonDict] = {}  # latest view of each live session
        self._pending_creates: dict[str, _PendingCreate] = {}
        self._io: set[asyncio.Task[Any]] = set()  # I/O run outside the loop, owned here
        self._registry_writes: dict[str, asyncio.Task[None]] = {}  # last write per service id
        self._seen_webhooks: OrderedDict[str, None] = OrderedDict()
        self._accepting = True
        self.sessions_created = 0  # counters for /metrics
        self.sessions_ended = 0
        self._loop_task: asyncio.Task[None] | None = None
        self._room_sweeps = Periodic(
            "room-sweeper", self._ask_for_sweep, interval=room_sweep_interval, jitter=0.1
        )
        self._failure: str | None = None
        self._closed = False
        self._close_lock = asyncio.Lock()

    # the outside's interface -----------------------------------------------------------------

    def tell(self, message: SupervisorMessage) -> None:
        if self._failure is not None or self._closed:
            self._refuse(message)
            return
        self._inbox.put_nowait(message)

    async def ask(self, make: Callable[[asyncio.Future[T]], SupervisorMessage]) -> T:
        """Send a command that carries a future and wait for the answer (bounded)."""
        if self._closed:
            raise ShuttingDown("the session manager is shutting down")
        if self._failure is not None:
            raise Unhealthy(f"the session manager cannot serve: {self._failure}")
        reply: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self.tell(make(reply))
        try:
            async with asyncio.timeout(ASK_TIMEOUT):
                return await reply
        except TimeoutError:
            raise Unhealthy("the session manager did not answer in time") from None

    def live_statuses(self) -> dict[str, int]:
        """How many live sessions are in each status (from their published views)."""
        counts: dict[str, int] = {}
        for view in self._views.values():
            counts[view["status"]] = counts.get(view["status"], 0) + 1
        return counts

    def health_checked(self, results: HealthResults) -> None:
        """Called by the health monitor after each round."""
        self.tell(HealthChecked(results))

    def process_lost(self, service_id: str, gone_at: datetime) -> None:
        """Called by the presence board when an SDK instance's process is known dead."""
        self.tell(ProcessLost(service_id, gone_at, utc_now()))

    def livekit_lost(self, reason: str, rooms_lost: bool) -> None:
        """Called by the LiveKit watch when LiveKit goes down."""
        self.tell(LiveKitLost(reason, rooms_lost))

    def livekit_back(self) -> None:
        """Called by the LiveKit watch when LiveKit answers again."""
        self.tell(LiveKitBack())

    # lifecycle -------------------------------------------------------------------------------

    async def start(self, adopted: list[Adoption] | None = None) -> None:
        """Start the loop, with an actor back for each session a previous process left live
        (see session_manager.takeover)."""
        self._loop_task = asyncio.create_task(self._run(), name="supervisor")
        watch(self._loop_task, self._loop_died)
        self._adopt(adopted or [])
        cluster = self._cluster
        if cluster is not None:
            cluster.on_lost = lambda session_ids: self.tell(SessionsLost(session_ids))
            cluster.on_orphans = lambda adoptions: self.tell(AdoptSessions(adoptions))
            cluster.service_ids = lambda: [record.service_id for record in self._registry.all()]
            cluster.on_loads = lambda loads: self.tell(ClusterLoads(loads))
            cluster.bus.run_command = self._run_for_another_process
            cluster.bus.deliver_webhook = lambda event: self.tell(RemoteWebhook(event))
            cluster.bus.registry_changed = lambda sid, status: self.tell(
                RegistryChanged(sid, status)
            )
        self._room_sweeps.start()
        if self._pools:
            self._pool_tending.start()
            self.tell(TendPools())

    def _adopt(self, adoptions: list[Adoption]) -> None:
        for adoption in adoptions:
            record = adoption.record
            if record.session_id in self._children:
                continue
            for slot in record.services.values():
                self._registry.acquire(slot.service_id, record.session_id)
            self._run_actor(record, Adopt(adoption.participants))

    async def _ask_for_sweep(self) -> None:
        self.tell(ReconcileRooms())

    def drain(self) -> None:
        """Refuse new sessions; the ones running go on."""
        self._accepting = False

    async def aclose(self, timeout: float) -> None:
        """Stop every session actor, then stop. Idempotent. Sessions are kept as they are for
        the next process (`keep_sessions_at_shutdown`: the rooms, clients and services carry
        on; a session whose creator still waits ends), or ended with their rooms deleted."""
        async with self._close_lock:
            if self._closed:
                return
            self.drain()
            children = list(self._children.values())
            self._pools.release_all()
            for child in children:
                # A warm pool's member has no user to keep it for: it ends, even in `keep`.
                if self._keep_sessions_at_shutdown and not _unclaimed(child.actor):
                    child.actor.detach()
                else:
                    child.actor.tell(Terminate("manager shutting down"))
            tasks = [child.task for child in children]
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=timeout)
                if pending:
                    log.warning(
                        "sessions still ending at shutdown; cancelling",
                        extra={"count": len(pending)},
                    )
                    await cancel_and_wait(pending)
            self._closed = True
            await self._room_sweeps.aclose()
            await self._pool_tending.aclose()
            if self._keep_sessions_at_shutdown and self._cluster is not None:
                # Their last views first, then their leases: other processes adopt them now.
                try:
                    await self._store.flush()
                except ManagerError:
                    log.error("views not written at shutdown; leases left to run out")
                else:
                    await self._cluster.hand_over()
            await cancel_and_wait((self._loop_task, *self._io))
            self._loop_task = None
            self._refuse_leftovers()

    # the loop --------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            message = await self._inbox.get()
            try:
                self._handle(message)
            except Exception as exc:
                if not isinstance(exc, ManagerError):
                    log.exception(
                        "supervisor failed to handle a command",
                        extra={"command": type(message).__name__},
                    )
                settle(getattr(message, "reply", None), error=exc)
            except BaseException:
                # The loop is dying (cancelled, or worse): the command in hand is answered too.
                settle(
                    getattr(message, "reply", None),
                    error=Unhealthy("the session manager stopped while handling this request"),
                )
                raise

    def _loop_died(self, error: BaseException | None) -> None:
        reason = f"supervisor loop ended: {type(error).__name__ if error else 'returned'}"
        self._failure = reason
        self._board.down(SUPERVISOR, reason)
        self._refuse_leftovers()
        if self._on_fatal is not None:
            self._on_fatal(reason)

    def _handle(self, message: SupervisorMessage) -> None:
        match message:
            case CreateSession():
                self._create_session(message)
            case GetSession(session_id=session_id, reply=reply, access=access):
                view = self._views.get(session_id)
                if view is not None:
                    _check_session_owner(session_id, view.get("owner"), access)
                    settle(reply, view)
                else:
                    self._offload(self._stored_view(session_id, access), reply=reply)
            case ListSessions():
                self._offload(
                    self._store.list_sessions(
                        status=message.status,
                        user_identity=message.user_identity,
                        limit=message.limit,
                        before=message.before,
                        owner=message.access.owner_filter,
                    ),
                    reply=message.reply,
                )
            case DeleteSession(session_id=session_id, reply=reply, access=access):
                child = self._children.get(session_id)
                if child is not None:
                    _check_session_owner(session_id, child.actor.record.owner, access)
                    child.actor.tell(Terminate(TERMINATED_BY_REQUEST, reply))
                else:  # already ended (idempotent), or another process's
                    self._offload(self._elsewhere(session_id, "delete", None, access), reply=reply)
            case AddSessionService(session_id=session_id, requirement=requirement, reply=reply):
                self._tell_running(
                    session_id, AddService(requirement, reply), reply, message.access
                )
            case RemoveSessionService(session_id=session_id, service_id=service_id, reply=reply):
                self._tell_running(
                    session_id, RemoveService(service_id, reply), reply, message.access
                )
            case LiveKitEvent(event=event):
                if self._cluster is not None and event.event_id:
                    # LiveKit may post each webhook to every process: one acts on it.
                    first = self._cluster.first_sight(event.event_id)
                    self._offload(first, then=lambda task: self._route_first(event, task))
                else:
                    self._route(event)
            case RemoteWebhook(event=event):
                child = self._children.get(self._rooms.get(event.room_name, ""))
                if child is not None:
                    child.actor.tell(RoomEventArrived(event))
            case SessionsLost(session_ids=session_ids):
                for session_id in session_ids:
                    child = self._children.get(session_id)
                    if child is not None:
                        child.actor.relinquish()
            case AdoptSessions(adoptions=adoptions):
                self._adopt(adoptions)
            case ClusterLoads(loads=loads):
                self._registry.apply_cluster_load(loads)
            case RegistryChanged(service_id=service_id, status=status):
                self._offload(
                    self._store.load_services(),
                    then=lambda task: self._registration_read(service_id, status, task),
                )
            case ActorExited(session_id=session_id, task=task):
                self._reap(session_id, task)
            case HealthChecked(results=results):
                self._on_health_checked(results)
            case ProcessLost():
                self._on_process_lost(message)
            case LiveKitLost(reason=reason, rooms_lost=rooms_lost):
                self._on_livekit_lost(reason, rooms_lost)
            case TendPools():
                self._tend_pools()
            case LiveKitBack() | ReconcileRooms():
                compare = self._reconcile_rooms(time.monotonic())
                self._offload(self._deps.gateway.list_rooms(), then=compare)
            case IoFinished(task=task, then=then):
                then(task)
            case _:
                self._handle_registry(message)

    def _offload(
        self,
        coro: Coroutine[Any, Any, T],
        *,
        reply: asyncio.Future[T] | None = None,
        then: Callable[[asyncio.Future[T]], None] | None = None,
    ) -> asyncio.Task[T]:
        """Run I/O as a task this supervisor owns: its result answers `reply` directly, and
        `then` (if any) runs back in the loop once it is done (not when it was cancelled)."""
        task = asyncio.create_task(coro)
        self._io.add(task)

        def done(finished: asyncio.Task[T]) -> None:
            self._io.discard(finished)
            if finished.cancelled():
                settle(reply, error=ShuttingDown("the session manager is shutting down"))
                return
            error = finished.exception()
            if error is not None and not isinstance(error, ManagerError):
                log.error("supervisor I/O failed", exc_info=error)
                error = StoreUnavailable("the store could not be read or written")
            settle(reply, None if error else finished.result(), error)
            if then is not None:
                self.tell(IoFinished(finished, then))

        task.add_done_callback(done)
        return task

    # the registry (its one writer) -----------------------------------------------------------

    def _handle_registry(self, message: SupervisorMessage) -> None:
        registry = self._registry
        match message:
            case RegisterService(service_id=sid, endpoint=endpoint, metadata=meta, reply=reply):
                if registry.find(sid) is None and len(registry.all()) >= self._max_services:
                    raise TooManyRequests(
                        f"the registry holds its most microservices ({self._max_services})",
                        retry_after=LIMIT_RETRY_AFTER,
                    )
                record = registry.register(sid, endpoint, meta, owner=message.access.owner)
                self._persist_registration(
                    record,
                    reply,
                    lambda: registry.forget(sid),
                    EventType.MICROSERVICE_REGISTERED,
                    answer=_secret_answer(record),
                )
            case UpdateService(service_id=sid, endpoint=endpoint, metadata=meta, reply=reply):
                _check_service_owner(registry.get(sid), message.access)
                record, undo = registry.update(
                    sid, endpoint=endpoint, metadata=meta, draining=message.draining
                )
                self._persist_registration(record, reply, undo, EventType.MICROSERVICE_UPDATED)
            case DrainService(service_id=sid, reply=reply):
                _check_service_owner(registry.get(sid), message.access)
                record, undo = registry.update(sid, draining=True)
                self._persist_registration(record, reply, undo, EventType.MICROSERVICE_UPDATED)
            case DeregisterService(service_id=sid, reply=reply):
                _check_service_owner(registry.get(sid), message.access)
                record, undo = registry.deregister(sid)
                self._persist_registration(record, reply, undo, EventType.MICROSERVICE_DEREGISTERED)
            case RotateServiceSecret(service_id=sid, reply=reply):
                _check_service_owner(registry.get(sid), message.access)
                record, undo = registry.rotate_secret(sid)  # signs with the new one at once
                secret = _secret_answer(record)
                self._persist_registration(
                    record, reply, undo, EventType.MICROSERVICE_UPDATED, answer=secret
                )
            case GetService(service_id=sid, reply=reply):
                _check_service_owner(registry.get(sid), message.access)
                settle(reply, registry.get(sid).view())
            case ListServices(service_type=service_type, status=status, reply=reply):
                records = registry.listing(service_type=service_type, status=status)
                settle(reply, [record.view() for record in records])

    def _persist_registration(
        self,
        record: ServiceRecord,
        reply: asyncio.Future[JsonDict],
        undo: Callable[[], None],
        event: EventType,
        *,
        answer: JsonDict | None = None,
    ) -> None:
        """Write the change made in memory; answer once durable (with the view, or `answer`),
        or undo it and say why. Writes for one service id run one after another, so the last
        change is the one kept."""
        service_id = record.service_id
        previous = self._registry_writes.get(service_id)

        async def write() -> None:
            if previous is not None:
                await asyncio.wait([previous], timeout=self._startup_timeout)
            await self._registry.persist(service_id)

        def written(task: asyncio.Future[None]) -> None:
            if self._registry_writes.get(service_id) is task:
                del self._registry_writes[service_id]
            if task.cancelled():
                return
            error = task.exception()
            if error is not None:
                undo()
                settle(reply, error=_as_store_error(error))
                return
            log.info(event.value, extra={"service_id": service_id})
            self._events.append(event, service_id=service_id, data=record.view())
            if self._cluster is not None:  # the other processes read it again
                status = record.status.value if self._registry.find(service_id) else None
                self._offload(self._cluster.bus.announce_registration(service_id, status))
            settle(reply, record.view() if answer is None else answer)

        self._registry_writes[service_id] = self._offload(write(), then=written)

    def _on_health_checked(self, results: HealthResults) -> None:
        for service_id, error in results:
            change = self._registry.record_health(service_id, error)
            if change is not None:
                lost = InstanceLost(service_id, f"unhealthy: {error}", detected_at=utc_now())
                self._health_changed(change, lost)

    def _on_process_lost(self, message: ProcessLost) -> None:
        """An SDK instance's process is dead: Unhealthy with error "process lost" at once,
        and its sessions move now (told when it went and when that was known)."""
        sid = message.service_id
        change = self._registry.record_lost(sid, PROCESS_LOST)
        if change is None:
            return  # gone from the registry, or already Unhealthy (its sessions were told)
        lost = InstanceLost(
            sid,
            PROCESS_LOST,
            cause=FailoverCause.PROCESS_LOST,
            gone_at=message.gone_at,
            detected_at=message.detected_at,
        )
        detect_ms = round((message.detected_at - message.gone_at).total_seconds() * 1000, 1)
        self._health_changed(change, lost, detect_ms=detect_ms)

    def _health_changed(
        self, change: HealthChange, lost: InstanceLost, *, detect_ms: float | None = None
    ) -> None:
        service_id = change.service_id
        level = logging.WARNING if change.new is ServiceStatus.UNHEALTHY else logging.INFO
        log.log(
            level,
            "microservice health changed",
            extra={
                "service_id": service_id,
                "old": change.old.value,
                "new": change.new.value,
                "error": change.error,
            },
        )
        data: JsonDict = {"old": change.old.value, "new": change.new.value, "error": change.error}
        if detect_ms is not None:
            data["detect_ms"] = detect_ms  # from the connection's loss to the verdict
        self._events.append(EventType.MICROSERVICE_HEALTH_CHANGED, service_id=service_id, data=data)
        if change.new is not ServiceStatus.UNHEALTHY:
            return
        # Sessions lose an instance that turned Unhealthy at once, instead of waiting the
        # ~20 s LiveKit takes to notice it is gone.
        record = self._registry.find(service_id)
        for session_id in sorted(record.sessions) if record else ():
            child = self._children.get(session_id)
            if child is not None:
                child.actor.tell(lost)

    # LiveKit ---------------------------------------------------------------------------------

    def _on_livekit_lost(self, reason: str, rooms_lost: bool) -> None:
        if not rooms_lost:
            return  # maybe a blip: the rooms are compared when LiveKit answers again
        for child in list(self._children.values()):
            child.actor.tell(Terminate(f"LiveKit room lost: {reason}"))

    def _reconcile_rooms(self, asked_at: float) -> Callable[[asyncio.Future[dict[str, str]]], None]:
        """Compare LiveKit's rooms with the live sessions (after an outage, and every
        `room_sweep_interval`): a session whose room LiveKit no longer has is over; a room this
        deployment created that no live session owns (its delete failed, or a late joiner
        brought it back) is deleted. Sessions spawned after the listing was asked for are not
        judged by it; a room of a session still being created is in `_rooms` already."""

        def compare(task: asyncio.Future[dict[str, str]]) -> None:
            if task.cancelled() or task.exception() is not None:
                log.warning("LiveKit rooms could not be listed")
                return
            rooms = task.result()
            for child in list(self._children.values()):
                record = child.actor.record
                if (
                    child.started < asked_at
                    and record.status is not SessionStatus.CREATING
                    and record.room_name not in rooms
                ):
                    child.actor.tell(Terminate("LiveKit room lost: LiveKit no longer has it"))
            deployment = self._deps.deployment
            for name, metadata in rooms.items():
                if name not in self._rooms and created_by(metadata) == deployment:
                    self._offload(self._delete_stray_room(name, room_session(metadata)))

        return compare

    async def _delete_stray_room(self, name: str, session_id: str | None) -> None:
        if self._cluster is not None and session_id is not None:
            if await self._cluster.live_anywhere({session_id}):
                return  # the room of a session another process owns
        log.info("deleting a room no live session owns", extra={"room_name": name})
        try:
            await self._deps.gateway.delete_room(name)
        except ManagerError as exc:  # the next sweep tries again
            log.warning(
                "stray room could not be deleted", extra={"room_name": name, "error": exc.message}
            )

    # sessions --------------------------------------------------------------------------------

    async def _stored_view(self, session_id: str, access: Access = OPEN_ACCESS) -> JsonDict:
        view = await self._store.get_session(session_id)
        if view is None:
            raise NotFound(f"Session {session_id} not found")
        _check_session_owner(session_id, view.get("owner"), access)
        return view

    def _tell_running(
        self,
        session_id: str,
        message: Any,
        reply: asyncio.Future[Any],
        access: Access = OPEN_ACCESS,
    ) -> None:
        child = self._children.get(session_id)
        if child is not None:
            _check_session_owner(session_id, child.actor.record.owner, access)
            child.actor.tell(message)
            return

        op = "add_service" if isinstance(message, AddService) else "remove_service"
        argument = message.requirement if isinstance(message, AddService) else message.service_id
        self._offload(self._elsewhere(session_id, op, argument, access), reply=reply)

    async def _elsewhere(
        self, session_id: str, op: str, argument: str | None, access: Access
    ) -> JsonDict:
        """A command for a session with no actor here: it has ended (a delete answers its final
        view, anything else a 409), never existed (404), or runs in another process of the
        cluster, which is asked to run it."""
        view = await self._stored_view(session_id, access)  # NotFound when it never existed
        if self._cluster is not None and view["status"] in {s.value for s in LIVE_STATUSES}:
            return await self._cluster.ask_owner(SessionCommand(op, session_id, argument, access))
        if op == "delete":
            return view
        raise Conflict(f"Session {session_id} has ended")

    def _run_for_another_process(self, command: SessionCommand) -> asyncio.Future[JsonDict] | None:
        """The cluster bus asks whether this process owns a session, and if so to run a command
        another process received for it (called from the bus's loop: only reads here)."""
        if command.session_id not in self._children:
            return None
        reply: asyncio.Future[JsonDict] = asyncio.get_running_loop().create_future()
        sid, argument, access = command.session_id, command.argument or "", command.access
        if command.op == "delete":
            self.tell(DeleteSession(sid, reply, access))
        elif command.op == "add_service":
            self.tell(AddSessionService(sid, argument, reply, access))
        else:
            self.tell(RemoveSessionService(sid, argument, reply, access))
        return self._offload(self._written_then(reply))

    async def _written_then(self, reply: asyncio.Future[JsonDict]) -> JsonDict:
        """The answer to another process, once the change is written: the asker reads from the
        store what it was answered."""
        view = await reply
        try:
            await self._store.flush()
        except ManagerError:
            log.warning("a change answered to another process is not written yet")
        return view

    def _route_first(self, event: RoomEvent, first: asyncio.Future[bool]) -> None:
        if not first.cancelled() and first.exception() is None and first.result():
            self._route(event)

    def _registration_read(
        self, service_id: str, status: str | None, task: asyncio.Future[list[JsonDict]]
    ) -> None:
        if task.cancelled() or task.exception() is not None:
            log.warning(
                "a registration changed elsewhere could not be read",
                extra={"service_id": service_id},
            )
            return
        stored = next((s for s in task.result() if s["service_id"] == service_id), None)
        self._registry.apply_stored(service_id, stored, ServiceStatus(status) if status else None)

    def _create_session(self, message: CreateSession) -> None:
        self._check_can_create(message.spec)
        key = message.idempotency_key
        if key is None:
            self._spawn_session(message.spec, message.reply)
            return
        pending = self._pending_creates.get(key)
        if pending is not None:
            self._check_same_body(key, pending.body_hash, message.body_hash)
            pending.waiters.append(message.reply)
            return
        pending = _PendingCreate(message.body_hash, message.spec, [message.reply])
        self._pending_creates[key] = pending
        self._offload(self._store.get_idempotency(key), then=self._idempotency_looked_up(key))

    def _check_can_create(self, spec: NewSession | None = None) -> None:
        if not self._accepting:
            raise ShuttingDown("the session manager is shutting down")
        livekit = self._board.problem(LIVEKIT)
        if livekit is not None:
            raise LiveKitUnavailable(f"LiveKit is unavailable: {livekit.reason}")
        store = self._board.problem(STORE) or self._board.problem(CLUSTER)
        if store is not None:
            raise StoreUnavailable(f"sessions cannot be stored now: {store.reason}")
        self._store.check_capacity()
        # A create a warm pool's member serves takes no more room: the member held it.
        if len(self._children) >= self._max_live_sessions and not self._pool_serves(spec):
            raise AtCapacity(
                f"the session manager runs its most live sessions ({self._max_live_sessions})",
                retry_after=LIMIT_RETRY_AFTER,
            )
        per_user = self._max_sessions_per_user
        if (
            spec is not None
            and per_user is not None
            and self._live_per_user.get(spec.user_identity, 0) >= per_user
        ):
            raise TooManyRequests(
                f"user_identity: has its most live sessions ({per_user})",
                retry_after=LIMIT_RETRY_AFTER,
            )

    def _idempotency_looked_up(self, key: str) -> Callable[[asyncio.Future[JsonDict | None]], None]:
        def decide(task: asyncio.Future[JsonDict | None]) -> None:
            pending = self._pending_creates[key]
            error = None if task.cancelled() else task.exception()
            stored = None if task.cancelled() or error else task.result()
            if task.cancelled() or error is not None:
                del self._pending_creates[key]
                for waiter in pending.waiters:
                    settle(waiter, error=_as_store_error(error))
            elif stored is not None and time.time() - stored["created_at"] < self._idempotency_ttl:
                del self._pending_creates[key]
                created = self._replayed(stored["response"], pending.spec)
                for waiter in pending.waiters:
                    if stored["body_hash"] == pending.body_hash:
                        settle(waiter, created)
                    else:
                        settle(waiter, error=_different_body(key))
            else:
                self._spawn_idempotent(key, pending)

        return decide

    def _spawn_idempotent(self, key: str, pending: _PendingCreate) -> None:
        outcome: asyncio.Future[SessionCreated] = asyncio.get_running_loop().create_future()
        try:
            self._check_can_create(pending.spec)
            self._spawn_session(pending.spec, outcome)
        except ManagerError as exc:
            del self._pending_creates[key]
            for waiter in pending.waiters:
                settle(waiter, error=exc)
            return
        finish = self._idempotent_create_finished(key)
        outcome.add_done_callback(lambda done: self.tell(IoFinished(done, finish)))

    def _idempotent_create_finished(
        self, key: str
    ) -> Callable[[asyncio.Future[SessionCreated]], None]:
        def finish(outcome: asyncio.Future[SessionCreated]) -> None:
            pending = self._pending_creates[key]
            if outcome.exception() is not None:
                del self._pending_creates[key]  # a failed create may be tried again
                for waiter in pending.waiters:
                    _answer_from(outcome, waiter)
                return
            # Durable before it is answered: a crash after the answer cannot make a retry with
            # the key create a second session. Retries that come meanwhile wait with the first.
            # What is stored keeps no token: a replay mints a fresh one.
            response = {k: v for k, v in outcome.result().__dict__.items() if k != "access_token"}
            entry = {
                "body_hash": pending.body_hash,
                "created_at": time.time(),
                "response": response,
            }
            self._offload(
                self._store.save_idempotency(key, entry),
                then=self._idempotency_saved(key, outcome),
            )

        return finish

    def _idempotency_saved(
        self, key: str, outcome: asyncio.Future[SessionCreated]
    ) -> Callable[[asyncio.Future[None]], None]:
        def answer(saved: asyncio.Future[None]) -> None:
            pending = self._pending_creates.pop(key)
            error = saved.exception()
            if error is None:
                for waiter in pending.waiters:
                    _answer_from(outcome, waiter)
                return
            # Unanswered, the session has no user yet; kept, a retry would make a second one.
            session_id = outcome.result().session_id
            child = self._children.get(session_id)
            if child is not None:
                child.actor.tell(Terminate("its Idempotency-Key could not be stored"))
            for waiter in pending.waiters:
                settle(waiter, error=_as_store_error(error))

        return answer

    def _replayed(self, response: JsonDict, spec: NewSession) -> SessionCreated:
        """The stored answer to a create, with a fresh client token (none is stored)."""
        record = SessionRecord(
            session_id=response["session_id"],
            room_name=response["room_name"],
            user_identity=spec.user_identity,
            user_name=spec.user_name,
            metadata=spec.metadata,
        )
        token = mint_client_token(self._deps, record)
        return SessionCreated(**{**response, "access_token": token})

    @staticmethod
    def _check_same_body(key: str, known: str, given: str) -> None:
        if known != given:
            raise _different_body(key)

    def _spawn_session(self, spec: NewSession, reply: asyncio.Future[SessionCreated]) -> None:
        if self._pools and self._take_from_pool(spec, reply):
            return
        session_id = str(uuid.uuid4())
        room_name = spec.room_name or f"room-{session_id}"
        if room_name in self._rooms:
            raise InvalidRequest(f"Room name {room_name} is in use by another session")
        chosen = self._choose_services(spec.required_services, spec.user_identity)
        for record in chosen.values():
            self._registry.acquire(record.service_id, session_id)
        session = SessionRecord(
            session_id=session_id,
            room_name=room_name,
            user_identity=spec.user_identity,
            user_name=spec.user_name,
            metadata=spec.metadata,
            services={
                **{
                    requirement: ServiceSlot(
                        requirement, record.service_id, record.endpoint, record.service_type
                    )
                    for requirement, record in chosen.items()
                },
                # An agent's slot: its requirement is its id; LiveKit picks the worker.
                **{
                    requirement: ServiceSlot(requirement, requirement, endpoint="")
                    for requirement in dict.fromkeys(spec.required_services or ())
                    if requirement.startswith(AGENT_PREFIX)
                },
            },
            owner=spec.owner,
        )
        self._run_actor(session, Start(spec.options, reply))
        self.sessions_created += 1
        log.debug(
            "session created",
            extra={"session_id": session_id, "room_name": room_name, "services": len(chosen)},
        )

    def _run_actor(
        self, session: SessionRecord, first: SessionMessage, actor: SessionActor | None = None
    ) -> None:
        session_id = session.session_id
        actor = actor or SessionActor(session, self._deps, self._publish)
        task = asyncio.create_task(actor.run(), name=f"session-{session_id}")
        task.add_done_callback(lambda done: self.tell(ActorExited(session_id, done)))
        self._children[session_id] = _Child(actor, task)
        self._rooms[session.room_name] = session_id
        user = session.user_identity
        self._live_per_user[user] = self._live_per_user.get(user, 0) + 1
        actor.tell(first)

    def _choose_services(
        self, required: list[str] | None, user_identity: str
    ) -> dict[str, ServiceRecord]:
        """Pick an instance for each requirement, or refuse the whole session (nothing is
        reserved unless everything can be). An instance whose id is the user's identity is
        never chosen: in LiveKit one identity joining kicks the other out of the room."""
        if required is None:
            return {
                record.service_id: record
                for record in self._registry.defaults()
                if record.service_id != user_identity
            }
        if user_identity in required:
            raise InvalidRequest(
                f"user_identity: {user_identity} is also a required service's identity"
            )
        if AGENT_PREFIX in required:
            raise InvalidRequest("agent: needs an agent name (agent:NAME)")
        # "agent:NAME" is LiveKit's business (a dispatch): nothing to choose here.
        required = [r for r in required if not r.startswith(AGENT_PREFIX)]
        unknown = [
            r for r in required if not r.startswith("type:") and self._registry.find(r) is None
        ]
        if unknown:
            raise InvalidRequest(f"Required services not registered: {', '.join(unknown)}")
        chosen: dict[str, ServiceRecord] = {}
        for requirement in dict.fromkeys(required):
            taken = {record.service_id for record in chosen.values()} | {user_identity}
            record = self._registry.choose(requirement, exclude=taken)
            if record.service_id in taken:
                raise InvalidRequest(f"{record.service_id} is required twice")
            chosen[requirement] = record
        return chosen

    # warm pools (`session_manager.pools`): the keeper's book is `_pools`; this loop acts on it

    def pool_views(self) -> list[JsonDict]:
        """Every warm pool, its members and counters (for GET /api/v1/pools; read-only)."""
        views = []
        now = time.monotonic()
        for pool in self._pools.pools.values():
            members = []
            for session_id, member in pool.members.items():
                child = self._children.get(session_id)
                record = child.actor.record if child else None
                members.append(
                    {
                        "session_id": session_id,
                        "status": record.status.value if record else "Terminated",
                        "age_s": round(now - member.started, 3),
                        "service_ids": [
                            slot.service_id for slot in (record.services if record else {}).values()
                        ],
                    }
                )
            ready = self.pool_ready(pool)
            views.append(pool_view(pool, ready, members, self._pools.retry_in(pool)))
        return views

    def pool_ready(self, pool: Pool) -> int:
        """How many of a pool's members could be handed out now."""
        return sum(1 for sid in pool.members if self._member_usable(sid, None))

    @property
    def pools(self) -> WarmPools:
        return self._pools

    async def _ask_to_tend_pools(self) -> None:
        self.tell(TendPools())

    def _member_usable(self, session_id: str, user_identity: str | None) -> bool:
        """A member may be handed out: Ready with every service joined, and each of its
        instances still registered, not Unhealthy, not draining (nor the user's identity)."""
        child = self._children.get(session_id)
        actor = child.actor if child is not None else None
        if not isinstance(actor, PoolMemberActor) or not actor.ready_to_hand_out:
            return False
        for slot in actor.record.services.values():
            service = self._registry.find(slot.service_id)
            if (
                service is None
                or service.draining
                or service.status is ServiceStatus.UNHEALTHY
                or slot.service_id == user_identity
            ):
                return False
        return True

    def _pool_serves(self, spec: NewSession | None) -> bool:
        pool = self._pools.match(spec.required_services, spec.room_name) if spec else None
        return pool is not None and any(
            self._member_usable(sid, spec.user_identity) for sid in pool.members if spec
        )

    def _take_from_pool(self, spec: NewSession, reply: asyncio.Future[SessionCreated]) -> bool:
        """Serve a create with a Ready member of the pool its requirements match: True when
        one was handed out (the answer comes from it), False to dispatch as usual (a miss, or
        no pool for these requirements)."""
        pool = self._pools.match(spec.required_services, spec.room_name)
        if pool is None:
            return False
        user = spec.user_identity
        member_id = self._pools.take(pool, lambda sid: self._member_usable(sid, user))
        if member_id is None:
            log.debug("warm pool miss", extra={"pool": pool.name})
            self._events.append(EventType.POOL_MISS, data={"pool": pool.name})
            self._fill_pools()
            return False
        actor = self._children[member_id].actor
        self._count_user(NO_USER, -1)
        self._count_user(user, 1)
        claimed: asyncio.Future[SessionCreated] = asyncio.get_running_loop().create_future()
        then = self._claim_failed(spec, reply, actor, pool)

        def answer(done: asyncio.Future[SessionCreated]) -> None:
            error = None if done.cancelled() else done.exception()
            if not done.cancelled() and error is None:
                settle(reply, done.result())  # at once, not behind the inbox
                hit = {"pool": pool.name}
                self._events.append(EventType.POOL_HIT, session_id=member_id, data=hit)
            elif self._closed or self._failure is not None:
                settle(reply, error=error or ShuttingDown("the session manager is shutting down"))
            else:
                self.tell(IoFinished(done, then))

        claimed.add_done_callback(answer)
        actor.tell(Claim(user, spec.user_name, spec.metadata, spec.owner, claimed))
        self.sessions_created += 1
        self._fill_pools()
        return True

    def _claim_failed(
        self,
        spec: NewSession,
        reply: asyncio.Future[SessionCreated],
        actor: SessionActor,
        pool: Pool,
    ) -> Callable[[asyncio.Future[SessionCreated]], None]:
        def fall_back(done: asyncio.Future[SessionCreated]) -> None:
            error = done.exception()
            if actor.record.user_identity != spec.user_identity:
                # The member never took the user on (it stopped being Ready first): it ends
                # as a member, and the user's session is dispatched as usual.
                self._count_user(spec.user_identity, -1)
                self._count_user(NO_USER, 1)
                self.sessions_created -= 1
                running = actor.session_id in self._children
                self._pools.not_taken(pool, actor.session_id, running=running)
                actor.tell(Terminate("warm pool member not Ready when taken"))
                log.info("warm pool member not Ready when taken; dispatching")
                try:
                    self._check_can_create(spec)
                    self._spawn_session(spec, reply)
                except ManagerError as exc:
                    settle(reply, error=exc)
                return
            settle(reply, error=error)  # it had taken the user on, and then failed

        return fall_back

    def _count_user(self, user: str, change: int) -> None:
        left = self._live_per_user.get(user, 0) + change
        if left > 0:
            self._live_per_user[user] = left
        else:
            self._live_per_user.pop(user, None)

    def _tend_pools(self) -> None:
        """End members idle past max_idle, and those that can serve no one now (an instance
        unhealthy, draining or deregistered: its InstanceLost may still be on its way), then
        start the fills that are due."""
        for session_id in self._pools.expired():
            child = self._children.get(session_id)
            if child is not None:
                child.actor.tell(Terminate("warm pool member idle past max_idle"))
        for pool in self._pools.pools.values():
            for session_id in list(pool.members):
                child = self._children.get(session_id)
                if child is None or not isinstance(child.actor, PoolMemberActor):
                    continue
                if child.actor.ready_to_hand_out:
                    if self._member_usable(session_id, None):
                        self._pools.filled(pool)
                    elif self._pools.drop(session_id):
                        child.actor.tell(Terminate("warm pool member's service cannot serve"))
        self._fill_pools()

    def _fill_pools(self) -> None:
        """Start a member for each place missing in a pool, within max_live_sessions."""
        if not self._accepting or self._closed or self._board.problem(LIVEKIT) is not None:
            return
        room = self._max_live_sessions - len(self._children)
        for pool in self._pools.fills_due(max(room, 0)):
            if not self._spawn_member(pool):
                self._pools.refused(pool)

    def _spawn_member(self, pool: Pool) -> bool:
        try:
            chosen = self._choose_services(list(pool.setting.services), NO_USER)
        except ManagerError as exc:
            log.debug("warm pool not filled", extra={"pool": pool.name, "reason": exc.message})
            return False
        session_id = str(uuid.uuid4())
        for record in chosen.values():
            self._registry.acquire(record.service_id, session_id)
        session = SessionRecord(
            session_id=session_id,
            room_name=f"room-{session_id}",
            user_identity=NO_USER,
            user_name=None,
            metadata={},
            services={
                requirement: ServiceSlot(
                    requirement, record.service_id, record.endpoint, record.service_type
                )
                for requirement, record in chosen.items()
            },
        )
        actor = PoolMemberActor(
            session, self._deps, self._publish, pool=pool.name, max_idle=pool.setting.max_idle
        )
        filled: asyncio.Future[SessionCreated] = asyncio.get_running_loop().create_future()
        # Ready or not, the member's end is what counts (`_pool_member_ended`): nothing to do.
        filled.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._run_actor(session, Start(CreateOptions(wait_until_ready=True), filled), actor)
        self._pools.added(pool, session_id)
        self._events.append(EventType.POOL_REFILL, session_id=session_id, data={"pool": pool.name})
        return True

    def _pool_member_ended(self, session_id: str, actor: PoolMemberActor) -> None:
        ended = self._pools.ended(session_id, was_ready=actor.record.ready_at is not None)
        if ended is None:
            return  # handed to a user: a session like any other now
        pool, why = ended
        level = logging.INFO if why in ("expired", "shutdown") else logging.WARNING
        detail = actor.record.reason
        log.log(
            level,
            "warm pool member ended",
            extra={"pool": pool.name, "session_id": session_id, "why": why, "reason": detail},
        )
        self._events.append(
            EventType.POOL_MEMBER_ENDED,
            session_id=session_id,
            data={"pool": pool.name, "why": why, "reason": detail},
        )
        self.tell(TendPools())  # refilled once this one's place is free

    def _publish(self, view: JsonDict) -> None:
        """Called by session actors after each change: the only writer of a session's view."""
        self._views[view["session_id"]] = view
        self._store.save_session(view)

    def _route(self, event: RoomEvent) -> None:
        if event.event_id:
            if event.event_id in self._seen_webhooks:
                log.debug("webhook delivered twice; acted on once", extra={"kind": event.kind})
                return
            self._seen_webhooks[event.event_id] = None
            if len(self._seen_webhooks) > SEEN_WEBHOOKS:
                self._seen_webhooks.popitem(last=False)
        session_id = self._rooms.get(event.room_name)
        child = self._children.get(session_id) if session_id else None
        if child is None and self._cluster is not None:
            self._offload(self._cluster.share_webhook(event))  # its owner may be elsewhere
            return
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
        if (
            child is not None
            and self._cluster is not None
            and child.actor.record.status is SessionStatus.TERMINATED
        ):
            services = [slot.service_id for slot in child.actor.record.services.values()]
            self._offload(self._cluster.session_ended(session_id, services))
        if child is not None and isinstance(child.actor, PoolMemberActor):
            self._pool_member_ended(session_id, child.actor)
        if child is not None:
            self._rooms.pop(child.actor.record.room_name, None)
            self.sessions_ended += 0 if _unclaimed(child.actor) else 1
            user = child.actor.record.user_identity
            left = self._live_per_user.pop(user, 1) - 1
            if left > 0:
                self._live_per_user[user] = left
        self._views.pop(session_id, None)
        self._registry.release_session(session_id)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "session actor ended with an error",
                extra={"session_id": session_id},
                exc_info=task.exception(),
            )

    def _refuse(self, message: SupervisorMessage) -> None:
        if self._failure is not None:
            error: ManagerError = Unhealthy(f"the session manager cannot serve: {self._failure}")
        else:
            error = ShuttingDown("the session manager is shutting down")
        settle(getattr(message, "reply", None), error=error)

    def _refuse_leftovers(self) -> None:
        while not self._inbox.empty():
            self._refuse(self._inbox.get_nowait())
        for pending in self._pending_creates.values():
            for waiter in pending.waiters:
                settle(waiter, error=ShuttingDown("the session manager is shutting down"))
        self._pending_creates.clear()


def _unclaimed(actor: SessionActor) -> bool:
    """A warm pool's member no user has taken yet."""
    return isinstance(actor, PoolMemberActor) and actor.waiting_for_user


def _answer_from(
    outcome: asyncio.Future[SessionCreated], waiter: asyncio.Future[SessionCreated]
) -> None:
    error = outcome.exception()
    settle(waiter, None if error else outcome.result(), error)


def _secret_answer(record: ServiceRecord) -> JsonDict:
    """The answer of a registration or a rotation: its secret as it is now (the one time it is
    handed out), apart from the view, which never holds it."""
    return {"service_id": record.service_id, "signing_secret": record.signing_secret}


def _check_session_owner(session_id: str, owner: str | None, access: Access) -> None:
    """A session created with another API key does not exist for this caller: 404."""
    if not access.may_use(owner):
        raise NotFound(f"Session {session_id} not found")


def _check_service_owner(record: ServiceRecord, access: Access) -> None:
    """A registration made with another API key may be read and changed only by an admin."""
    if not access.may_use(record.owner):
        raise Forbidden(f"Microservice {record.service_id} was registered with another API key")


def _different_body(key: str) -> Conflict:
    return Conflict(f"Idempotency-Key {key} was used with a different request body")


def _as_store_error(error: BaseException | None) -> ManagerError:
    if isinstance(error, ManagerError):
        return error
    return StoreUnavailable("the store could not be read or written")
