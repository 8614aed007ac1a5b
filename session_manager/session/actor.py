"""The session actor owns its loop and is the only code that changes one session.

It takes one message at a time from its inbox (create, LiveKit webhooks, dispatch results,
deadlines, terminate) and runs the handler that `states.TABLE` names for (status, message);
it changes its record through `_set_status`, and publishes the new view.
It owns its dispatch tasks and its timers: all of them are cancelled, and the tasks awaited,
before the actor ends. Whatever way it ends (done, crashed, cancelled) the session ends
Terminated with a reason, and every caller still waiting gets an answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import suppress
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import orjson

from session_manager.clock import utc_now
from session_manager.dispatch import JoinRoomRequest, service_metadata
from session_manager.errors import (
    Conflict,
    InvalidRequest,
    ManagerError,
    MicroserviceUnavailable,
    NoCapacity,
    NotFound,
    SessionGone,
    ShuttingDown,
    Timeout,
)
from session_manager.events import EventType
from session_manager.livekit.tokens import KIND_AGENT
from session_manager.livekit.webhooks import (
    ROLE_AGENT,
    ROLE_ATTRIBUTE,
    ROLE_CLIENT,
    ROLE_SERVICE,
    SESSION_ATTRIBUTE,
    RoomEvent,
)
from session_manager.logs import TRACE
from session_manager.registry import ServiceRecord
from session_manager.session.deps import (
    SessionDeps,
    duration_limit,
    mint_client_token,
    room_metadata,
    room_timeouts,
    token_ttl,
)
from session_manager.session.messages import (
    AddService,
    Adopt,
    AgentDispatchFinished,
    Claim,
    ClientGraceExpired,
    ClientJoinDeadlinePassed,
    CreateOptions,
    Detach,
    DispatchFinished,
    DurationLimitReached,
    FailoverCause,
    InstanceLost,
    JoinDeadlinePassed,
    RemoveService,
    RoomEventArrived,
    SessionCreated,
    SessionMessage,
    Start,
    Terminate,
    WaitDeadlinePassed,
    settle,
)
from session_manager.session.record import (
    AGENT_PREFIX,
    Failover,
    JsonDict,
    ServiceSlot,
    SessionRecord,
)
from session_manager.session.states import (
    ENDING,
    TABLE,
    IllegalTransition,
    Rule,
    ServiceState,
    SessionStatus,
    check_transition,
)
from session_manager.supervision import cancel_and_wait

log = logging.getLogger(__name__)

S = SessionStatus
JOIN_TIMEOUT_MESSAGE = "Timeout waiting for microservices to join"
# The timers a session's view stores the deadlines of (by these names), so that a restarted
# manager adopting the session fires them when they were due. WaitDeadlinePassed is not among
# them: it only matters to a creator still waiting on the process that ended.
STORED_TIMERS: dict[type, str] = {
    DurationLimitReached: "duration_limit",
    JoinDeadlinePassed: "services_join",
    ClientJoinDeadlinePassed: "client_join",
    ClientGraceExpired: "client_reconnect",
}
TIMER_BY_NAME = {name: timer for timer, name in STORED_TIMERS.items()}
SHUT_DOWN_BEFORE_ANSWER = "session manager shut down before the session was answered"


class SessionActor:
    def __init__(
        self, record: SessionRecord, deps: SessionDeps, publish: Callable[[JsonDict], None]
    ) -> None:
        self.record = record
        self._deps = deps
        self._publish_view = publish
        self._inbox: asyncio.Queue[SessionMessage] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._timers: dict[type, asyncio.TimerHandle] = {}
        self._create_reply: asyncio.Future[SessionCreated] | None = None
        self._options = CreateOptions()
        self._client_token = ""
        self._token_ttl = token_ttl(deps, record.metadata)
        # requirement -> the instance its join-room call in flight went to, and that call
        self._dispatching: dict[str, tuple[str, asyncio.Task[None]]] = {}
        self._rule: Rule | None = None  # the table's rule of the message being handled
        self._closed = False
        self._detaching = False  # the manager shuts down keeping this session (Detach)
        self._detached = False
        self._relinquished = False  # another process owns it now: write nothing more

    @property
    def session_id(self) -> str:
        return self.record.session_id

    def tell(self, message: SessionMessage) -> None:
        if self._closed:
            self._answer_late(message)
            return
        self._inbox.put_nowait(message)

    def detach(self) -> None:
        """The manager shuts down and keeps its sessions: stop after the messages already in
        the inbox, leaving the session live for the next process (which adopts it)."""
        self._detaching = True
        self.tell(Detach())

    def relinquish(self) -> None:
        """Another process of the cluster owns the session now: stop at once, end nothing,
        and publish no view (the owner's are the ones that count)."""
        self._relinquished = self._detaching = True
        self.tell(Detach())

    def _answer_late(self, message: SessionMessage) -> None:
        """A message that arrived after the end: a terminate is already done (answer it with
        the final view); anything else that wants an answer is told the session is gone, or,
        for a session kept for the next process, that this one is shutting down."""
        reply = getattr(message, "reply", None)
        if self._detached:
            settle(reply, error=ShuttingDown("the session manager is shutting down"))
        elif isinstance(message, Terminate):
            settle(reply, self.record.view())
        else:
            settle(reply, error=SessionGone(f"session {self.session_id} has ended"))

    # the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            if self.record.status is S.CREATING:  # not a session adopted from a past process
                self._emit(
                    EventType.SESSION_CREATED,
                    room_name=self.record.room_name,
                    user_identity=self.record.user_identity,
                    user_name=self.record.user_name,
                    metadata=self.record.metadata,
                    required_services=list(self.record.services),
                )
                self._publish()
            while self.record.status is not S.TERMINATED and not self._detached:
                message = await self._inbox.get()
                await self._handle(message)
                self._publish()
        except asyncio.CancelledError:
            stopping = ShuttingDown("the session manager is shutting down")
            if self._detaching:  # kept for the next process: left as it is
                self._detached = True
                settle(self._create_reply, error=stopping)
            else:
                await self._close_after("manager shutting down", stopping)
            raise
        except Exception as exc:
            log.exception("session actor crashed", extra=self._log_extra())
            reason = f"internal error: {type(exc).__name__}: {exc}"
            await self._close_after(reason, ManagerError(f"session ended: {reason}"))
        finally:
            self._closed = True
            await self._stop_children()
            self._refuse_leftovers()

    async def _handle(self, message: SessionMessage) -> None:
        rule = TABLE[type(message).__name__]
        if self.record.status not in rule.when:
            self._not_now(message)
            return
        self._rule = rule
        try:
            await getattr(self, rule.handler)(message)
        finally:
            self._rule = None

    def _not_now(self, message: SessionMessage) -> None:
        """A message its rule does not take in this status: a caller is told why; anything
        else (a timer that fired as it was cancelled, a late webhook) is logged and dropped."""
        reply = getattr(message, "reply", None)
        status = self.record.status.value
        if reply is not None:
            settle(reply, error=Conflict(f"Session is {status}; it cannot do that now"))
        else:
            log.debug(
                "message not taken in this status",
                extra=self._log_extra(kind=type(message).__name__, status=status),
            )

    # timers and requests ---------------------------------------------------------------------

    async def _on_join_deadline(self, _: JoinDeadlinePassed) -> None:
        await self._terminate(self._join_timeout_reason(), Timeout(JOIN_TIMEOUT_MESSAGE))

    async def _on_wait_deadline(self, _: WaitDeadlinePassed) -> None:
        if self._options.wait_until_ready and self._create_reply is not None:
            await self._terminate(self._join_timeout_reason(), Timeout(JOIN_TIMEOUT_MESSAGE))

    def _join_timeout_reason(self) -> str:
        """The timeout's reason; when agents are missing, it names them: LiveKit accepts a
        dispatch with no worker of that name connected, so their absence is known only now."""
        missing = [
            slot.agent_name
            for slot in self.record.services.values()
            if slot.agent_name is not None and slot.state is not ServiceState.JOINED
        ]
        if not missing:
            return JOIN_TIMEOUT_MESSAGE
        return f"{JOIN_TIMEOUT_MESSAGE}: no agent worker {', '.join(missing)} joined"

    async def _on_duration_limit(self, _: DurationLimitReached) -> None:
        limit = duration_limit(self.record.metadata)
        await self._terminate(f"duration limit of {limit:g} s reached")

    async def _on_client_join_deadline(self, _: ClientJoinDeadlinePassed) -> None:
        if self.record.client_joined_at is None:
            await self._terminate(
                f"client did not join within {self._deps.client_join_timeout:g} s"
            )

    async def _on_client_grace_expired(self, _: ClientGraceExpired) -> None:
        if not self.record.client_present:
            await self._terminate(
                f"client left and did not return within {self._deps.client_reconnect_grace:g} s"
            )

    async def _on_add_service(self, message: AddService) -> None:
        try:
            self._add_service(message.requirement)
        except ManagerError as exc:  # the caller's mistake, not the session's
            settle(message.reply, error=exc)
        else:
            settle(message.reply, self.record.view())

    async def _on_remove_service(self, message: RemoveService) -> None:
        try:
            self._remove_service(message.service_id)
        except ManagerError as exc:
            settle(message.reply, error=exc)
        else:
            settle(message.reply, self.record.view())

    async def _on_terminate(self, message: Terminate) -> None:
        await self._terminate(message.reason)
        settle(message.reply, self.record.view())

    async def _on_claim(self, message: Claim) -> None:
        """Only a warm pool's member (`session.pool_member`) can be handed to a user."""
        settle(message.reply, error=Conflict("this session is not a warm pool's member"))

    async def _detach(self, _: Detach) -> None:
        if self._create_reply is not None and not self._relinquished:
            # Its creator has no answer yet, so no user has its token: nobody would miss it,
            # and the retry of the create makes a new one.
            stopping = ShuttingDown("the session manager is shutting down")
            await self._terminate(SHUT_DOWN_BEFORE_ANSWER, stopping)
            return
        self._detached = True
        settle(self._create_reply, error=ShuttingDown("the session moved to another process"))
        self._create_reply = None
        log.debug("session left to another manager process", extra=self._log_extra())

    # adoption --------------------------------------------------------------------------------

    async def _adopt(self, message: Adopt) -> None:
        """Take over a session a previous process left live: its timers fire when they were
        due, and what happened in its room meanwhile (joins, leaves) counts now."""
        self._restore_timers()
        self._emit(
            EventType.SESSION_ADOPTED,
            status=self.record.status.value,
            room_checked=message.participants is not None,
        )
        log.info("session adopted", extra=self._log_extra(status=self.record.status.value))
        if message.participants is not None:
            await self._catch_up(message.participants)

    def _restore_timers(self) -> None:
        record, now = self.record, utc_now()
        deadlines = dict(record.deadlines)
        limit = duration_limit(record.metadata)
        if limit is not None and "duration_limit" not in deadlines:  # stored before deadlines
            deadlines["duration_limit"] = record.created_at + timedelta(seconds=limit)
        for name, due in deadlines.items():
            timer = TIMER_BY_NAME.get(name)
            if timer is not None:
                self._start_timer(timer, max(0.0, (due - now).total_seconds()), due=due)
        if record.status is S.WAITING_FOR_SERVICES and JoinDeadlinePassed not in self._timers:
            self._start_timer(JoinDeadlinePassed, self._deps.join_timeout)

    async def _catch_up(self, participants: tuple[RoomEvent, ...]) -> None:
        """Compare the room as LiveKit has it now with the record, as if the webhooks missed
        while no process owned the session had arrived."""
        record = self.record
        present = {event.identity: event for event in participants if event.identity}
        user = present.get(record.user_identity)
        client_here = user is not None and self._role_of(user) == ROLE_CLIENT
        if client_here and record.client_present:
            assert user is not None
            record.client_sid = user.participant_sid or None
            self._cancel_timer(ClientJoinDeadlinePassed)
            self._cancel_timer(ClientGraceExpired)
        elif client_here:
            assert user is not None
            self._on_client(user, joined=True)
        elif record.client_present:
            self._on_client(self._left(record.user_identity, ROLE_CLIENT), joined=False)
        for slot in list(record.services.values()):
            if slot.agent_name is not None:  # its identity is LiveKit's choice: by its attributes
                here = next((e for e in participants if self._agent_slot(e) is slot), None)
            else:
                here = present.get(slot.service_id)
                if here is not None and self._role_of(here) != ROLE_SERVICE:
                    here = None
            if here is not None:
                if slot.state is ServiceState.JOINED:
                    slot.participant_sid = here.participant_sid or None
                else:
                    await self._on_service(slot, here, joined=True)
            elif slot.state is ServiceState.JOINED:
                await self._on_service(slot, self._left(slot.service_id, ROLE_SERVICE), False)
            elif slot.agent_name is not None and slot.dispatch_id is not None:
                pass  # LiveKit keeps the dispatch it accepted: its agent may still come
            else:
                # Its join-room call may have been lost with the previous process: ask again
                # (a service already joining answers "already in room", which counts as yes).
                self._dispatch(slot)
            if record.status in ENDING:
                return
        for event in participants:
            identity = event.identity or ""
            if identity != record.user_identity and record.slot_of(identity) is None:
                self._on_stranger(event, joined=True)
        self._advance()

    def _left(self, identity: str, role: str) -> RoomEvent:
        return RoomEvent(
            kind="participant_left", room_name=self.record.room_name, identity=identity, role=role
        )

    # creation ------------------------------------------------------------------------------

    async def _start(self, message: Start) -> None:
        self._create_reply = message.reply
        self._options = message.options
        record = self.record
        metadata = room_metadata(self._deps.deployment, record)
        try:
            # Durable before its room exists: a crash at any instant leaves no room that no
            # stored session claims.
            await self._deps.persist(record)
        except ManagerError as exc:
            await self._terminate(f"session could not be stored: {exc.message}", exc)
            return
        try:
            empty_timeout, departure_timeout = room_timeouts(self._deps)
            await self._deps.gateway.create_room(
                record.room_name,
                metadata=metadata,
                empty_timeout=empty_timeout,
                departure_timeout=departure_timeout,
            )
        except ManagerError as exc:
            await self._terminate(f"LiveKit room could not be created: {exc.message}", exc)
            return
        if self.record.status is not S.CREATING:  # terminated while we waited on LiveKit
            return

        limit = duration_limit(record.metadata)
        if limit is not None:
            self._start_timer(DurationLimitReached, limit)
        self._start_timer(ClientJoinDeadlinePassed, self._deps.client_join_timeout)
        self._client_token = mint_client_token(self._deps, record)
        if not record.services:
            self._set_status(S.READY)
            self._answer_creator()
            return

        self._set_status(S.WAITING_FOR_SERVICES)
        join_deadline = self._deps.join_timeout
        if self._options.wait_until_ready and self._options.wait_timeout is not None:
            self._start_timer(WaitDeadlinePassed, self._options.wait_timeout)
            # A caller who asked to wait longer than join_timeout is given that long.
            join_deadline = max(join_deadline, self._options.wait_timeout)
        self._start_timer(JoinDeadlinePassed, join_deadline)
        for slot in record.services.values():
            self._dispatch(slot)

    def _dispatch(self, slot: ServiceSlot) -> None:
        in_flight = self._dispatching.get(slot.requirement)
        if in_flight is not None and in_flight[0] == slot.service_id:
            return  # never two join-room calls for one instance in one session
        if slot.agent_name is not None:
            self._dispatch_agent(slot, slot.agent_name)
            return
        record = self.record
        # Recognised in webhooks by these attributes; shown as an agent to LiveKit's clients.
        token = self._deps.gateway.mint_token(
            identity=slot.service_id,
            room_name=record.room_name,
            ttl=self._token_ttl,
            attributes={ROLE_ATTRIBUTE: ROLE_SERVICE, SESSION_ATTRIBUTE: record.session_id},
            kind=KIND_AGENT,
        )
        request = JoinRoomRequest(
            session_id=record.session_id,
            room_name=record.room_name,
            service_identity=slot.service_id,
            access_token=token,
            livekit_url=self._deps.gateway.endpoint.public_url,
            session_metadata=service_metadata(record.metadata),
            user_identity=record.user_identity,
            user_name=record.user_name,
        )
        slot.dispatched_at = utc_now()
        log.debug("dispatching service", extra=self._log_extra(service_id=slot.service_id))
        self._emit(
            EventType.MICROSERVICE_DISPATCHED,
            service_id=slot.service_id,
            requirement=slot.requirement,
            endpoint=slot.endpoint,
            redispatches=slot.redispatches,
            **self._failover_under_way(slot),
        )
        task = self._spawn(self._join_room(slot.requirement, slot.endpoint, request))
        self._dispatching[slot.requirement] = (slot.service_id, task)

    @staticmethod
    def _failover_under_way(slot: ServiceSlot) -> dict[str, Any]:
        """For a redispatch: why the slot moved, from where, and how long finding out took."""
        failover = slot.failover
        if failover is None or failover.replaced_at is not None:
            return {}
        return {
            "cause": failover.cause,
            "from_service_id": failover.from_service_id,
            "detect_ms": failover.detect_ms,
        }

    def _dispatch_agent(self, slot: ServiceSlot, agent_name: str) -> None:
        """Ask LiveKit to dispatch a livekit-agents worker named `agent_name` to the room. Its
        job's metadata is what a join-room carries about the session, as JSON."""
        record = self.record
        metadata = orjson.dumps(
            {
                "session_id": record.session_id,
                "room_name": record.room_name,
                "session_metadata": service_metadata(record.metadata),
                "user_identity": record.user_identity,
                "user_name": record.user_name,
            }
        ).decode()
        slot.dispatched_at = utc_now()
        log.debug("dispatching agent", extra=self._log_extra(agent_name=agent_name))
        self._emit(
            EventType.MICROSERVICE_DISPATCHED,
            service_id=slot.service_id,
            requirement=slot.requirement,
            agent_name=agent_name,
            redispatches=slot.redispatches,
            **self._failover_under_way(slot),
        )
        task = self._spawn(self._create_dispatch(slot.requirement, agent_name, metadata))
        self._dispatching[slot.requirement] = (slot.service_id, task)

    async def _create_dispatch(self, requirement: str, agent_name: str, metadata: str) -> None:
        gateway = self._deps.gateway
        try:
            dispatch_id = await gateway.create_dispatch(self.record.room_name, agent_name, metadata)
        except ManagerError as exc:
            self.tell(AgentDispatchFinished(requirement, None, exc.message))
        else:
            self.tell(AgentDispatchFinished(requirement, dispatch_id))

    async def _on_agent_dispatch_finished(self, message: AgentDispatchFinished) -> None:
        requirement = message.requirement
        slot = self.record.services.get(requirement)
        self._dispatching.pop(requirement, None)
        if slot is None or slot.agent_name is None:  # removed while LiveKit was asked
            if message.dispatch_id is not None:
                self._spawn(self._delete_dispatch(message.dispatch_id))
            return
        slot.attempts += 1
        slot.answered_at = utc_now()
        if message.dispatch_id is not None:
            slot.dispatch_id = message.dispatch_id
            if slot.state is ServiceState.PENDING:
                slot.state = ServiceState.DISPATCHED
            log.debug(
                "agent dispatched",
                extra=self._log_extra(requirement=requirement, dispatch_id=message.dispatch_id),
            )
        else:
            slot.state, slot.error = ServiceState.FAILED, message.error
            log.warning(
                "agent dispatch failed",
                extra=self._log_extra(requirement=requirement, error=message.error),
            )
            self._emit(
                EventType.MICROSERVICE_DISPATCH_FAILED,
                service_id=slot.service_id,
                requirement=requirement,
                error=message.error,
                declined=False,
                attempts=1,
            )
            await self._replace(slot, message.error or "dispatch failed")
        self._answer_once_dispatched()

    async def _delete_dispatch(self, dispatch_id: str) -> None:
        try:
            await self._deps.gateway.delete_dispatch(dispatch_id, self.record.room_name)
        except ManagerError as exc:
            log.info(
                "agent dispatch could not be deleted",
                extra=self._log_extra(dispatch_id=dispatch_id, error=exc.message),
            )

    def _stop_dispatch(self, requirement: str) -> None:
        """The slot's instance was replaced or removed: its join-room call still out is of no
        use any more (if that instance joins anyway, it is removed from the room)."""
        in_flight = self._dispatching.pop(requirement, None)
        if in_flight is not None:
            in_flight[1].cancel()  # owned by _tasks: awaited when the actor stops

    async def _join_room(self, requirement: str, endpoint: str, request: JoinRoomRequest) -> None:
        outcome = await self._deps.microservices.join_room(endpoint, request)
        self.tell(DispatchFinished(requirement, request.service_identity, outcome))

    async def _on_dispatch_finished(self, message: DispatchFinished) -> None:
        requirement, service_id, outcome = message.requirement, message.service_id, message.outcome
        slot = self.record.services.get(requirement)
        if slot is None or slot.service_id != service_id:
            # The slot was removed, or moved to another instance, while this call was out.
            return
        in_flight = self._dispatching.get(requirement)
        if in_flight is not None and in_flight[0] == service_id:
            del self._dispatching[requirement]
        slot.attempts += outcome.attempts
        slot.answered_at = utc_now()
        if outcome.ok:
            if slot.state is ServiceState.PENDING:
                slot.state = ServiceState.DISPATCHED
            log.debug(
                "service dispatched",
                extra=self._log_extra(service_id=slot.service_id, elapsed_ms=outcome.elapsed_ms),
            )
        else:
            slot.state = ServiceState.FAILED
            slot.error = outcome.error
            log.warning(
                "service dispatch failed",
                extra=self._log_extra(
                    service_id=slot.service_id, error=outcome.error, declined=outcome.declined
                ),
            )
            self._emit(
                EventType.MICROSERVICE_DISPATCH_FAILED,
                service_id=slot.service_id,
                requirement=requirement,
                error=outcome.error,
                declined=outcome.declined,
                attempts=outcome.attempts,
            )
            if outcome.declined:
                slot.declined_by.append(slot.service_id)
            await self._replace(slot, outcome.error or "dispatch failed", declined=outcome.declined)
        self._answer_once_dispatched()

    def _answer_once_dispatched(self) -> None:
        """A creator who did not ask to wait is answered once every join-room call is over."""
        if not self._dispatching and not self._options.wait_until_ready:
            self._answer_creator()

    def _answer_creator(self) -> None:
        reply, self._create_reply = self._create_reply, None
        record = self.record
        settle(
            reply,
            SessionCreated(
                session_id=record.session_id,
                room_name=record.room_name,
                access_token=self._client_token,
                livekit_url=self._deps.gateway.endpoint.public_url,
                status=record.status.value,
            ),
        )

    # failover --------------------------------------------------------------------------------

    async def _replace(
        self,
        slot: ServiceSlot,
        reason: str,
        *,
        declined: bool = False,
        cause: FailoverCause = FailoverCause.DISPATCH_FAILED,
    ) -> None:
        """A slot lost its instance (dispatch failed or declined, or it left the room): dispatch
        again — the same instance once, then another of the same type — or end the session."""
        if self.record.status in (S.TERMINATING, S.TERMINATED):
            return
        self._note_failover(slot, cause)
        if slot.agent_name is not None:
            await self._redispatch_agent(slot, reason)
            return
        failed = slot.service_id
        registry = self._deps.registry
        in_use = {s.service_id for s in self.record.services.values() if s is not slot}
        same = registry.find(failed)
        if declined:
            # A decline is an answer, not a fault: go straight to another instance, no back-off,
            # and do not count it against max_redispatch.
            chosen = registry.alternative(failed, exclude=self._excluded(slot, in_use))
        elif slot.redispatches >= self._deps.max_redispatch:
            chosen = None
            reason = f"{reason} (gave up after {slot.redispatches} redispatches)"
        else:
            # The same instance keeps the capacity this session already holds on it.
            if not slot.retried_in_place and same is not None and same.accepting:
                chosen, slot.retried_in_place = same, True
            else:
                chosen = registry.alternative(failed, exclude=self._excluded(slot, in_use))
                slot.retried_in_place = False
            if chosen is not None:
                slot.redispatches += 1
        if chosen is None:
            message = f"microservice {slot.requirement} could not join: {reason}"
            # Every instance saying no is a capacity problem, not a broken service.
            error = NoCapacity(message) if declined else MicroserviceUnavailable(message)
            await self._terminate(message, error)
            return
        log.info(
            "redispatching service",
            extra=self._log_extra(requirement=slot.requirement, old=failed, new=chosen.service_id),
        )
        self._fill(slot, chosen)

    async def _redispatch_agent(self, slot: ServiceSlot, reason: str) -> None:
        """An agent's slot lost its agent (or its dispatch failed): a new dispatch for the same
        name, which LiveKit hands to any connected worker of it, or the end of the session."""
        if slot.redispatches >= self._deps.max_redispatch:
            message = (
                f"microservice {slot.requirement} could not join: {reason} "
                f"(gave up after {slot.redispatches} redispatches)"
            )
            await self._terminate(message, MicroserviceUnavailable(message))
            return
        slot.redispatches += 1
        if slot.dispatch_id is not None:  # its job is over: the old dispatch goes too
            self._spawn(self._delete_dispatch(slot.dispatch_id))
        log.info("redispatching agent", extra=self._log_extra(requirement=slot.requirement))
        self._stop_dispatch(slot.requirement)
        slot.assign(slot.service_id, "", None)
        self._wait_for(slot)

    def _fill(self, slot: ServiceSlot, chosen: ServiceRecord) -> None:
        """Put `chosen` in the slot and dispatch it; the session waits for it to join."""
        if chosen.service_id != slot.service_id:
            self._stop_dispatch(slot.requirement)
            if slot.service_id:  # an empty id: a new slot, nothing to give back
                self._deps.registry.release(slot.service_id, self.session_id)
            self._deps.registry.acquire(chosen.service_id, self.session_id)
        slot.assign(chosen.service_id, chosen.endpoint, chosen.service_type)
        self._wait_for(slot)

    def _wait_for(self, slot: ServiceSlot) -> None:
        """Dispatch the slot's (new) occupant; the session waits for it to join."""
        self.record.services[slot.requirement] = slot
        if self.record.status in (S.READY, S.ACTIVE):
            self._set_status(S.WAITING_FOR_SERVICES)
        if JoinDeadlinePassed not in self._timers:
            self._start_timer(JoinDeadlinePassed, self._deps.join_timeout)
        self._dispatch(slot)

    def _add_service(self, requirement: str) -> None:
        record = self.record
        if record.status not in (S.WAITING_FOR_SERVICES, S.READY, S.ACTIVE):
            raise Conflict(
                f"Session is {record.status.value}; services can be added only while it runs"
            )
        if requirement in record.services or record.slot_of(requirement) is not None:
            raise Conflict(f"{requirement} is already part of this session")
        in_use = {slot.service_id for slot in record.services.values()}
        if requirement == record.user_identity:
            raise Conflict(f"{requirement} is the user's identity in this session")
        if requirement.startswith(AGENT_PREFIX):
            if requirement == AGENT_PREFIX:
                raise InvalidRequest("agent: needs an agent name (agent:NAME)")
            self._wait_for(ServiceSlot(requirement, service_id=requirement, endpoint=""))
            return
        chosen = self._deps.registry.choose(requirement, exclude={*in_use, record.user_identity})
        if chosen.service_id in in_use:
            raise Conflict(f"{chosen.service_id} is already part of this session")
        self._fill(ServiceSlot(requirement, service_id="", endpoint=""), chosen)

    def _remove_service(self, service_id: str) -> None:
        record = self.record
        slot = record.services.get(service_id) or record.slot_of(service_id)
        if slot is None:
            raise NotFound(f"{service_id} is not part of session {self.session_id}")
        del record.services[slot.requirement]
        self._stop_dispatch(slot.requirement)
        self._deps.registry.release(slot.service_id, self.session_id)
        self._spawn(self._leave_room(slot))
        self._advance()
        self._answer_once_dispatched()

    async def _leave_room(self, slot: ServiceSlot) -> None:
        """Send the slot's occupant away: leave-room to a service; an agent's dispatch is
        deleted (LiveKit ends its job and the agent leaves)."""
        if slot.agent_name is not None:
            if slot.dispatch_id is not None:
                await self._delete_dispatch(slot.dispatch_id)
            return
        error = await self._deps.microservices.leave_room(
            slot.endpoint, self.session_id, self.record.room_name, service_id=slot.service_id
        )
        if error is not None:
            log.info(
                "leave-room failed", extra=self._log_extra(service_id=slot.service_id, error=error)
            )

    # LiveKit -------------------------------------------------------------------------------

    async def _on_room_event(self, message: RoomEventArrived) -> None:
        event = message.event
        log.log(
            TRACE, "room event", extra=self._log_extra(kind=event.kind, identity=event.identity)
        )
        if event.kind == "room_finished":
            await self._terminate("LiveKit room finished")
            return
        if event.identity is None or event.kind not in ("participant_joined", "participant_left"):
            return
        joined = event.kind == "participant_joined"
        role = self._role_of(event)
        if role == ROLE_CLIENT:
            if not self._on_client(event, joined):
                return
        elif role in (ROLE_SERVICE, ROLE_AGENT):
            slot = (
                self.record.slot_of(event.identity)
                if role == ROLE_SERVICE
                else self._agent_slot(event)
            )
            assert slot is not None  # _role_of checked it
            if not await self._on_service(slot, event, joined):
                return
        else:
            self._on_stranger(event, joined)
            return
        log.info(
            "participant joined" if joined else "participant left",
            extra=self._log_extra(identity=event.identity, role=role),
        )
        self._advance()

    @staticmethod
    def _same_connection(current_sid: str | None, event: RoomEvent) -> bool:
        return bool(current_sid and event.participant_sid == current_sid)

    @staticmethod
    def _is_stale_leave(current_sid: str | None, event: RoomEvent) -> bool:
        """A participant_left for an earlier connection of this identity (it has reconnected
        since, under a new participant sid): it says nothing about the one in the room now."""
        return bool(current_sid and event.participant_sid and event.participant_sid != current_sid)

    def _on_client(self, event: RoomEvent, joined: bool) -> bool:
        """Returns whether the event changed anything."""
        record = self.record
        if joined and record.client_present and self._same_connection(record.client_sid, event):
            return False  # already known (seen when the session was adopted, say)
        if not joined and self._is_stale_leave(record.client_sid, event):
            log.debug("stale participant_left ignored", extra=self._log_extra(role=ROLE_CLIENT))
            return False
        self._emit(
            EventType.CLIENT_JOINED if joined else EventType.CLIENT_LEFT,
            identity=record.user_identity,
        )
        record.client_present = joined
        if joined:
            record.client_sid = event.participant_sid or None
            record.client_joined_at = record.client_joined_at or utc_now()
            self._cancel_timer(ClientJoinDeadlinePassed)
            self._cancel_timer(ClientGraceExpired)
        else:
            record.client_left_at = utc_now()
            self._start_timer(ClientGraceExpired, self._deps.client_reconnect_grace)
        return True

    async def _on_service(self, slot: ServiceSlot, event: RoomEvent, joined: bool) -> bool:
        """Returns whether the event changed anything."""
        if joined and slot.state is ServiceState.JOINED:
            if self._same_connection(slot.participant_sid, event):
                return False  # already known (seen when the session was adopted, say)
        if joined:
            slot.state, slot.joined_at, slot.error = ServiceState.JOINED, utc_now(), None
            slot.participant_sid = event.participant_sid or None
            slot.retried_in_place = False
            self._emit(
                EventType.MICROSERVICE_JOINED,
                service_id=slot.service_id,
                requirement=slot.requirement,
                join_ms=slot.join_ms,
                **self._failover_over(slot),
            )
            return True
        # Only the connection that joined can leave: a leave while the slot waits for its
        # (re)dispatched instance to join is about an earlier connection, reported late.
        if slot.state is not ServiceState.JOINED or self._is_stale_leave(
            slot.participant_sid, event
        ):
            log.debug(
                "stale participant_left ignored", extra=self._log_extra(service_id=slot.service_id)
            )
            return False
        slot.state, slot.left_at = ServiceState.LEFT, utc_now()
        self._emit(
            EventType.MICROSERVICE_LEFT, service_id=slot.service_id, requirement=slot.requirement
        )
        # An instance that leaves while draining hands its session over: no failure.
        same = self._deps.registry.find(slot.service_id)
        draining = same is not None and same.draining
        cause = FailoverCause.DRAIN if draining else FailoverCause.LEFT_ROOM
        await self._replace(slot, "left the room", cause=cause)
        return True

    def _on_stranger(self, event: RoomEvent, joined: bool) -> None:
        """A participant that fills no slot. One holding a service token of this session is
        an instance that was replaced or removed and joined anyway: it is removed from the
        room, so two instances never serve one slot."""
        if (
            joined
            and event.identity is not None
            and event.role == ROLE_SERVICE
            and event.attributes.get(SESSION_ATTRIBUTE) == self.session_id
        ):
            log.info(
                "removing a service instance that no longer serves this session",
                extra=self._log_extra(identity=event.identity),
            )
            self._spawn(self._remove_participant(event.identity))
            return
        log.debug(
            "participant is not part of this session",
            extra=self._log_extra(identity=event.identity),
        )

    async def _remove_participant(self, identity: str) -> None:
        try:
            await self._deps.gateway.remove_participant(self.record.room_name, identity)
        except ManagerError as exc:
            log.info(
                "participant could not be removed",
                extra=self._log_extra(identity=identity, error=exc.message),
            )

    async def _on_instance_lost(self, message: InstanceLost) -> None:
        """An instance turned Unhealthy (its process was lost, or its checks failed): move its
        slot to another instance now, rather than wait the ~20 s LiveKit takes to declare a
        vanished participant gone, and have LiveKit drop its participant at once, so neither
        LiveKit nor the client keeps a ghost. With no other instance to go to, keep it:
        LiveKit's own verdict will follow."""
        service_id, reason = message.service_id, message.reason
        slot = self.record.slot_of(service_id)
        if slot is None:
            return
        in_use = {s.service_id for s in self.record.services.values()}
        chosen = self._deps.registry.alternative(service_id, exclude=self._excluded(slot, in_use))
        if chosen is None or slot.redispatches >= self._deps.max_redispatch:
            return
        log.info(
            "replacing a lost service",
            extra=self._log_extra(
                old=service_id, new=chosen.service_id, reason=reason, cause=message.cause.value
            ),
        )
        if message.cause is not FailoverCause.PROCESS_LOST:
            self._spawn(self._leave_room(replace(slot)))  # alive, maybe: asked to go, too
        # Its participant's later participant_left names an identity no slot holds any more
        # (or an earlier connection of one): it is ignored, never taken for the replacement.
        self._spawn(self._remove_participant(service_id))
        self._note_failover(
            slot, message.cause, detected_at=message.detected_at, gone_at=message.gone_at
        )
        slot.redispatches += 1
        slot.retried_in_place = False
        self._fill(slot, chosen)

    def _note_failover(
        self,
        slot: ServiceSlot,
        cause: FailoverCause,
        *,
        detected_at: datetime | None = None,
        gone_at: datetime | None = None,
    ) -> None:
        """Remember why and when the slot lost its instance. A slot still being refilled
        after an earlier loss keeps that one: its failover lasts until someone joins."""
        if slot.failover is not None and slot.failover.replaced_at is None:
            return
        slot.failover = Failover(
            cause.value, slot.service_id, detected_at=detected_at or utc_now(), gone_at=gone_at
        )

    def _failover_over(self, slot: ServiceSlot) -> dict[str, Any]:
        """The slot's new occupant joined: its failover is over. Its timings (for the join
        event) and the histogram's observation; nothing when no failover was under way."""
        failover = slot.failover
        if failover is None or failover.replaced_at is not None:
            return {}
        failover.replaced_at = slot.joined_at or utc_now()
        seconds = failover.failover_ms
        if seconds is not None:
            self._deps.on_failover(failover.cause, seconds / 1000)
        log.info(
            "service slot filled again",
            extra=self._log_extra(
                service_id=slot.service_id,
                cause=failover.cause,
                failover_ms=failover.failover_ms,
            ),
        )
        return {
            "cause": failover.cause,
            "from_service_id": failover.from_service_id,
            "detect_ms": failover.detect_ms,
            "replace_ms": failover.replace_ms,
            "failover_ms": failover.failover_ms,
        }

    def _excluded(self, slot: ServiceSlot, in_use: set[str]) -> set[str]:
        """Instances a slot must not move to: those in use, those that declined it, and one
        whose id is the user's identity (in LiveKit, one identity joining kicks the other)."""
        return {*in_use, *slot.declined_by, self.record.user_identity}

    def _role_of(self, event: RoomEvent) -> str | None:
        """Who a participant is, from the attributes we put in the token we minted for it."""
        identity = event.identity
        if event.attributes.get(SESSION_ATTRIBUTE) not in (None, self.session_id):
            return None
        slot = self.record.slot_of(identity) if identity is not None else None
        if event.role == ROLE_SERVICE and slot is not None and slot.agent_name is None:
            return ROLE_SERVICE
        if event.role == ROLE_CLIENT and identity == self.record.user_identity:
            return ROLE_CLIENT
        if self._agent_slot(event) is not None:
            return ROLE_AGENT
        return None

    def _agent_slot(self, event: RoomEvent) -> ServiceSlot | None:
        """The `agent:NAME` slot a livekit-agents participant fills: LiveKit's kind AGENT,
        none of our attributes, and the agent name the job's attributes carry (one slot per
        name in a session). A leave that lacks them is matched by its connection."""
        name = event.agent_name
        if name is not None:
            slot = self.record.services.get(AGENT_PREFIX + name)
            return slot if slot is not None and slot.agent_name == name else None
        if event.kind == "participant_left" and event.participant_sid:
            for slot in self.record.services.values():
                if slot.agent_name is not None and slot.participant_sid == event.participant_sid:
                    return slot
        return None

    def _advance(self) -> None:
        """Move forward as far as the facts allow: Ready when every service is in, then Active
        when the user is in too."""
        status = self.record.status
        if status is S.WAITING_FOR_SERVICES and self.record.all_services_joined:
            self._set_status(S.READY)
            if self._options.wait_until_ready:
                self._answer_creator()
        if self.record.status is S.READY and self.record.client_present:
            self._set_status(S.ACTIVE)

    # ending --------------------------------------------------------------------------------

    async def _terminate(self, reason: str, error: ManagerError | None = None) -> None:
        if self.record.status in (S.TERMINATING, S.TERMINATED):
            return
        self.record.reason = reason
        self._set_status(S.TERMINATING)
        self._publish()
        await self._stop_children()
        await self._send_services_away()
        try:
            await asyncio.wait_for(
                self._deps.gateway.delete_room(self.record.room_name), self._deps.teardown_timeout
            )
        except (ManagerError, TimeoutError) as exc:
            log.warning(
                "room could not be deleted", extra=self._log_extra(error=str(exc) or "timeout")
            )
        self._set_status(S.TERMINATED)
        settle(self._create_reply, error=error or SessionGone(f"session ended: {reason}"))
        self._create_reply = None

    async def _send_services_away(self) -> None:
        """leave-room to every service that may be in the room; best effort, bounded."""
        present = [
            slot
            for slot in self.record.services.values()
            if slot.state in (ServiceState.DISPATCHED, ServiceState.JOINED)
        ]
        if not present:
            return
        try:
            await asyncio.wait_for(
                asyncio.gather(*(self._leave_room(slot) for slot in present)),
                self._deps.teardown_timeout,
            )
        except TimeoutError:
            log.info("leave-room calls timed out", extra=self._log_extra())

    async def _close_after(self, reason: str, error: ManagerError) -> None:
        """Bring a session that lost its actor to Terminated; best effort, never raises."""
        try:
            await self._terminate(reason, error)
        except Exception:
            log.exception("session teardown failed", extra=self._log_extra())
        if self.record.status is not S.TERMINATED:
            # Whatever broke, the session must read ended: past the table, on purpose.
            self.record.reason = self.record.reason or reason
            with suppress(Exception):
                self._set_status(S.TERMINATED, forced=True)
            self.record.status = S.TERMINATED
        settle(self._create_reply, error=error)
        with suppress(Exception):
            self._publish()

    def _refuse_leftovers(self) -> None:
        while not self._inbox.empty():
            self._answer_late(self._inbox.get_nowait())

    # plumbing ------------------------------------------------------------------------------

    def _set_status(self, new: SessionStatus, *, forced: bool = False) -> None:
        """The one place a session's status changes: checked against the transitions and the
        rule being handled (unless `forced`, for an actor that is dying), then announced."""
        old = self.record.status
        if not forced:
            check_transition(old, new)
            if self._rule is not None and new not in self._rule.leads_to:
                raise IllegalTransition(old, new)
        now = utc_now()
        self.record.status = new
        self.record.updated_at = now
        if new is S.READY:
            if self.record.ready_at is None:
                self._deps.on_ready((now - self.record.created_at).total_seconds())
            self.record.ready_at = self.record.ready_at or now
            self._cancel_timer(JoinDeadlinePassed)
            self._cancel_timer(WaitDeadlinePassed)
        elif new is S.ACTIVE:
            self.record.active_at = self.record.active_at or now
        elif new is S.TERMINATED:
            self.record.terminated_at = now
        if new is S.TERMINATING:
            self.record.deadlines.clear()
        self._emit(
            EventType.SESSION_STATUS_CHANGED,
            old=old.value,
            new=new.value,
            reason=self.record.reason,
        )
        if new is S.READY:
            self._emit(EventType.SESSION_READY, ready_ms=self.record.ready_ms)
        elif new is S.TERMINATED:
            self._emit(EventType.SESSION_TERMINATED, reason=self.record.reason)
        level = logging.INFO if new in (S.READY, S.ACTIVE, S.TERMINATED) else logging.DEBUG
        extra = self._log_extra(old=old.value, new=new.value)
        if self.record.reason and new in (S.TERMINATING, S.TERMINATED):
            extra["reason"] = self.record.reason
        log.log(level, "session status changed", extra=extra)

    def _publish(self) -> None:
        if not self._relinquished:
            self._publish_view(self.record.view())

    def _emit(self, event: EventType, *, service_id: str | None = None, **data: Any) -> None:
        self._deps.events.append(
            event, session_id=self.session_id, service_id=service_id, data=data
        )

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _start_timer(self, message_type: type, delay: float, due: datetime | None = None) -> None:
        self._cancel_timer(message_type)
        loop = asyncio.get_running_loop()
        self._timers[message_type] = loop.call_later(delay, self._timer_fired, message_type)
        name = STORED_TIMERS.get(message_type)
        if name is not None:
            self.record.deadlines[name] = due or utc_now() + timedelta(seconds=delay)

    def _timer_fired(self, message_type: type) -> None:
        self._timers.pop(message_type, None)
        self.record.deadlines.pop(STORED_TIMERS.get(message_type, ""), None)
        self.tell(message_type())

    def _cancel_timer(self, message_type: type) -> None:
        handle = self._timers.pop(message_type, None)
        if handle is not None:
            handle.cancel()
        self.record.deadlines.pop(STORED_TIMERS.get(message_type, ""), None)

    async def _stop_children(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        self._dispatching.clear()
        await cancel_and_wait(list(self._tasks), self._deps.teardown_timeout)

    def _log_extra(self, **values: Any) -> dict[str, Any]:
        return {"session_id": self.session_id, **values}
