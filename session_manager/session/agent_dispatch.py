"""LiveKit Agents dispatch for a session's `agent:NAME` slots: LiveKit is asked to send a
livekit-agents worker of that name to the room (its job's metadata is what a join-room carries
about the session, as JSON), and the dispatch is deleted when the slot no longer wants it
(LiveKit then ends the job and the agent leaves). LiveKit accepts a dispatch with no worker of
that name connected, so a missing agent is known only when the join deadline passes."""

from __future__ import annotations

import logging
from collections.abc import Callable

import orjson

from session_manager.clock import utc_now
from session_manager.dispatch import service_metadata
from session_manager.errors import ManagerError
from session_manager.livekit.gateway import LiveKitGateway
from session_manager.session.messages import AgentDispatchFinished, SessionMessage
from session_manager.session.record import ServiceSlot, SessionRecord
from session_manager.session.states import ServiceState

log = logging.getLogger(__name__)


class AgentDispatcher:
    """Makes and deletes one session room's agent dispatches; owns no task and no state.

    The actor runs `create` and `delete` as its own tasks; the outcome of a `create` comes back
    to its inbox through `post` as an `AgentDispatchFinished`."""

    def __init__(
        self,
        gateway: LiveKitGateway,
        session_id: str,
        room_name: str,
        post: Callable[[SessionMessage], None],
    ) -> None:
        self._gateway = gateway
        self._session_id = session_id
        self._room_name = room_name
        self._post = post

    async def create(self, requirement: str, agent_name: str, metadata: str) -> None:
        try:
            dispatch_id = await self._gateway.create_dispatch(self._room_name, agent_name, metadata)
        except ManagerError as exc:
            self._post(AgentDispatchFinished(requirement, None, exc.message))
        else:
            self._post(AgentDispatchFinished(requirement, dispatch_id))

    async def delete(self, dispatch_id: str) -> None:
        try:
            await self._gateway.delete_dispatch(dispatch_id, self._room_name)
        except ManagerError as exc:
            log.info(
                "agent dispatch could not be deleted",
                extra={
                    "session_id": self._session_id,
                    "dispatch_id": dispatch_id,
                    "error": exc.message,
                },
            )


def job_metadata(record: SessionRecord) -> str:
    """The metadata of the job LiveKit gives the agent: the session, as a join-room has it."""
    return orjson.dumps(
        {
            "session_id": record.session_id,
            "room_name": record.room_name,
            "session_metadata": service_metadata(record.metadata),
            "user_identity": record.user_identity,
            "user_name": record.user_name,
        }
    ).decode()


def take_outcome(slot: ServiceSlot, message: AgentDispatchFinished, session_id: str) -> bool:
    """Write a create_dispatch's outcome into the agent's slot; whether the dispatch is out."""
    slot.attempts += 1
    slot.answered_at = utc_now()
    extra = {"session_id": session_id, "requirement": message.requirement}
    if message.dispatch_id is not None:
        slot.dispatch_id = message.dispatch_id
        if slot.state is ServiceState.PENDING:
            slot.state = ServiceState.DISPATCHED
        log.debug("agent dispatched", extra={**extra, "dispatch_id": message.dispatch_id})
        return True
    slot.state, slot.error = ServiceState.FAILED, message.error
    log.warning("agent dispatch failed", extra={**extra, "error": message.error})
    return False


def missing_agents(record: SessionRecord) -> list[str]:
    """The names of the session's agents not in the room."""
    return [
        slot.agent_name
        for slot in record.services.values()
        if slot.agent_name is not None and slot.state is not ServiceState.JOINED
    ]
