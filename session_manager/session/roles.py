"""Who a participant of a session's room is: the user (client), one of its services, a
livekit-agents worker filling an `agent:NAME` slot, or a stranger; and whether a webhook about
them says something new. Pure functions over the session's record and a LiveKit `RoomEvent`."""

from __future__ import annotations

from collections.abc import Iterable

from session_manager.livekit.webhooks import (
    ROLE_AGENT,
    ROLE_CLIENT,
    ROLE_SERVICE,
    SESSION_ATTRIBUTE,
    RoomEvent,
)
from session_manager.session.record import AGENT_PREFIX, ServiceSlot, SessionRecord


def role_of(record: SessionRecord, event: RoomEvent) -> str | None:
    """Who a participant is, from the attributes we put in the token we minted for it."""
    identity = event.identity
    if event.attributes.get(SESSION_ATTRIBUTE) not in (None, record.session_id):
        return None
    slot = record.slot_of(identity) if identity is not None else None
    if event.role == ROLE_SERVICE and slot is not None and slot.agent_name is None:
        return ROLE_SERVICE
    if event.role == ROLE_CLIENT and identity == record.user_identity:
        return ROLE_CLIENT
    if agent_slot(record, event) is not None:
        return ROLE_AGENT
    return None


def agent_slot(record: SessionRecord, event: RoomEvent) -> ServiceSlot | None:
    """The `agent:NAME` slot a livekit-agents participant fills: LiveKit's kind AGENT,
    none of our attributes, and the agent name the job's attributes carry (one slot per
    name in a session). A leave that lacks them is matched by its connection."""
    name = event.agent_name
    if name is not None:
        slot = record.services.get(AGENT_PREFIX + name)
        return slot if slot is not None and slot.agent_name == name else None
    if event.kind == "participant_left" and event.participant_sid:
        for slot in record.services.values():
            if slot.agent_name is not None and slot.participant_sid == event.participant_sid:
                return slot
    return None


def slot_of(record: SessionRecord, role: str, event: RoomEvent) -> ServiceSlot | None:
    """The slot a participant of role service or agent fills (see `role_of`)."""
    if role == ROLE_SERVICE:
        return record.slot_of(event.identity) if event.identity is not None else None
    return agent_slot(record, event)


def same_connection(current_sid: str | None, event: RoomEvent) -> bool:
    return bool(current_sid and event.participant_sid == current_sid)


def is_stale_leave(current_sid: str | None, event: RoomEvent) -> bool:
    """A participant_left for an earlier connection of this identity (it has reconnected
    since, under a new participant sid): it says nothing about the one in the room now."""
    return bool(current_sid and event.participant_sid and event.participant_sid != current_sid)


def is_stray_instance(session_id: str, event: RoomEvent) -> bool:
    """A participant that fills no slot but holds a service token of this session: an
    instance that was replaced or removed and joined anyway."""
    return event.role == ROLE_SERVICE and event.attributes.get(SESSION_ATTRIBUTE) == session_id


def by_identity(participants: Iterable[RoomEvent]) -> dict[str, RoomEvent]:
    """The room's participants by identity (the last one listed, for an identity twice)."""
    return {event.identity: event for event in participants if event.identity}


def occupant(
    record: SessionRecord,
    slot: ServiceSlot,
    participants: tuple[RoomEvent, ...],
    present: dict[str, RoomEvent],
) -> RoomEvent | None:
    """The participant in the room now that fills `slot`, if any (`present`: the same
    participants by identity)."""
    if slot.agent_name is not None:  # its identity is LiveKit's choice: by its attributes
        return next((e for e in participants if agent_slot(record, e) is slot), None)
    here = present.get(slot.service_id)
    if here is not None and role_of(record, here) != ROLE_SERVICE:
        return None
    return here


def left(room_name: str, identity: str, role: str) -> RoomEvent:
    """The participant_left a participant no longer in the room would have sent."""
    return RoomEvent(kind="participant_left", room_name=room_name, identity=identity, role=role)
