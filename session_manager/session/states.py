"""The session state machine: the statuses of the API contract and the transitions allowed."""

from __future__ import annotations

from enum import StrEnum


class SessionStatus(StrEnum):
    CREATING = "Creating"
    WAITING_FOR_SERVICES = "WaitingForServices"
    READY = "Ready"
    ACTIVE = "Active"
    TERMINATING = "Terminating"
    TERMINATED = "Terminated"


class ServiceState(StrEnum):
    """Where one required microservice stands within one session."""

    PENDING = "pending"  # chosen, join-room not yet sent
    DISPATCHED = "dispatched"  # join-room answered 2xx, not yet seen in the room
    JOINED = "joined"  # LiveKit reported it in the room
    LEFT = "left"  # LiveKit reported it gone
    FAILED = "failed"  # join-room failed after every attempt


S = SessionStatus

# Every status may fall to Terminating (an error, a timeout, a request); only Terminating ends.
# Ready/Active may go back to WaitingForServices when a service is lost and being replaced.
TRANSITIONS: dict[SessionStatus, frozenset[SessionStatus]] = {
    S.CREATING: frozenset({S.WAITING_FOR_SERVICES, S.READY, S.TERMINATING}),
    S.WAITING_FOR_SERVICES: frozenset({S.READY, S.TERMINATING}),
    S.READY: frozenset({S.ACTIVE, S.WAITING_FOR_SERVICES, S.TERMINATING}),
    S.ACTIVE: frozenset({S.WAITING_FOR_SERVICES, S.TERMINATING}),
    S.TERMINATING: frozenset({S.TERMINATED}),
    S.TERMINATED: frozenset(),
}

LIVE_STATUSES = frozenset({S.CREATING, S.WAITING_FOR_SERVICES, S.READY, S.ACTIVE})


class IllegalTransition(RuntimeError):
    def __init__(self, old: SessionStatus, new: SessionStatus) -> None:
        super().__init__(f"illegal session transition {old} -> {new}")


def check_transition(old: SessionStatus, new: SessionStatus) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(old, new)
