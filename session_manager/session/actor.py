"""The session actor owns its loop and is the only code that changes one session.

It takes one message at a time from its inbox (create, LiveKit webhooks, dispatch results,
deadlines, terminate) and runs the handler that `states.TABLE` names for (status, message);
it changes its record through `_set_status`, and publishes the new view.
It owns its dispatch tasks and its timers: all of them are cancelled, and the tasks awaited,
before the actor ends. Whatever way it ends (done, crashed, cancelled) the session ends
Terminated with a reason, and every caller still waiting gets an answer.

What it decides with lives beside it: who a participant is (`roles`), a slot's failover
timeline and next instance (`failover`), LiveKit Agents dispatch (`agent_dispatch`), its calls
to services and the room (`calls`), and its timers (`timers`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import suppress
from dataclasses import replace
from typing import Any

from session_manager.clock import utc_now
from session_manager.dispatch import JoinRoomRequest
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
from session_manager.livekit.webhooks import ROLE_AGENT, ROLE_CLIENT, ROLE_SERVICE, RoomEvent
from session_manager.logs import TRACE
from session_manager.registry import ServiceRecord
from session_manager.session import agent_dispatch, calls, failover, roles
from session_manager.session.agent_dispatch import AgentDispatcher
from session_manager.session.deps import (
    SessionDeps,
    duration_limit,
    mint_client_token,
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
from session_manager.session.record import AGENT_PREFIX, JsonDict, ServiceSlot, SessionRecord
from session_manager.session.states import (
    ENDING,
    TABLE,
    IllegalTransition,
    Rule,
    ServiceState,
    SessionStatus,
    check_transition,
)
from session_manager.session.timers import SessionTimers
from session_manager.supervision import cancel_and_wait

log = logging.getLogger(__name__)

S = SessionStatus
JOIN_TIMEOUT_MESSAGE = "Timeout waiting for microservices to join"
SHUT_DOWN_BEFORE_ANSWER = "session manager shut down before the session was answered"


class SessionActor:
    """Owns one session's loop and record: the only code that changes that session."""

    def __init__(
        self, record: SessionRecord, deps: SessionDeps, publish: Callable[[JsonDict], None]
    ) -> None:
        self.record = record
        self._deps = deps
        self._publish_view = publish
        self._inbox: asyncio.Queue[SessionMessage] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._timers = SessionTimers(record, self.tell)
        self._agents = AgentDispatcher(deps.gateway, record.session_id, record.room_name, self.tell)
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
        missing = agent_dispatch.missing_agents(self.record)
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
        self._timers.restore(self._deps.join_timeout)
        self._emit(
            EventType.SESSION_ADOPTED,
            status=self.record.status.value,
            room_checked=message.participants is not None,
        )
        log.info("session adopted", extra=self._log_extra(status=self.record.status.value))
        if message.participants is not None:
            await self._catch_up(message.participants)

    async def _catch_up(self, participants: tuple[RoomEvent, ...]) -> None:
        """Compare the room as LiveKit has it now with the record, as if the webhooks missed
        while no process owned the session had arrived."""
        record = self.record
        present = roles.by_identity(participants)
        user = present.get(record.user_identity)
        client_here = user is not None and roles.role_of(record, user) == ROLE_CLIENT
        if client_here and record.client_present:
            assert user is not None
            record.client_sid = user.participant_sid or None
            self._timers.cancel(ClientJoinDeadlinePassed)
            self._timers.cancel(ClientGraceExpired)
        elif client_here:
            assert user is not None
            self._on_client(user, joined=True)
        elif record.client_present:
            gone = roles.left(record.room_name, record.user_identity, ROLE_CLIENT)
            self._on_client(gone, joined=False)
        for slot in list(record.services.values()):
            here = roles.occupant(record, slot, participants, present)
            if here is not None:
                if slot.state is ServiceState.JOINED:
                    slot.participant_sid = here.participant_sid or None
                else:
                    await self._on_service(slot, here, joined=True)
            elif slot.state is ServiceState.JOINED:
                gone = roles.left(record.room_name, slot.service_id, ROLE_SERVICE)
                await self._on_service(slot, gone, False)
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

    # creation ------------------------------------------------------------------------------

    async def _start(self, message: Start) -> None:
        self._create_reply = message.reply
        self._options = message.options
        record = self.record
        try:
            # Durable before its room exists: a crash at any instant leaves no room that no
            # stored session claims.
            await self._deps.persist(record)
        except ManagerError as exc:
            await self._terminate(f"session could not be stored: {exc.message}", exc)
            return
        try:
            await calls.create_room(self._deps, record)
        except ManagerError as exc:
            await self._terminate(f"LiveKit room could not be created: {exc.message}", exc)
            return
        if self.record.status is not S.CREATING:  # terminated while we waited on LiveKit
            return

        limit = duration_limit(record.metadata)
        if limit is not None:
            self._timers.start(DurationLimitReached, limit)
        self._timers.start(ClientJoinDeadlinePassed, self._deps.client_join_timeout)
        self._client_token = mint_client_token(self._deps, record)
        if not record.services:
            self._set_status(S.READY)
            self._answer_creator()
            return

        self._set_status(S.WAITING_FOR_SERVICES)
        join_deadline = self._deps.join_timeout
        if self._options.wait_until_ready and self._options.wait_timeout is not None:
            self._timers.start(WaitDeadlinePassed, self._options.wait_timeout)
            # A caller who asked to wait longer than join_timeout is given that long.
            join_deadline = max(join_deadline, self._options.wait_timeout)
        self._timers.start(JoinDeadlinePassed, join_deadline)
        for slot in record.services.values():
            self._dispatch(slot)

    def _dispatch(self, slot: ServiceSlot) -> None:
        in_flight = self._dispatching.get(slot.requirement)
        if in_flight is not None and in_flight[0] == slot.service_id:
            return  # never two join-room calls for one instance in one session
        if slot.agent_name is not None:
            self._dispatch_agent(slot, slot.agent_name)
            return
        request = calls.join_request(self._deps.gateway, self.record, slot, self._token_ttl)
        slot.dispatched_at = utc_now()
        log.debug("dispatching service", extra=self._log_extra(service_id=slot.service_id))
        self._emit(
            EventType.MICROSERVICE_DISPATCHED,
            service_id=slot.service_id,
            requirement=slot.requirement,
            endpoint=slot.endpoint,
            redispatches=slot.redispatches,
            **failover.under_way(slot),
        )
        task = self._spawn(self._join_room(slot.requirement, slot.endpoint, request))
        self._dispatching[slot.requirement] = (slot.service_id, task)

    def _dispatch_agent(self, slot: ServiceSlot, agent_name: str) -> None:
        """Ask LiveKit to dispatch a livekit-agents worker named `agent_name` to the room."""
        metadata = agent_dispatch.job_metadata(self.record)
        slot.dispatched_at = utc_now()
        log.debug("dispatching agent", extra=self._log_extra(agent_name=agent_name))
        self._emit(
            EventType.MICROSERVICE_DISPATCHED,
            service_id=slot.service_id,
            requirement=slot.requirement,
            agent_name=agent_name,
            redispatches=slot.redispatches,
            **failover.under_way(slot),
        )
        task = self._spawn(self._agents.create(slot.requirement, agent_name, metadata))
        self._dispatching[slot.requirement] = (slot.service_id, task)

    async def _on_agent_dispatch_finished(self, message: AgentDispatchFinished) -> None:
        requirement = message.requirement
        slot = self.record.services.get(requirement)
        self._dispatching.pop(requirement, None)
        if slot is None or slot.agent_name is None:  # removed while LiveKit was asked
            if message.dispatch_id is not None:
                self._spawn(self._agents.delete(message.dispatch_id))
            return
        if not agent_dispatch.take_outcome(slot, message, self.session_id):
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
        calls.take_join_outcome(slot, outcome, self.session_id)
        if not outcome.ok:
            self._emit(
                EventType.MICROSERVICE_DISPATCH_FAILED,
                service_id=slot.service_id,
                requirement=requirement,
                error=outcome.error,
                declined=outcome.declined,
                attempts=outcome.attempts,
            )
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
        failover.note(slot, cause)
        if slot.agent_name is not None:
            await self._redispatch_agent(slot, reason)
            return
        failed = slot.service_id
        in_use = {s.service_id for s in self.record.services.values() if s is not slot}
        exclude = failover.excluded(slot, in_use, self.record.user_identity)
        chosen: ServiceRecord | None = None
        if not declined and slot.redispatches >= self._deps.max_redispatch:
            reason = f"{reason} (gave up after {slot.redispatches} redispatches)"
        else:
            chosen = failover.replacement(slot, self._deps.registry, exclude, declined=declined)
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
            self._spawn(self._agents.delete(slot.dispatch_id))
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
            self._timers.start(JoinDeadlinePassed, self._deps.join_timeout)
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
        await calls.leave_room(self._deps, self._agents, self.record, slot)

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
        role = roles.role_of(self.record, event)
        if role == ROLE_CLIENT:
            if not self._on_client(event, joined):
                return
        elif role in (ROLE_SERVICE, ROLE_AGENT):
            slot = roles.slot_of(self.record, role, event)
            assert slot is not None  # role_of checked it
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

    def _on_client(self, event: RoomEvent, joined: bool) -> bool:
        """Returns whether the event changed anything."""
        record = self.record
        if joined and record.client_present and roles.same_connection(record.client_sid, event):
            return False  # already known (seen when the session was adopted, say)
        if not joined and roles.is_stale_leave(record.client_sid, event):
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
            self._timers.cancel(ClientJoinDeadlinePassed)
            self._timers.cancel(ClientGraceExpired)
        else:
            record.client_left_at = utc_now()
            self._timers.start(ClientGraceExpired, self._deps.client_reconnect_grace)
        return True

    async def _on_service(self, slot: ServiceSlot, event: RoomEvent, joined: bool) -> bool:
        """Returns whether the event changed anything."""
        if joined and slot.state is ServiceState.JOINED:
            if roles.same_connection(slot.participant_sid, event):
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
                **failover.over(slot, self.session_id, self._deps.on_failover),
            )
            return True
        # Only the connection that joined can leave: a leave while the slot waits for its
        # (re)dispatched instance to join is about an earlier connection, reported late.
        if slot.state is not ServiceState.JOINED or roles.is_stale_leave(
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
        stray = joined and roles.is_stray_instance(self.session_id, event)
        if stray and event.identity is not None:
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
        await calls.remove_participant(self._deps.gateway, self.record, identity)

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
        exclude = failover.excluded(slot, in_use, self.record.user_identity)
        chosen = self._deps.registry.alternative(service_id, exclude=exclude)
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
        failover.note(slot, message.cause, detected_at=message.detected_at, gone_at=message.gone_at)
        slot.redispatches += 1
        slot.retried_in_place = False
        self._fill(slot, chosen)

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
        await calls.clear_room(self._deps, self._agents, self.record)
        self._set_status(S.TERMINATED)
        settle(self._create_reply, error=error or SessionGone(f"session ended: {reason}"))
        self._create_reply = None

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
            self._timers.cancel(JoinDeadlinePassed)
            self._timers.cancel(WaitDeadlinePassed)
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

    async def _stop_children(self) -> None:
        self._timers.cancel_all()
        self._dispatching.clear()
        await cancel_and_wait(list(self._tasks), self._deps.teardown_timeout)

    def _log_extra(self, **values: Any) -> dict[str, Any]:
        return {"session_id": self.session_id, **values}
