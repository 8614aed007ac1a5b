"""Request and response bodies of the HTTP API: validated here, at the edge, and nowhere else."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

# Identities and names end up in LiveKit tokens and in URLs: no whitespace, slashes or '?#'.
ServiceId = Annotated[str, StringConstraints(pattern=r"^[^\s/?#]{1,128}$")]
RoomName = Annotated[str, StringConstraints(pattern=r"^[^\s/?#]{1,128}$")]
NonBlank = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"\S")]


class _Request(BaseModel):
    # strict: "user_identity": 123 is a wrong type, not the string "123".
    # forbid: a misspelt "required_service" must not silently mean "every service".
    model_config = ConfigDict(strict=True, extra="forbid")


def absolute_http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http:// or https:// URL")
    return value.rstrip("/")


class RegisterServiceRequest(_Request):
    service_id: ServiceId
    endpoint: str
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("endpoint")
    @classmethod
    def _absolute_http_url(cls, value: str) -> str:
        return absolute_http_url(value)


class RegisterServiceResponse(BaseModel):
    success: bool = True
    service_id: str
    message: str = "Microservice registered successfully"


class CreateSessionRequest(_Request):
    user_identity: NonBlank
    user_name: Annotated[str, StringConstraints(max_length=256)] | None = None
    room_name: RoomName | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    required_services: list[ServiceId] | None = None
    wait_until_ready: bool = False
    timeout_secs: Annotated[float, Field(gt=0, le=3600)] | None = None

    @field_validator("metadata")
    @classmethod
    def _duration_limit(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        # The spec sends it as a string ("3600"); a number is accepted too.
        value = metadata.get("duration_limit")
        if value is None:
            return metadata
        try:
            seconds = float(value) if not isinstance(value, bool) else float("nan")
        except (TypeError, ValueError):
            seconds = float("nan")
        if not seconds > 0:
            raise ValueError("duration_limit must be a positive number of seconds")
        return metadata


class CreateSessionResponse(BaseModel):
    session_id: str
    room_name: str
    access_token: str
    livekit_url: str
    status: str


class HealthResponse(BaseModel):
    status: str = "healthy"
    timestamp: str
    version: str


class UpdateServiceRequest(_Request):
    endpoint: str | None = None
    metadata: dict[str, Any] | None = None
    draining: bool | None = None  # false takes a drained instance back into service

    @field_validator("endpoint")
    @classmethod
    def _absolute_http_url(cls, value: str | None) -> str | None:
        return None if value is None else absolute_http_url(value)


class AddServiceRequest(_Request):
    # A service id, or "type:X" for the best available instance of type X.
    service: ServiceId
