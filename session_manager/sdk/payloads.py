"""The JSON bodies exchanged with the Session Manager, validated at the edge.

These mirror the manager's fixed contract; fields the manager may add later are ignored rather
than rejected so that an older microservice keeps working against a newer manager.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue, SecretStr, StringConstraints

NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]


class _InboundPayload(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class JoinRoomRequest(_InboundPayload):
    """Body of `POST {endpoint}/join-room`."""

    session_id: NonEmptyStr
    room_name: NonEmptyStr
    service_identity: NonEmptyStr
    # SecretStr keeps the token out of repr(), str() and validation errors, so it cannot leak
    # into a log line or an HTTP answer by accident.
    access_token: SecretStr = Field(min_length=1)
    livekit_url: NonEmptyStr
    # Added after the five above; a manager older than them does not send them.
    session_metadata: dict[str, JsonValue] = Field(default_factory=dict)
    user_identity: str | None = None
    user_name: str | None = None
    # A warm pool's room (the manager's `warm_pools`): no user yet; `session-started` follows
    # when one takes it.
    pooled: bool = False


class SessionStartedRequest(_InboundPayload):
    """Body of `POST {endpoint}/session-started`: a warm pool's room this service is in was
    handed to a user; the session-context fields of join-room, now known."""

    session_id: NonEmptyStr
    room_name: NonEmptyStr
    service_identity: NonEmptyStr
    session_metadata: dict[str, JsonValue] = Field(default_factory=dict)
    user_identity: NonEmptyStr
    user_name: str | None = None
    pool: str | None = None


class LeaveRoomRequest(_InboundPayload):
    """Body of `POST {endpoint}/leave-room`."""

    session_id: NonEmptyStr
    room_name: str | None = None


class ServiceReply(BaseModel):
    """Answer to join-room and leave-room, successful or not."""

    success: bool
    message: str
    session_id: str | None
    service_id: str


class HealthReply(BaseModel):
    """Answer to `GET {endpoint}/health`."""

    status: str
    service_id: str
    sessions: int


class RegisterRequest(BaseModel):
    """Body of `POST {manager_url}/api/v1/microservices/register`."""

    service_id: NonEmptyStr
    endpoint: NonEmptyStr
    metadata: dict[str, Any] = Field(default_factory=dict)
