"""The calls a session makes to its HTTP microservices and its LiveKit room: the room's
creation, the join-room request (with the service's token) and its outcome, leave-room,
removing a participant, and the room's teardown when the session ends. Those made from the
actor's tasks are best effort: a failure is logged, never raised into the actor; the teardown
is bounded by `teardown_timeout`."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from session_manager.clock import utc_now
from session_manager.dispatch import DispatchOutcome, JoinRoomRequest, service_metadata
from session_manager.errors import ManagerError
from session_manager.livekit.gateway import LiveKitGateway
from session_manager.livekit.tokens import KIND_AGENT
from session_manager.livekit.webhooks import ROLE_ATTRIBUTE, ROLE_SERVICE, SESSION_ATTRIBUTE
from session_manager.session.agent_dispatch import AgentDispatcher
from session_manager.session.deps import SessionDeps, room_metadata, room_timeouts
from session_manager.session.record import ServiceSlot, SessionRecord
from session_manager.session.states import ServiceState

log = logging.getLogger(__name__)


async def create_room(deps: SessionDeps, record: SessionRecord) -> None:
    """The session's LiveKit room, its metadata naming the session and this deployment;
    raises the gateway's `ManagerError`."""
    empty_timeout, departure_timeout = room_timeouts(deps)
    await deps.gateway.create_room(
        record.room_name,
        metadata=room_metadata(deps.deployment, record),
        empty_timeout=empty_timeout,
        departure_timeout=departure_timeout,
    )


def join_request(
    gateway: LiveKitGateway, record: SessionRecord, slot: ServiceSlot, ttl: timedelta
) -> JoinRoomRequest:
    """The join-room request for the slot's instance, with its token for the room."""
    # Recognised in webhooks by these attributes; shown as an agent to LiveKit's clients.
    token = gateway.mint_token(
        identity=slot.service_id,
        room_name=record.room_name,
        ttl=ttl,
        attributes={ROLE_ATTRIBUTE: ROLE_SERVICE, SESSION_ATTRIBUTE: record.session_id},
        kind=KIND_AGENT,
    )
    return JoinRoomRequest(
        session_id=record.session_id,
        room_name=record.room_name,
        service_identity=slot.service_id,
        access_token=token,
        livekit_url=gateway.endpoint.public_url,
        session_metadata=service_metadata(record.metadata),
        user_identity=record.user_identity,
        user_name=record.user_name,
    )


def take_join_outcome(slot: ServiceSlot, outcome: DispatchOutcome, session_id: str) -> None:
    """Write a join-room call's outcome (with its retries) into the slot it was for."""
    slot.attempts += outcome.attempts
    slot.answered_at = utc_now()
    extra = {"session_id": session_id, "service_id": slot.service_id}
    if outcome.ok:
        if slot.state is ServiceState.PENDING:
            slot.state = ServiceState.DISPATCHED
        log.debug("service dispatched", extra={**extra, "elapsed_ms": outcome.elapsed_ms})
        return
    slot.state = ServiceState.FAILED
    slot.error = outcome.error
    log.warning(
        "service dispatch failed",
        extra={**extra, "error": outcome.error, "declined": outcome.declined},
    )
    if outcome.declined:
        slot.declined_by.append(slot.service_id)


async def leave_room(
    deps: SessionDeps, agents: AgentDispatcher, record: SessionRecord, slot: ServiceSlot
) -> None:
    """Send the slot's occupant away: leave-room to a service; an agent's dispatch is
    deleted (LiveKit ends its job and the agent leaves)."""
    if slot.agent_name is not None:
        if slot.dispatch_id is not None:
            await agents.delete(slot.dispatch_id)
        return
    error = await deps.microservices.leave_room(
        slot.endpoint, record.session_id, record.room_name, service_id=slot.service_id
    )
    if error is not None:
        log.info(
            "leave-room failed",
            extra={"session_id": record.session_id, "service_id": slot.service_id, "error": error},
        )


async def remove_participant(gateway: LiveKitGateway, record: SessionRecord, identity: str) -> None:
    try:
        await gateway.remove_participant(record.room_name, identity)
    except ManagerError as exc:
        log.info(
            "participant could not be removed",
            extra={"session_id": record.session_id, "identity": identity, "error": exc.message},
        )


async def clear_room(deps: SessionDeps, agents: AgentDispatcher, record: SessionRecord) -> None:
    """The end of a session's room: its services sent away, then the room deleted."""
    await _send_services_away(deps, agents, record)
    try:
        await asyncio.wait_for(deps.gateway.delete_room(record.room_name), deps.teardown_timeout)
    except (ManagerError, TimeoutError) as exc:
        log.warning(
            "room could not be deleted",
            extra={"session_id": record.session_id, "error": str(exc) or "timeout"},
        )


async def _send_services_away(
    deps: SessionDeps, agents: AgentDispatcher, record: SessionRecord
) -> None:
    """leave-room to every service that may be in the room; best effort, bounded."""
    present = [
        slot
        for slot in record.services.values()
        if slot.state in (ServiceState.DISPATCHED, ServiceState.JOINED)
    ]
    if not present:
        return
    try:
        await asyncio.wait_for(
            asyncio.gather(*(leave_room(deps, agents, record, slot) for slot in present)),
            deps.teardown_timeout,
        )
    except TimeoutError:
        log.info("leave-room calls timed out", extra={"session_id": record.session_id})
