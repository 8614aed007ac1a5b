"""Warm pools (`session_manager.pools`) as the supervisor acts on them: the keeper's book is
`WarmPools`; this is what the supervisor's loop does with it. A create whose requirements match
a pool is served by one of its Ready members; the pools are tended (members idle past
max_idle, or whose services cannot serve, end) and filled, within max_live_sessions; a member
that ends makes room for the next fill.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

from session_manager.commands import IoFinished, NewSession, SupervisorMessage, TendPools
from session_manager.errors import ManagerError, ShuttingDown
from session_manager.events import EventLog, EventType
from session_manager.health_board import LIVEKIT, HealthBoard
from session_manager.pools import Pool, WarmPools, pool_view
from session_manager.registry import Registry
from session_manager.registry.registry import ServiceStatus
from session_manager.session.actor import SessionActor
from session_manager.session.deps import SessionDeps
from session_manager.session.messages import (
    Claim,
    CreateOptions,
    SessionCreated,
    Start,
    Terminate,
    settle,
)
from session_manager.session.pool_member import PoolMemberActor
from session_manager.session.record import JsonDict, ServiceSlot, SessionRecord
from session_manager.supervisor.children import Children
from session_manager.supervisor.spawning import choose_services

log = logging.getLogger("session_manager.supervisor")  # the supervisor's one logger

POOL_TEND_INTERVAL = 0.5  # seconds between looks at the warm pools (expiry, fills due)
NO_USER = ""  # a warm pool member's user_identity until it is handed out (never a user's)


class PoolTender:
    """Writes the warm pools' book (`WarmPools`): takes members, tends and fills the pools, sees
    members end; runs on the supervisor's loop, apart from the read-only views and a claim's
    answer (which settles its caller, or goes back through the inbox)."""

    def __init__(
        self,
        pools: WarmPools,
        children: Children,
        registry: Registry,
        deps: SessionDeps,
        events: EventLog,
        board: HealthBoard,
        tell: Callable[[SupervisorMessage], None],
        *,
        create: Callable[[NewSession, asyncio.Future[SessionCreated]], None],
        accepting: Callable[[], bool],
        stopped: Callable[[], bool],
        max_live_sessions: int,
    ) -> None:
        self._pools = pools
        self._children = children
        self._registry = registry
        self._deps = deps
        self._events = events
        self._board = board
        self._tell = tell
        self._create = create  # admit and spawn as usual, when a member cannot serve
        self._accepting = accepting
        self._stopped = stopped
        self._max_live_sessions = max_live_sessions

    def views(self) -> list[JsonDict]:
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
            ready = self.ready(pool)
            views.append(pool_view(pool, ready, members, self._pools.retry_in(pool)))
        return views

    def ready(self, pool: Pool) -> int:
        """How many of a pool's members could be handed out now."""
        return sum(1 for sid in pool.members if self._member_usable(sid, None))

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

    def serves(self, spec: NewSession | None) -> bool:
        pool = self._pools.match(spec.required_services, spec.room_name) if spec else None
        return pool is not None and any(
            self._member_usable(sid, spec.user_identity) for sid in pool.members if spec
        )

    def take(self, spec: NewSession, reply: asyncio.Future[SessionCreated]) -> bool:
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
            self.fill()
            return False
        actor = self._children[member_id].actor
        self._children.count_user(NO_USER, -1)
        self._children.count_user(user, 1)
        claimed: asyncio.Future[SessionCreated] = asyncio.get_running_loop().create_future()
        then = self._claim_failed(spec, reply, actor, pool)

        def answer(done: asyncio.Future[SessionCreated]) -> None:
            error = None if done.cancelled() else done.exception()
            if not done.cancelled() and error is None:
                settle(reply, done.result())  # at once, not behind the inbox
                hit = {"pool": pool.name}
                self._events.append(EventType.POOL_HIT, session_id=member_id, data=hit)
            elif self._stopped():
                settle(reply, error=error or ShuttingDown("the session manager is shutting down"))
            else:
                self._tell(IoFinished(done, then))

        claimed.add_done_callback(answer)
        actor.tell(Claim(user, spec.user_name, spec.metadata, spec.owner, claimed))
        self._children.created += 1
        # The refill waits for the next tend (at most POOL_TEND_INTERVAL): started now, its room
        # and dispatches would share the loop with this hit's answer and its write (a hit on
        # SQLite went from 19–22 ms to 14 ms at p50), and a fill takes far longer than the wait.
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
                self._children.count_user(spec.user_identity, -1)
                self._children.count_user(NO_USER, 1)
                self._children.created -= 1
                running = actor.session_id in self._children
                self._pools.not_taken(pool, actor.session_id, running=running)
                actor.tell(Terminate("warm pool member not Ready when taken"))
                log.info("warm pool member not Ready when taken; dispatching")
                try:
                    self._create(spec, reply)
                except ManagerError as exc:
                    settle(reply, error=exc)
                return
            settle(reply, error=error)  # it had taken the user on, and then failed

        return fall_back

    def tend(self) -> None:
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
        self.fill()

    def fill(self) -> None:
        """Start a member for each place missing in a pool, within max_live_sessions."""
        if not self._accepting() or self._board.problem(LIVEKIT) is not None:
            return
        room = self._max_live_sessions - len(self._children)
        for pool in self._pools.fills_due(max(room, 0)):
            if not self._spawn_member(pool):
                self._pools.refused(pool)

    def _spawn_member(self, pool: Pool) -> bool:
        try:
            chosen = choose_services(self._registry, list(pool.setting.services), NO_USER)
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
            session,
            self._deps,
            self._children.publish,
            pool=pool.name,
            max_idle=pool.setting.max_idle,
        )
        filled: asyncio.Future[SessionCreated] = asyncio.get_running_loop().create_future()
        # Ready or not, the member's end is what counts (`member_ended`): nothing to do.
        filled.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._children.run(session, Start(CreateOptions(wait_until_ready=True), filled), actor)
        self._pools.added(pool, session_id)
        self._events.append(EventType.POOL_REFILL, session_id=session_id, data={"pool": pool.name})
        return True

    def member_ended(self, session_id: str, actor: PoolMemberActor) -> None:
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
        self._tell(TendPools())  # refilled once this one's place is free
