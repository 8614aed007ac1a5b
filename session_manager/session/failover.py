"""A slot's failover: when it loses its instance, which instance fills it next, and the timeline
from the loss to the new occupant's join (shown in the slot's view and the dispatch and join
events, and observed by the failover histogram). Functions over a slot; the session actor
decides when they apply."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from session_manager.clock import utc_now
from session_manager.registry import Registry, ServiceRecord
from session_manager.session.messages import FailoverCause
from session_manager.session.record import Failover, ServiceSlot

log = logging.getLogger(__name__)


def under_way(slot: ServiceSlot) -> dict[str, Any]:
    """For a redispatch: why the slot moved, from where, and how long finding out took."""
    failover = slot.failover
    if failover is None or failover.replaced_at is not None:
        return {}
    return {
        "cause": failover.cause,
        "from_service_id": failover.from_service_id,
        "detect_ms": failover.detect_ms,
    }


def note(
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


def over(
    slot: ServiceSlot, session_id: str, observe: Callable[[str, float], None]
) -> dict[str, Any]:
    """The slot's new occupant joined: its failover is over. Its timings (for the join
    event) and the histogram's observation; nothing when no failover was under way."""
    failover = slot.failover
    if failover is None or failover.replaced_at is not None:
        return {}
    failover.replaced_at = slot.joined_at or utc_now()
    seconds = failover.failover_ms
    if seconds is not None:
        observe(failover.cause, seconds / 1000)
    log.info(
        "service slot filled again",
        extra={
            "session_id": session_id,
            "service_id": slot.service_id,
            "cause": failover.cause,
            "failover_ms": failover.failover_ms,
        },
    )
    return {
        "cause": failover.cause,
        "from_service_id": failover.from_service_id,
        "detect_ms": failover.detect_ms,
        "replace_ms": failover.replace_ms,
        "failover_ms": failover.failover_ms,
    }


def excluded(slot: ServiceSlot, in_use: set[str], user_identity: str) -> set[str]:
    """Instances a slot must not move to: those in use, those that declined it, and one
    whose id is the user's identity (in LiveKit, one identity joining kicks the other)."""
    return {*in_use, *slot.declined_by, user_identity}


def replacement(
    slot: ServiceSlot, registry: Registry, exclude: set[str], *, declined: bool
) -> ServiceRecord | None:
    """The instance to dispatch next for a slot whose instance failed or declined (the caller
    has checked it may still redispatch), or None when there is none; counts the redispatch."""
    failed = slot.service_id
    if declined:
        # A decline is an answer, not a fault: go straight to another instance, no back-off,
        # and do not count it against max_redispatch.
        return registry.alternative(failed, exclude=exclude)
    same = registry.find(failed)
    # The same instance keeps the capacity this session already holds on it.
    if not slot.retried_in_place and same is not None and same.accepting:
        chosen: ServiceRecord | None = same
        slot.retried_in_place = True
    else:
        chosen = registry.alternative(failed, exclude=exclude)
        slot.retried_in_place = False
    if chosen is not None:
        slot.redispatches += 1
    return chosen
