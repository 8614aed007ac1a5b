"""What the manager knows of one session. Changed only by that session's actor; everyone else
sees the JSON view it publishes after each change."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from session_manager.clock import parse_rfc3339, rfc3339, utc_now
from session_manager.session.states import ServiceState, SessionStatus

JsonDict = dict[str, Any]
AGENT_PREFIX = "agent:"  # a requirement naming a livekit-agents worker: "agent:NAME"


def _ts(moment: datetime | None) -> str | None:
    return rfc3339(moment) if moment else None


def _moment(text: Any) -> datetime | None:
    return parse_rfc3339(text) if isinstance(text, str) and text else None


def _ms_between(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds() * 1000, 1)


@dataclass
class Failover:
    """The last time a slot lost its instance and was filled again: why, from which instance,
    when the loss happened (`gone_at`, if known: a presence connection's drop), when the manager
    knew it (`detected_at`), and when the new occupant joined (`replaced_at`)."""

    cause: str
    from_service_id: str
    detected_at: datetime
    gone_at: datetime | None = None
    replaced_at: datetime | None = None

    @property
    def detect_ms(self) -> float | None:
        return _ms_between(self.gone_at, self.detected_at)

    @property
    def replace_ms(self) -> float | None:
        return _ms_between(self.detected_at, self.replaced_at)

    @property
    def failover_ms(self) -> float | None:
        """From the loss (or its detection, when the loss's moment is unknown) to the join."""
        return _ms_between(self.gone_at or self.detected_at, self.replaced_at)

    def view(self) -> JsonDict:
        return {
            "cause": self.cause,
            "from_service_id": self.from_service_id,
            "gone_at": _ts(self.gone_at),
            "detected_at": _ts(self.detected_at),
            "replaced_at": _ts(self.replaced_at),
            "detect_ms": self.detect_ms,
            "replace_ms": self.replace_ms,
            "failover_ms": self.failover_ms,
        }

    @classmethod
    def from_view(cls, view: Any) -> Failover | None:
        if not isinstance(view, dict):
            return None
        detected = _moment(view.get("detected_at"))
        if detected is None:
            return None
        return cls(
            cause=str(view.get("cause") or ""),
            from_service_id=str(view.get("from_service_id") or ""),
            detected_at=detected,
            gone_at=_moment(view.get("gone_at")),
            replaced_at=_moment(view.get("replaced_at")),
        )


@dataclass
class ServiceSlot:
    """One required microservice in one session: what was asked for (`requirement`, a service id,
    `type:X`, or `agent:NAME`) and the instance currently filling it (`service_id`). An agent's
    slot has its requirement as service id, no endpoint, and the id of LiveKit's dispatch."""

    requirement: str
    service_id: str
    endpoint: str
    service_type: str | None = None
    state: ServiceState = ServiceState.PENDING
    attempts: int = 0
    error: str | None = None
    redispatches: int = 0
    declined_by: list[str] = field(default_factory=list)
    retried_in_place: bool = False  # after a failure, the same instance gets one more chance
    participant_sid: str | None = None  # LiveKit's sid of the connection in the room now
    dispatched_at: datetime | None = None
    answered_at: datetime | None = None
    joined_at: datetime | None = None
    left_at: datetime | None = None
    dispatch_id: str | None = None  # an agent's: LiveKit's AgentDispatch now out for it
    failover: Failover | None = None  # the last time it lost its instance; kept across assign

    @property
    def agent_name(self) -> str | None:
        """NAME of an `agent:NAME` slot; None for an HTTP microservice."""
        if self.requirement.startswith(AGENT_PREFIX):
            return self.requirement.removeprefix(AGENT_PREFIX)
        return None

    def assign(self, service_id: str, endpoint: str, service_type: str | None) -> None:
        """Fill the slot with another instance; its timings start again."""
        self.service_id, self.endpoint, self.service_type = service_id, endpoint, service_type
        self.state = ServiceState.PENDING
        self.participant_sid = self.dispatch_id = None
        self.dispatched_at = self.answered_at = self.joined_at = self.left_at = None

    @property
    def join_ms(self) -> float | None:
        return _ms_between(self.dispatched_at, self.joined_at)

    @classmethod
    def from_view(cls, view: JsonDict) -> ServiceSlot:
        """The slot a stored view describes (a restarted manager adopting its session). Which
        connection is in the room now is not stored: LiveKit is asked again."""
        return cls(
            requirement=view["requirement"],
            service_id=view["service_id"],
            endpoint=view["endpoint"],
            service_type=view.get("type"),
            state=ServiceState(view["state"]),
            attempts=int(view.get("attempts") or 0),
            error=view.get("error"),
            redispatches=int(view.get("redispatches") or 0),
            declined_by=list(view.get("declined_by") or []),
            dispatched_at=_moment(view.get("dispatched_at")),
            joined_at=_moment(view.get("joined_at")),
            left_at=_moment(view.get("left_at")),
            dispatch_id=view.get("dispatch_id"),
            failover=Failover.from_view(view.get("failover")),
        )

    def view(self) -> JsonDict:
        return {
            "requirement": self.requirement,
            "service_id": self.service_id,
            "type": self.service_type,
            "endpoint": self.endpoint,
            "state": self.state.value,
            "attempts": self.attempts,
            "redispatches": self.redispatches,
            "declined_by": list(self.declined_by),
            "error": self.error,
            "dispatched_at": _ts(self.dispatched_at),
            "joined_at": _ts(self.joined_at),
            "left_at": _ts(self.left_at),
            # From the first join-room call to LiveKit's participant_joined webhook.
            "join_ms": self.join_ms,
            # An agent's: LiveKit's AgentDispatch id (None for an HTTP microservice).
            "dispatch_id": self.dispatch_id,
            # The last time the slot lost its instance: why, and how long finding out and
            # filling it again took (null: it never did).
            "failover": self.failover.view() if self.failover else None,
        }


@dataclass
class SessionRecord:
    session_id: str
    room_name: str
    user_identity: str
    user_name: str | None
    metadata: JsonDict
    services: dict[str, ServiceSlot] = field(default_factory=dict)
    status: SessionStatus = SessionStatus.CREATING
    reason: str | None = None
    created_at: datetime = field(default_factory=utc_now)
    updated_at: datetime = field(default_factory=utc_now)
    ready_at: datetime | None = None
    active_at: datetime | None = None
    terminated_at: datetime | None = None
    client_joined_at: datetime | None = None
    client_left_at: datetime | None = None
    client_present: bool = False
    client_sid: str | None = None  # LiveKit's sid of the user's connection in the room now
    owner: str | None = None  # id of the API key that created it (never the key); None: no keys
    # When each running timer fires (its name in the view -> the moment): stored with the view,
    # so a restarted manager that adopts the session fires them at the same moments.
    deadlines: dict[str, datetime] = field(default_factory=dict)
    pool: str | None = None  # the warm pool it was taken from (`session_manager.pools`)

    @property
    def all_services_joined(self) -> bool:
        return all(slot.state is ServiceState.JOINED for slot in self.services.values())

    @property
    def ready_ms(self) -> float | None:
        return _ms_between(self.created_at, self.ready_at)

    def slot_of(self, service_id: str) -> ServiceSlot | None:
        """The slot an instance currently fills, if any."""
        for slot in self.services.values():
            if slot.service_id == service_id:
                return slot
        return None

    def view(self) -> JsonDict:
        return {
            "session_id": self.session_id,
            "room_name": self.room_name,
            "status": self.status.value,
            "reason": self.reason,
            "user_identity": self.user_identity,
            "user_name": self.user_name,
            "metadata": self.metadata,
            "client": {
                "joined": self.client_present,
                "joined_at": _ts(self.client_joined_at),
                "left_at": _ts(self.client_left_at),
            },
            "services": [slot.view() for slot in self.services.values()],
            "created_at": _ts(self.created_at),
            "updated_at": _ts(self.updated_at),
            "ready_at": _ts(self.ready_at),
            "active_at": _ts(self.active_at),
            "terminated_at": _ts(self.terminated_at),
            "ready_ms": self.ready_ms,
            "owner": self.owner,
            "deadlines": {name: rfc3339(moment) for name, moment in self.deadlines.items()},
            "pool": self.pool,
        }

    @classmethod
    def from_view(cls, view: JsonDict) -> SessionRecord:
        """The record a stored view describes: what a restarted manager adopts."""
        client = view.get("client") or {}
        slots = [ServiceSlot.from_view(slot) for slot in view.get("services") or []]
        return cls(
            session_id=view["session_id"],
            room_name=view["room_name"],
            user_identity=view["user_identity"],
            user_name=view.get("user_name"),
            metadata=view.get("metadata") or {},
            services={slot.requirement: slot for slot in slots},
            status=SessionStatus(view["status"]),
            reason=view.get("reason"),
            created_at=_moment(view["created_at"]) or utc_now(),
            updated_at=_moment(view.get("updated_at")) or utc_now(),
            ready_at=_moment(view.get("ready_at")),
            active_at=_moment(view.get("active_at")),
            terminated_at=_moment(view.get("terminated_at")),
            client_joined_at=_moment(client.get("joined_at")),
            client_left_at=_moment(client.get("left_at")),
            client_present=bool(client.get("joined")),
            owner=view.get("owner"),
            deadlines={
                name: moment
                for name, text in (view.get("deadlines") or {}).items()
                if (moment := _moment(text)) is not None
            },
            pool=view.get("pool"),
        )
