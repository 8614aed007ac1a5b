"""A warm pool's member: a session actor whose room is created and whose services join before
any user asks for it (see `session_manager.pools`).

It owns its loop like any session actor, and is one until a user takes it. While it waits it
differs in what it leaves out: no user, no stored view, no session events, no client-join
deadline, no duration limit; and in one rule: a service it loses (left the room, declined,
unhealthy, its process lost) ends it rather than being replaced in place, so a member is
never handed out while a service is missing (the keeper starts a new one). `Claim` makes it
the user's session: their identity and metadata, their token for its room, the room's metadata,
written before the HTTP answer, `SessionCreated` and `SessionReady` emitted, and each service told
through a signed `POST {endpoint}/session-started`. From then on it is a session like any other.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from session_manager.clock import utc_now
from session_manager.dispatch import JoinRoomRequest, SessionStartedRequest, service_metadata
from session_manager.errors import Conflict, ManagerError
from session_manager.events import EventType
from session_manager.logs import TRACE
from session_manager.session.actor import SessionActor
from session_manager.session.deps import (
    SessionDeps,
    duration_limit,
    mint_client_token,
    room_metadata,
    room_timeouts,
    token_ttl,
)
from session_manager.session.messages import (
    Claim,
    ClientJoinDeadlinePassed,
    DurationLimitReached,
    InstanceLost,
    JoinDeadlinePassed,
    Start,
    settle,
)
from session_manager.session.record import JsonDict, ServiceSlot, SessionRecord
from session_manager.session.states import ServiceState, SessionStatus

log = logging.getLogger(__name__)

S = SessionStatus


def _not_observed(seconds: float) -> None:
    return None


class PoolMemberActor(SessionActor):
    """Owns one pooled room's session loop: a member until `Claim`, then a user's session."""

    def __init__(
        self,
        record: SessionRecord,
        deps: SessionDeps,
        publish: Callable[[JsonDict], None],
        *,
        pool: str,
        max_idle: float,
    ) -> None:
        # A member's fill is not a user's time to Ready: not observed until it is claimed.
        super().__init__(record, replace(deps, on_ready=_not_observed), publish)
        self._user_deps = deps
        self.pool = pool
        self._max_idle = max_idle
        self.waiting_for_user = True

    # what a member leaves out -----------------------------------------------------------------

    def _publish(self) -> None:
        if not self.waiting_for_user:
            super()._publish()

    def _emit(self, event: EventType, *, service_id: str | None = None, **data: Any) -> None:
        if self.waiting_for_user:
            log.log(TRACE, "pool member event", extra=self._log_extra(kind=event.value))
            return
        super()._emit(event, service_id=service_id, **data)

    async def _start(self, message: Start) -> None:
        """Create the room and dispatch the services, flagged `pooled`; nothing is stored and no
        client is waited for. The room outlives max_idle plus the user's join time."""
        self._create_reply = message.reply
        self._options = message.options
        record = self.record
        empty_timeout, departure_timeout = room_timeouts(self._deps)
        try:
            await self._deps.gateway.create_room(
                record.room_name,
                metadata=room_metadata(self._deps.deployment, record),
                empty_timeout=empty_timeout + math.ceil(self._max_idle),
                departure_timeout=departure_timeout,
            )
        except ManagerError as exc:
            await self._terminate(f"LiveKit room could not be created: {exc.message}", exc)
            return
        if self.record.status is not S.CREATING:  # ended while we waited on LiveKit
            return
        self._set_status(S.WAITING_FOR_SERVICES)
        self._timers.start(JoinDeadlinePassed, self._deps.join_timeout)
        for slot in record.services.values():
            self._dispatch(slot)

    async def _join_room(self, requirement: str, endpoint: str, request: JoinRoomRequest) -> None:
        if self.waiting_for_user:
            request = replace(request, pooled=True)
        await super()._join_room(requirement, endpoint, request)

    async def _replace(self, slot: ServiceSlot, reason: str, **how: Any) -> None:
        if self.waiting_for_user:
            await self._terminate(f"pool member lost {slot.requirement}: {reason}")
            return
        await super()._replace(slot, reason, **how)

    async def _on_instance_lost(self, message: InstanceLost) -> None:
        if self.waiting_for_user and self.record.slot_of(message.service_id) is not None:
            await self._terminate(f"pool member lost {message.service_id}: {message.reason}")
            return
        await super()._on_instance_lost(message)

    # handed to a user ---------------------------------------------------------------------------

    @property
    def ready_to_hand_out(self) -> bool:
        """Ready, every service joined, unclaimed: what the keeper may hand out."""
        record = self.record
        return (
            self.waiting_for_user
            and record.status is S.READY
            and all(slot.state is ServiceState.JOINED for slot in record.services.values())
        )

    async def _on_claim(self, message: Claim) -> None:
        if not self.ready_to_hand_out:
            settle(message.reply, error=Conflict("the pool member is not Ready"))
            return
        record = self.record
        record.user_identity, record.user_name = message.user_identity, message.user_name
        record.metadata, record.owner = message.metadata, message.owner
        now = utc_now()
        record.created_at = record.updated_at = record.ready_at = now
        record.pool = self.pool
        self._deps = self._user_deps
        self.waiting_for_user = False
        # Stored before its user has it: the front door writes the view it answers before the
        # HTTP answer leaves, as for every create (`api.routes`). Until then a crash leaves a
        # room no stored session claims, which the next process deletes, and no user had its
        # token. (No lease to take: pools are refused with several managers.)
        record.ready_at = utc_now()
        self._token_ttl = token_ttl(self._deps, record.metadata)
        limit = duration_limit(record.metadata)
        if limit is not None:
            self._timers.start(DurationLimitReached, limit)
        self._timers.start(ClientJoinDeadlinePassed, self._deps.client_join_timeout)
        self._client_token = mint_client_token(self._deps, record)
        self._emit(
            EventType.SESSION_CREATED,
            room_name=record.room_name,
            user_identity=record.user_identity,
            user_name=record.user_name,
            metadata=record.metadata,
            required_services=list(record.services),
            pool=self.pool,
        )
        self._deps.on_ready((record.ready_at - now).total_seconds())
        self._emit(EventType.SESSION_READY, ready_ms=record.ready_ms, pool=self.pool)
        log.info(
            "pool member handed to a user",
            extra=self._log_extra(pool=self.pool, ready_ms=record.ready_ms),
        )
        self._spawn(self._update_room_metadata())
        for slot in record.services.values():
            self._spawn(self._tell_session_started(slot))
        self._create_reply = message.reply
        self._answer_creator()

    async def _update_room_metadata(self) -> None:
        metadata = room_metadata(self._deps.deployment, self.record)
        try:
            await self._deps.gateway.update_room_metadata(self.record.room_name, metadata)
        except ManagerError as exc:
            log.info("room metadata not updated", extra=self._log_extra(error=exc.message))

    async def _tell_session_started(self, slot: ServiceSlot) -> None:
        record = self.record
        request = SessionStartedRequest(
            session_id=record.session_id,
            room_name=record.room_name,
            service_identity=slot.service_id,
            session_metadata=service_metadata(record.metadata),
            user_identity=record.user_identity,
            user_name=record.user_name,
            pool=self.pool,
        )
        error = await self._deps.microservices.session_started(slot.endpoint, request)
        if error is not None:
            log.info(
                "session-started failed",
                extra=self._log_extra(service_id=slot.service_id, error=error),
            )
