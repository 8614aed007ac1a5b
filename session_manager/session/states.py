"""The session state machine: the statuses of the API contract, the transitions allowed, and
the table of (status, message) -> handler, next statuses that the session actor runs."""

from __future__ import annotations

from dataclasses import dataclass
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
RUNNING = frozenset({S.WAITING_FOR_SERVICES, S.READY, S.ACTIVE})  # past Creating, not ending
ENDING = frozenset({S.TERMINATING, S.TERMINATED})


class IllegalTransition(RuntimeError):
    def __init__(self, old: SessionStatus, new: SessionStatus) -> None:
        super().__init__(f"illegal session transition {old} -> {new}")


def check_transition(old: SessionStatus, new: SessionStatus) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(old, new)


@dataclass(frozen=True)
class Rule:
    """How a session handles one kind of message: in which statuses it is taken (the guard),
    which actor method handles it, and the statuses that handling may lead to."""

    when: frozenset[SessionStatus]
    handler: str
    leads_to: frozenset[SessionStatus]


def _rule(when: frozenset[SessionStatus], handler: str, *leads_to: SessionStatus) -> Rule:
    return Rule(when, handler, frozenset(leads_to))


# The session actor's behaviour. A message that arrives in a status its rule does not take is
# answered (a caller waiting on it is told why) or logged and dropped (a stale timer, say): never
# silently lost. The table is keyed by message class name, so this module needs no import of the
# messages themselves; a test checks every message class has exactly one rule.
W, R, A, T1, T2 = S.WAITING_FOR_SERVICES, S.READY, S.ACTIVE, S.TERMINATING, S.TERMINATED
TABLE: dict[str, Rule] = {
    # creation: the room, the tokens, the services dispatched
    "Start": _rule(frozenset({S.CREATING}), "_start", W, R, T1, T2),
    # a restarted manager takes the session over: timers back, the room's participants compared
    "Adopt": _rule(RUNNING, "_adopt", W, R, A, T1, T2),
    # the manager shuts down keeping its sessions; one whose creator still waits ends instead
    "Detach": _rule(RUNNING, "_detach", T1, T2),
    # LiveKit said who joined or left, or that the room is gone
    "RoomEventArrived": _rule(RUNNING, "_on_room_event", W, R, A, T1, T2),
    # a join-room call is over: fine, declined (next instance) or failed (redispatch or end)
    "DispatchFinished": _rule(RUNNING, "_on_dispatch_finished", W, T1, T2),
    # LiveKit's create_dispatch for an agent is over: the dispatch is out, or it failed
    "AgentDispatchFinished": _rule(RUNNING, "_on_agent_dispatch_finished", W, T1, T2),
    # timers
    "JoinDeadlinePassed": _rule(frozenset({W}), "_on_join_deadline", T1, T2),
    "WaitDeadlinePassed": _rule(frozenset({W}), "_on_wait_deadline", T1, T2),
    "DurationLimitReached": _rule(RUNNING, "_on_duration_limit", T1, T2),
    "ClientJoinDeadlinePassed": _rule(RUNNING, "_on_client_join_deadline", T1, T2),
    "ClientGraceExpired": _rule(RUNNING, "_on_client_grace_expired", T1, T2),
    # services added, removed, or lost to the health monitor while the session runs
    "AddService": _rule(RUNNING, "_on_add_service", W),
    "RemoveService": _rule(RUNNING, "_on_remove_service", R, A),
    "InstanceLost": _rule(RUNNING, "_on_instance_lost", W),
    # a warm pool's Ready member handed to a user (only a pool member takes it)
    "Claim": _rule(frozenset({R}), "_on_claim", R, T1, T2),
    # DELETE, the manager shutting down, LiveKit gone
    "Terminate": _rule(RUNNING, "_on_terminate", T1, T2),
}
