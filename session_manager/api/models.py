"""Request and response bodies of the HTTP API: validated here, at the edge, and nowhere else.

Every bound is in `session_manager.api.limits`. The settings-dependent ones (metadata size,
longest duration_limit) come from the validation context: routes validate with
`Model.model_validate_json(raw, context=InputLimits.from_settings(settings).context())`.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo

from session_manager.api.limits import (
    MAX_IDENTITY_BYTES,
    MAX_REQUIRED_SERVICES,
    MAX_ROOM_NAME_BYTES,
    MAX_SERVICE_ID_BYTES,
    MAX_TIMEOUT_SECS,
    MAX_USER_NAME_BYTES,
    MIN_TIMEOUT_SECS,
    check_duration_limit,
    check_endpoint,
    check_health_settings,
    check_identifier,
    check_json_object,
    check_max_sessions,
    check_text,
    limits_of,
)
from session_manager.api.schema_bounds import (
    ENDPOINT_SCHEMA,
    SERVICE_METADATA_SCHEMA,
    SESSION_METADATA_SCHEMA,
    identifier_schema,
    schema,
    text_schema,
)
from session_manager.egress import check_endpoint_form

# Identities and names end up in LiveKit tokens and in URLs: no whitespace, slashes or '?#'.
# The `schema(...)` of each is what GET /openapi.json shows of its bounds (validation is the
# validator's; JSON Schema counts characters where the limits count UTF-8 bytes).
ServiceId = Annotated[
    str,
    AfterValidator(partial(check_identifier, max_bytes=MAX_SERVICE_ID_BYTES)),
    schema(identifier_schema(MAX_SERVICE_ID_BYTES)),
]
RoomName = Annotated[
    str,
    AfterValidator(partial(check_identifier, max_bytes=MAX_ROOM_NAME_BYTES)),
    schema(identifier_schema(MAX_ROOM_NAME_BYTES)),
]
UserIdentity = Annotated[
    str,
    AfterValidator(partial(check_text, max_bytes=MAX_IDENTITY_BYTES, blank=False)),
    schema(text_schema(MAX_IDENTITY_BYTES, blank=False)),
]
UserName = Annotated[
    str,
    AfterValidator(partial(check_text, max_bytes=MAX_USER_NAME_BYTES, blank=True)),
    schema(text_schema(MAX_USER_NAME_BYTES, blank=True)),
]
# An absolute http(s) URL without user-info, query or fragment (where it may point is checked
# against endpoint_allow by the route: that needs the settings and a name look-up).
Endpoint = Annotated[
    str,
    AfterValidator(check_endpoint),
    AfterValidator(check_endpoint_form),
    schema(ENDPOINT_SCHEMA),
]


def _session_metadata(metadata: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
    limits = limits_of(info)
    check_json_object(metadata, limits.max_metadata_bytes)
    # The spec sends it as a string ("3600"); a number is accepted too.
    check_duration_limit(metadata.get("duration_limit"), limits.max_session_duration)
    return metadata


def _service_metadata(metadata: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
    check_json_object(metadata, limits_of(info).max_metadata_bytes)
    check_max_sessions(metadata.get("max_sessions"))
    check_health_settings(metadata)
    return metadata


SessionMetadata = Annotated[
    dict[str, Any], AfterValidator(_session_metadata), schema(SESSION_METADATA_SCHEMA)
]
ServiceMetadata = Annotated[
    dict[str, Any], AfterValidator(_service_metadata), schema(SERVICE_METADATA_SCHEMA)
]


class _Request(BaseModel):
    # strict: "user_identity": 123 is a wrong type, not the string "123".
    # forbid: a misspelt "required_service" must not silently mean "every service".
    model_config = ConfigDict(strict=True, extra="forbid")


class RegisterServiceRequest(_Request):
    service_id: ServiceId
    endpoint: Endpoint
    metadata: ServiceMetadata = Field(default_factory=dict)


class RegisterServiceResponse(BaseModel):
    success: bool = True
    service_id: str
    message: str = "Microservice registered successfully"
    # Added to the spec's fields: the secret that signs every call to the service (handed out
    # this once; see "Signed calls to microservices"), and the LiveKit URL its calls will name.
    signing_secret: str
    livekit_url: str


class CreateSessionRequest(_Request):
    user_identity: UserIdentity
    user_name: UserName | None = None
    room_name: RoomName | None = None
    metadata: SessionMetadata = Field(default_factory=dict)
    required_services: (
        Annotated[list[ServiceId], Field(max_length=MAX_REQUIRED_SERVICES)] | None
    ) = None
    wait_until_ready: bool = False
    timeout_secs: (
        Annotated[float, Field(ge=MIN_TIMEOUT_SECS, le=MAX_TIMEOUT_SECS, allow_inf_nan=False)]
        | None
    ) = None


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
    endpoint: Endpoint | None = None
    metadata: ServiceMetadata | None = None
    draining: bool | None = None  # false takes a drained instance back into service


class AddServiceRequest(_Request):
    # A service id, or "type:X" for the best available instance of type X.
    service: ServiceId
