"""The shapes of the API's answers, as pydantic models: what `GET /openapi.json` documents.

The handlers build their answers as plain JSON (the views that sessions and registrations
publish); these models describe them, field for field, and the OpenAPI tests (schemathesis on a
live manager) check every answer against them. Answers may gain fields: no model forbids extra
ones, so a client must ignore fields it does not know.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from session_manager.events.model import EventType
from session_manager.registry.registry import ServiceStatus
from session_manager.session.states import ServiceState, SessionStatus

Timestamp = str  # RFC 3339 UTC, e.g. "2025-01-01T12:00:00.000Z"


class _View(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorEnvelope(_View):
    """Every error, from every route."""

    error: str = Field(description="A code: InvalidRequest, NotFound, Timeout, NoCapacity, …")
    message: str = Field(description="What went wrong, for a person")
    timestamp: Timestamp = Field(description="RFC 3339 UTC")


class HealthProblem(_View):
    component: str
    reason: str
    since: Timestamp


class UnhealthyResponse(_View):
    status: Literal["unhealthy"]
    timestamp: Timestamp
    version: str
    problems: list[HealthProblem]


class ClientView(_View):
    joined: bool
    joined_at: Timestamp | None
    left_at: Timestamp | None


class FailoverView(_View):
    """The last time a slot lost its instance and was filled again."""

    cause: str = Field(
        description='"process lost", "health", "left room", "drain" or "dispatch failed"'
    )
    from_service_id: str = Field(description="The instance it lost")
    gone_at: Timestamp | None = Field(description="When the instance went, if known")
    detected_at: Timestamp = Field(description="When the manager knew")
    replaced_at: Timestamp | None = Field(description="When the new occupant joined")
    detect_ms: float | None = Field(description="From gone_at to detected_at")
    replace_ms: float | None = Field(description="From detected_at to replaced_at")
    failover_ms: float | None = Field(description="From gone_at (else detected_at) to replaced_at")


class ServiceSlotView(_View):
    """One required microservice of a session and the instance filling it."""

    requirement: str = Field(description='What was asked for: a service id, "type:X", …')
    service_id: str
    type: str | None
    endpoint: str
    state: ServiceState
    attempts: int
    redispatches: int
    declined_by: list[str]
    error: str | None
    dispatched_at: Timestamp | None
    joined_at: Timestamp | None
    left_at: Timestamp | None
    join_ms: float | None = Field(description="From the first join-room call to the join")
    dispatch_id: str | None = Field(None, description="An agent's: LiveKit's AgentDispatch id")
    failover: FailoverView | None = Field(
        None, description="Why and how fast the slot last moved; null: it never did"
    )


class SessionView(_View):
    session_id: str
    room_name: str
    status: SessionStatus
    reason: str | None
    user_identity: str
    user_name: str | None
    metadata: dict[str, Any]
    client: ClientView
    services: list[ServiceSlotView]
    created_at: Timestamp
    updated_at: Timestamp
    ready_at: Timestamp | None
    active_at: Timestamp | None
    terminated_at: Timestamp | None
    ready_ms: float | None
    owner: str | None = Field(description="Id of the API key that created it; null: no keys")
    deadlines: dict[str, Timestamp] = Field(description="When each running timer fires")
    pool: str | None = Field(
        None, description="The warm pool the session was taken from; null: dispatched for it"
    )


class SessionPage(_View):
    sessions: list[SessionView]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page")


class ServiceView(_View):
    service_id: str
    endpoint: str
    metadata: dict[str, Any]
    status: ServiceStatus
    draining: bool
    sessions: int
    max_sessions: int | None
    last_error: str | None
    last_check_at: Timestamp | None
    registered_at: Timestamp
    updated_at: Timestamp


class ServiceList(_View):
    microservices: list[ServiceView]


class DeregisterResponse(_View):
    success: bool
    service_id: str
    message: str


class RotateSecretResponse(_View):
    success: bool
    service_id: str
    signing_secret: str
    livekit_url: str
    message: str


class PoolMemberView(_View):
    session_id: str = Field(description="The member's session id (not a user's session yet)")
    status: SessionStatus
    age_s: float = Field(description="Seconds since its fill began")
    service_ids: list[str] = Field(description="The instances in its room")


class PoolView(_View):
    """One warm pool (`warm_pools`): its members and what it has done since start."""

    name: str = Field(description="Its services, sorted, joined by '+'")
    services: list[str]
    size: int
    max_idle: float
    ready: int = Field(description="Members Ready to be handed out now")
    members: list[PoolMemberView]
    retry_in: float = Field(description="Seconds before the next fill, after failed ones; 0")
    hits: int = Field(description="Creates served by a member")
    misses: int = Field(description="Creates that matched with no member Ready")
    refills: int = Field(description="Members started")
    expiries: int = Field(description="Members ended unclaimed after max_idle")
    fill_failures: int = Field(description="Members that ended before Ready")
    lost: int = Field(description="Ready members that ended on their own (a service lost)")


class PoolList(_View):
    pools: list[PoolView]


class EventView(_View):
    id: int
    type: EventType
    timestamp: Timestamp
    session_id: str | None
    service_id: str | None
    data: dict[str, Any]


class MissedEventsView(_View):
    """Ids a reader will never see. For an unknown `since` / last event id the start of the
    loss is unknown: `first_missed_id` and `count` are null."""

    first_missed_id: int | None
    last_missed_id: int
    count: int | None
    reason: str


class EventPage(_View):
    events: list[EventView]
    next: int = Field(description="Pass as `since` for the next page")
    gap: bool = Field(description="Whether events after `since` are no longer kept")
    missed: MissedEventsView | None = None
