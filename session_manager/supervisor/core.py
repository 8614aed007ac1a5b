"""The supervisor actor owns its loop: it takes the front door's commands from one inbox, spawns a
session actor per session, routes LiveKit webhooks to the actor that owns the room, and reaps
actors that end. Everything that changes state happens in that loop, one message at a time;
`_handle` is its message table, and each concern is a collaborator (see the package's
docstring) called from there only.

Its loop never waits on I/O: that runs as tasks it owns (`offload`). If the loop itself dies,
every waiting caller is answered at once, /health turns 503 and `on_fatal` has the process exit
non-zero.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

from session_manager.clock import utc_now
from session_manager.cluster.node import ClusterNode
from session_manager.commands import (
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
from session_manager.errors import ManagerError, ShuttingDown, Unhealthy
from session_manager.events import EventLog
from session_manager.health_board import SUPERVISOR, HealthBoard
from session_manager.periodic import Periodic
from session_manager.pools import Pool, WarmPools, WarmPoolSetting
from session_manager.registry import Registry
from session_manager.registry.health import HealthResults
from session_manager.session.deps import SessionDeps
from session_manager.session.messages import Adopt, SessionCreated, Terminate, settle
from session_manager.session.pool_member import PoolMemberActor
from session_manager.session.record import JsonDict
from session_manager.session.states import SessionStatus
from session_manager.store.base import Store
from session_manager.supervision import cancel_and_wait, watch
from session_manager.supervisor.children import Children, unclaimed
from session_manager.supervisor.idempotency import IdempotentCreates
from session_manager.supervisor.offload import Offload
from session_manager.supervisor.pool_tending import POOL_TEND_INTERVAL, PoolTender
from session_manager.supervisor.registry_writer import RegistryWriter
from session_manager.supervisor.rooms import LiveKitRooms
from session_manager.supervisor.routing import SessionRouting
from session_manager.supervisor.spawning import Spawner
from session_manager.takeover import Adoption

log = logging.getLogger("session_manager.supervisor")  # the supervisor's one logger

T = TypeVar("T")
# A caller is never left waiting longer than this, whatever happens inside (the longest wait a
# caller can ask for, timeout_secs, is 3600 s).
ASK_TIMEOUT = 3700.0


class Supervisor:
    """Owns the supervisor's loop and inbox, its collaborators, and its lifecycle (start, drain,
    aclose); every change of state it makes is made in that loop."""

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
        self._keep_sessions_at_shutdown = keep_sessions_at_shutdown
        self._registry = registry
        self._store = store
        self._deps = deps
        self._board = board or HealthBoard()
        self._on_fatal = on_fatal
        self._inbox: asyncio.Queue[SupervisorMessage] = asyncio.Queue()
        self._accepting = True
        self._loop_task: asyncio.Task[None] | None = None
        self._room_sweeps = Periodic(
            "room-sweeper", self._ask_for_sweep, interval=room_sweep_interval, jitter=0.1
        )
        self._failure: str | None = None
        self._closed = False
        self._close_lock = asyncio.Lock()
        # The collaborators, each given the pieces of state it works on.
        self._offload = Offload(self.tell)
        self._children = Children(
            deps, store, lambda session_id, task: self.tell(ActorExited(session_id, task))
        )
        self._pool_tender = PoolTender(
            self._pools,
            self._children,
            registry,
            deps,
            events,
            self._board,
            self.tell,
            create=self._check_and_spawn,
            accepting=self._accepting_sessions,
            stopped=self._stopped,
            max_live_sessions=max_live_sessions,
        )
        self._spawner = Spawner(
            self._children,
            registry,
            store,
            self._board,
            accepting=self._accepting_sessions,
            pool_serves=self._pool_tender.serves,
            max_live_sessions=max_live_sessions,
            max_sessions_per_user=max_sessions_per_user,
        )
        self._idempotent = IdempotentCreates(
            store,
            deps,
            self._children,
            self._offload,
            self.tell,
            create=self._check_and_spawn,
            ttl=idempotency_ttl,
        )
        self._registry_writer = RegistryWriter(
            registry,
            store,
            events,
            self._children,
            self._offload,
            cluster,
            max_services=max_services,
            startup_timeout=startup_timeout,
        )
        self._rooms = LiveKitRooms(self._children, deps, self._offload, cluster)
        self._routing = SessionRouting(self._children, store, self._offload, self.tell, cluster)

    # the outside's interface -----------------------------------------------------------------

    def tell(self, message: SupervisorMessage) -> None:
        if self._stopped():
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
        return self._children.live_statuses()

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

    # counters for /metrics (read, and set by tests, from outside the loop)

    @property
    def sessions_created(self) -> int:
        return self._children.created

    @sessions_created.setter
    def sessions_created(self, value: int) -> None:
        self._children.created = value

    @property
    def sessions_ended(self) -> int:
        return self._children.ended

    @sessions_ended.setter
    def sessions_ended(self, value: int) -> None:
        self._children.ended = value

    # warm pools, read-only (`pool_tending` acts on them in the loop)

    @property
    def pools(self) -> WarmPools:
        return self._pools

    def pool_views(self) -> list[JsonDict]:
        """Every warm pool, its members and counters (for GET /api/v1/pools; read-only)."""
        return self._pool_tender.views()

    def pool_ready(self, pool: Pool) -> int:
        """How many of a pool's members could be handed out now."""
        return self._pool_tender.ready(pool)

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
            cluster.bus.run_command = self._routing.run_for_another_process
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
            self._children.run(record, Adopt(adoption.participants))

    async def _ask_for_sweep(self) -> None:
        self.tell(ReconcileRooms())

    async def _ask_to_tend_pools(self) -> None:
        self.tell(TendPools())

    def drain(self) -> None:
        """Refuse new sessions; the ones running go on."""
        self._accepting = False

    def _accepting_sessions(self) -> bool:
        """Neither drained nor closed: new sessions (and warm pool fills) may start."""
        return self._accepting and not self._closed

    def _stopped(self) -> bool:
        """Closed or failed: what is told now is refused at once, never queued."""
        return self._closed or self._failure is not None

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
                if self._keep_sessions_at_shutdown and not unclaimed(child.actor):
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
            await cancel_and_wait((self._loop_task, *self._offload.tasks))
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
        """The message table: each message to the collaborator that handles it."""
        match message:
            case CreateSession():
                self._create_session(message)
            case GetSession():
                self._routing.get_session(message)
            case ListSessions():
                self._routing.list_sessions(message)
            case DeleteSession():
                self._routing.delete_session(message)
            case AddSessionService():
                self._routing.add_service(message)
            case RemoveSessionService():
                self._routing.remove_service(message)
            case LiveKitEvent(event=event):
                self._rooms.webhook(event)
            case RemoteWebhook(event=event):
                self._rooms.remote_webhook(event)
            case SessionsLost(session_ids=session_ids):
                self._routing.sessions_lost(session_ids)
            case AdoptSessions(adoptions=adoptions):
                self._adopt(adoptions)
            case ClusterLoads(loads=loads):
                self._registry.apply_cluster_load(loads)
            case RegistryChanged(service_id=service_id, status=status):
                self._registry_writer.registry_changed(service_id, status)
            case ActorExited(session_id=session_id, task=task):
                self._reap(session_id, task)
            case HealthChecked(results=results):
                self._registry_writer.health_checked(results)
            case ProcessLost():
                self._registry_writer.process_lost(message)
            case LiveKitLost(reason=reason, rooms_lost=rooms_lost):
                self._rooms.livekit_lost(reason, rooms_lost)
            case TendPools():
                self._pool_tender.tend()
            case LiveKitBack() | ReconcileRooms():
                self._rooms.reconcile()
            case IoFinished(task=task, then=then):
                then(task)
            case (
                RegisterService()
                | UpdateService()
                | DrainService()
                | DeregisterService()
                | RotateServiceSecret()
                | GetService()
                | ListServices()
            ):
                self._registry_writer.handle(message)

    # sessions: created, reaped ---------------------------------------------------------------

    def _create_session(self, message: CreateSession) -> None:
        self._spawner.check_can_create(message.spec)
        key = message.idempotency_key
        if key is None:
            self._spawn_session(message.spec, message.reply)
            return
        self._idempotent.create(key, message)

    def _check_and_spawn(self, spec: NewSession, reply: asyncio.Future[SessionCreated]) -> None:
        self._spawner.check_can_create(spec)
        self._spawn_session(spec, reply)

    def _spawn_session(self, spec: NewSession, reply: asyncio.Future[SessionCreated]) -> None:
        """A warm pool's Ready member when one serves `spec`, else a new session actor."""
        if self._pools and self._pool_tender.take(spec, reply):
            return
        self._spawner.spawn(spec, reply)

    def _reap(self, session_id: str, task: asyncio.Task[None]) -> None:
        child = self._children.forget(session_id)
        if (
            child is not None
            and self._cluster is not None
            and child.actor.record.status is SessionStatus.TERMINATED
        ):
            services = [slot.service_id for slot in child.actor.record.services.values()]
            self._offload(self._cluster.session_ended(session_id, services))
        if child is not None and isinstance(child.actor, PoolMemberActor):
            self._pool_tender.member_ended(session_id, child.actor)
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
        self._idempotent.refuse_all()
