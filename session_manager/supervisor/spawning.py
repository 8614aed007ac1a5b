"""A new session, from the create to its actor: whether it may be created now (the limits on
sessions are checked in the supervisor's loop), which instance serves each requirement, and the
session actor started for it.

Past `max_live_sessions` a create is AtCapacity, past `max_sessions_per_user` TooManyRequests.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable

from session_manager.commands import NewSession
from session_manager.errors import (
    AtCapacity,
    InvalidRequest,
    LiveKitUnavailable,
    ShuttingDown,
    StoreUnavailable,
    TooManyRequests,
)
from session_manager.health_board import CLUSTER, LIVEKIT, STORE, HealthBoard
from session_manager.registry import Registry, ServiceRecord
from session_manager.session.messages import SessionCreated, Start
from session_manager.session.record import AGENT_PREFIX, ServiceSlot, SessionRecord
from session_manager.store.base import Store
from session_manager.supervisor.children import Children

log = logging.getLogger("session_manager.supervisor")  # the supervisor's one logger

# Retry-After (seconds) of a create refused by max_live_sessions or max_sessions_per_user, and
# of a registration refused by max_services: sessions end and services leave in that time scale.
LIMIT_RETRY_AFTER = 10


class Spawner:
    """Admits new sessions and starts their actors into the supervisor's children; runs on the
    supervisor's loop (it reserves registry capacity, and adds children, from there only)."""

    def __init__(
        self,
        children: Children,
        registry: Registry,
        store: Store,
        board: HealthBoard,
        *,
        accepting: Callable[[], bool],
        pool_serves: Callable[[NewSession | None], bool],
        max_live_sessions: int,
        max_sessions_per_user: int | None,
    ) -> None:
        self._children = children
        self._registry = registry
        self._store = store
        self._board = board
        self._accepting = accepting
        self._pool_serves = pool_serves
        self._max_live_sessions = max_live_sessions
        self._max_sessions_per_user = max_sessions_per_user

    def check_can_create(self, spec: NewSession | None = None) -> None:
        if not self._accepting():
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
            and self._children.live_count(spec.user_identity) >= per_user
        ):
            raise TooManyRequests(
                f"user_identity: has its most live sessions ({per_user})",
                retry_after=LIMIT_RETRY_AFTER,
            )

    def spawn(self, spec: NewSession, reply: asyncio.Future[SessionCreated]) -> None:
        """A new session actor for `spec`, its instances reserved (no warm pool's member)."""
        session_id = str(uuid.uuid4())
        room_name = spec.room_name or f"room-{session_id}"
        if self._children.room_in_use(room_name):
            raise InvalidRequest(f"Room name {room_name} is in use by another session")
        chosen = choose_services(self._registry, spec.required_services, spec.user_identity)
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
        self._children.run(session, Start(spec.options, reply))
        self._children.created += 1
        log.debug(
            "session created",
            extra={"session_id": session_id, "room_name": room_name, "services": len(chosen)},
        )


def choose_services(
    registry: Registry, required: list[str] | None, user_identity: str
) -> dict[str, ServiceRecord]:
    """Pick an instance for each requirement, or refuse the whole session (nothing is
    reserved unless everything can be). An instance whose id is the user's identity is
    never chosen: in LiveKit one identity joining kicks the other out of the room."""
    if required is None:
        return {
            record.service_id: record
            for record in registry.defaults()
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
    unknown = [r for r in required if not r.startswith("type:") and registry.find(r) is None]
    if unknown:
        raise InvalidRequest(f"Required services not registered: {', '.join(unknown)}")
    chosen: dict[str, ServiceRecord] = {}
    for requirement in dict.fromkeys(required):
        taken = {record.service_id for record in chosen.values()} | {user_identity}
        record = registry.choose(requirement, exclude=taken)
        if record.service_id in taken:
            raise InvalidRequest(f"{record.service_id} is required twice")
        chosen[requirement] = record
    return chosen
