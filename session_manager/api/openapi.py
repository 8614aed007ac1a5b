"""`GET /openapi.json`: the API as an OpenAPI 3.1 document, generated from the pydantic models.

Request bodies are the request models of `api.models` (their bounds come from
`api.schema_bounds`), answers the models of `api.views`; every error is the envelope. `OPERATIONS`
is the one table of routes (path, method, summary, request, answers); the scopes come from
`api.auth.ROUTE_SCOPES`. A test checks that the table and the app's routes are the same set, and
schemathesis checks the live app's answers against the document.

The document does not depend on the settings (bounds that are settings are shown with their
defaults), so it is built once per process and served from memory.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from session_manager import __version__
from session_manager.api.auth import ROUTE_SCOPES, RouteRule
from session_manager.api.limits import INT64_MAX, MAX_IDEMPOTENCY_KEY, MAX_SESSIONS_PAGE
from session_manager.api.models import (
    AddServiceRequest,
    CreateSessionRequest,
    CreateSessionResponse,
    HealthResponse,
    RegisterServiceRequest,
    RegisterServiceResponse,
    UpdateServiceRequest,
)
from session_manager.api.views import (
    DeregisterResponse,
    ErrorEnvelope,
    EventPage,
    PoolList,
    RotateSecretResponse,
    ServiceList,
    ServiceView,
    SessionPage,
    SessionView,
    UnhealthyResponse,
)
from session_manager.daemon import WEBHOOK_PATH
from session_manager.events.model import EVENT_TYPE_NAMES
from session_manager.events.sse import EVENTS_PATH, MAX_POLL_LIMIT, SESSION_EVENTS_PATH
from session_manager.session.states import SessionStatus

OPENAPI_PATH: Final = "/openapi.json"
DOCS_PATH: Final = "/docs"
REF: Final = "#/components/schemas/{model}"
BEARER_SCHEME: Final = "bearerAuth"

JsonDict = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Media:
    """An answer that is not a JSON model: its media type and schema."""

    media_type: str
    schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "string"})


Answer = type[BaseModel] | Media | Sequence[type[BaseModel] | Media]


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    where: str  # "query" or "header"
    schema: Mapping[str, Any]
    description: str = ""


@dataclass(frozen=True, slots=True)
class Operation:
    method: str
    path: str
    summary: str
    tag: str
    ok: Answer  # the 200 answer
    errors: tuple[int, ...] = ()  # besides those every operation of its kind may answer
    request: type[BaseModel] | None = None
    params: tuple[Param, ...] = ()
    description: str = ""
    extra: Mapping[int, Answer] = field(default_factory=dict)  # non-envelope answers


# What each error status means; the answer is always the envelope.
ERROR_MEANING: Final[Mapping[int, str]] = {
    400: "InvalidRequest: malformed JSON, wrong types, a value out of its bounds",
    401: "Unauthorized: no API key or an unknown one (with `WWW-Authenticate: Bearer`)",
    403: "Forbidden: the API key lacks the scope, or does not own the registration",
    404: "NotFound: no such session, service or path",
    408: "Timeout: the services did not join in time (`wait_until_ready`)",
    409: "Conflict or SessionTerminated: an Idempotency-Key reused with another body, a service "
    "already in the session, or a session that has ended",
    413: "PayloadTooLarge: the body is over `max_body_bytes`",
    429: "TooManyRequests: past `rate_limit`, `max_sessions_per_user`, `max_event_streams` or "
    "`max_services` (with `Retry-After`)",
    502: "MicroserviceUnavailable or LiveKitError: a join-room failed, or LiveKit refused",
    503: "LiveKitUnavailable, NoCapacity, AtCapacity, StoreUnavailable, Unavailable or "
    "ShuttingDown",
}

_RETRY_AFTER: Final = {
    "Retry-After": {"description": "Seconds to wait", "schema": {"type": "string"}}
}
_ERROR_HEADERS: Final[Mapping[int, Mapping[str, Any]]] = {
    401: {
        "WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}},
    },
    429: _RETRY_AFTER,
    503: _RETRY_AFTER,
}

TEXT: Final = Media("text/plain")
# Schemathesis and OpenAPI 3.2's `itemSchema` read an event stream's schema as one event's.
SSE: Final = Media(
    "text/event-stream",
    {
        "type": "object",
        "description": "One Server-Sent Event: `id`, `event` (its type), `data` (the event)",
        "properties": {
            "id": {"type": "string", "pattern": "^[0-9]+$"},
            "event": {"type": "string"},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {"$ref": "#/components/schemas/EventView"},
            },
        },
    },
)
HTML: Final = Media("text/html")
JSON_OBJECT: Final = Media("application/json", {"type": "object"})

# Every call that goes through the supervisor may meet a manager that is stopping or unhealthy.
_SUPERVISED: Final = (503,)
_BODY: Final = (400, 413)
_ONE: Final = (404,)  # a path with an id


def _query(name: str, schema: Mapping[str, Any], description: str = "") -> Param:
    return Param(name, "query", schema, description)


_ID_TEXT: Final = {"type": "string"}
_EVENT_ID: Final = {"type": "integer", "minimum": 0, "maximum": INT64_MAX}
_TYPE_FILTER = _query(
    "type",
    {"type": "string"},
    "Event types, comma-separated (or the parameter repeated): "
    + ", ".join(sorted(EVENT_TYPE_NAMES)),
)
_LAST_EVENT_ID = (
    Param("Last-Event-ID", "header", _EVENT_ID, "Resume a stream after this event id"),
    _query("last_event_id", _EVENT_ID, "The same, for clients that cannot set the header"),
)

OPERATIONS: Final[tuple[Operation, ...]] = (
    Operation(
        "GET",
        "/health",
        "Health of the manager",
        "operations",
        HealthResponse,
        extra={503: UnhealthyResponse},
        description="200 while the manager can serve; 503 names the core part that is down.",
    ),
    Operation(
        "GET",
        "/metrics",
        "Prometheus metrics",
        "operations",
        TEXT,
        description="Prometheus text exposition format.",
    ),
    Operation(
        "GET",
        OPENAPI_PATH,
        "This document",
        "operations",
        JSON_OBJECT,
        description="The API as OpenAPI 3.1.",
    ),
    Operation(
        "GET",
        DOCS_PATH,
        "The API documentation page",
        "operations",
        HTML,
        description="Swagger UI, served by the manager with its own assets.",
    ),
    Operation(
        "GET",
        "/console",
        "The web console",
        "operations",
        HTML,
        description="Live sessions, services and events, and a page to try a session; the "
        "console reads the API with the key the person gives it.",
    ),
    Operation(
        "GET",
        "/api/v1/pools",
        "Warm pools",
        "operations",
        PoolList,
        description="Each warm pool (`warm_pools`): its size, its members (rooms with their "
        "services joined, waiting for a user; not users' sessions, so never in the session "
        "list) and its hits, misses, refills and expiries since start.",
    ),
    Operation(
        "POST",
        "/api/v1/microservices/register",
        "Register a microservice",
        "microservices",
        RegisterServiceResponse,
        (*_BODY, 429, *_SUPERVISED),
        request=RegisterServiceRequest,
        description="A known id is 400; the answer carries the service's signing secret, once.",
    ),
    Operation(
        "GET",
        "/api/v1/microservices",
        "List microservices",
        "microservices",
        ServiceList,
        _SUPERVISED,
        params=(
            _query("type", _ID_TEXT, "Only services of this `metadata.type`"),
            _query("status", _ID_TEXT, "`Healthy`, `Unhealthy`, `Unknown` or `draining`"),
        ),
    ),
    Operation(
        "GET",
        "/api/v1/microservices/{service_id}",
        "One microservice",
        "microservices",
        ServiceView,
        (*_ONE, *_SUPERVISED),
    ),
    Operation(
        "PUT",
        "/api/v1/microservices/{service_id}",
        "Change a microservice's endpoint, metadata or draining",
        "microservices",
        ServiceView,
        (*_BODY, *_ONE, *_SUPERVISED),
        request=UpdateServiceRequest,
    ),
    Operation(
        "DELETE",
        "/api/v1/microservices/{service_id}",
        "Deregister a microservice",
        "microservices",
        DeregisterResponse,
        (*_ONE, *_SUPERVISED),
        description="Sessions already using it go on.",
    ),
    Operation(
        "POST",
        "/api/v1/microservices/{service_id}/drain",
        "Drain a microservice: no new sessions for it",
        "microservices",
        ServiceView,
        (*_ONE, *_SUPERVISED),
    ),
    Operation(
        "POST",
        "/api/v1/microservices/{service_id}/rotate-secret",
        "A new signing secret for a microservice, in force at once",
        "microservices",
        RotateSecretResponse,
        (*_ONE, *_SUPERVISED),
    ),
    Operation(
        "GET",
        "/api/v1/microservices/{service_id}/presence",
        "An SDK instance's presence (WebSocket)",
        "microservices",
        TEXT,
        (400, *_ONE, *_SUPERVISED),
        description="A WebSocket upgrade (101) only: the SDK holds it while it runs; its loss "
        "without a goodbye is the process's death. Without an upgrade: 400.",
    ),
    *(
        Operation(
            "POST",
            path,
            "Create a session" + (" (the spec's path)" if "create" in path else ""),
            "sessions",
            CreateSessionResponse,
            (*_BODY, 408, 409, 429, 502, *_SUPERVISED),
            request=CreateSessionRequest,
            params=(
                Param(
                    "Idempotency-Key",
                    "header",
                    {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": MAX_IDEMPOTENCY_KEY,
                        "pattern": "^[\\x20-\\x7e]+$",
                    },
                    "The same key and body within `idempotency_ttl` return the same session",
                ),
            ),
            description=(
                "Creates a LiveKit room and dispatches the required services into it. "
                "With `wait_until_ready` it answers once every service has joined, or 408."
            ),
        )
        for path in ("/api/v1/create-session", "/api/v1/sessions")
    ),
    Operation(
        "GET",
        "/api/v1/sessions",
        "List sessions, newest first",
        "sessions",
        SessionPage,
        (400, *_SUPERVISED),
        params=(
            _query("status", {"type": "string", "enum": [s.value for s in SessionStatus]}),
            _query("user_identity", _ID_TEXT),
            _query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_SESSIONS_PAGE}),
            _query("cursor", _ID_TEXT, "`next_cursor` of the previous page"),
        ),
    ),
    Operation(
        "GET",
        "/api/v1/sessions/{session_id}",
        "One session",
        "sessions",
        SessionView,
        (*_ONE, *_SUPERVISED),
    ),
    Operation(
        "DELETE",
        "/api/v1/sessions/{session_id}",
        "End a session",
        "sessions",
        SessionView,
        (*_ONE, 409, 502, *_SUPERVISED),
        description="Idempotent: an ended session answers its view.",
    ),
    Operation(
        "POST",
        "/api/v1/sessions/{session_id}/services",
        "Add a service to a running session",
        "sessions",
        SessionView,
        (*_BODY, *_ONE, 409, 502, *_SUPERVISED),
        request=AddServiceRequest,
    ),
    Operation(
        "DELETE",
        "/api/v1/sessions/{session_id}/services/{service_id}",
        "Ask a service to leave a session",
        "sessions",
        SessionView,
        (*_ONE, 409, 502, *_SUPERVISED),
    ),
    Operation(
        "GET",
        EVENTS_PATH,
        "Every event: an SSE stream, or a JSON page",
        "events",
        (EventPage, SSE),
        (400, 429),
        params=(
            _query("session_id", _ID_TEXT, "Only this session's events"),
            _TYPE_FILTER,
            _query("since", _EVENT_ID, "A JSON page of the events after this id"),
            _query(
                "limit", {"type": "integer", "minimum": 1, "maximum": MAX_POLL_LIMIT}, "Page size"
            ),
            *_LAST_EVENT_ID,
        ),
        description=(
            "A Server-Sent Events stream when `Accept` names `text/event-stream` and neither "
            "`since` nor `limit` is given; otherwise one JSON page."
        ),
    ),
    Operation(
        "GET",
        SESSION_EVENTS_PATH,
        "One session's events as SSE, until it ends",
        "events",
        SSE,
        (400, *_ONE, 429, *_SUPERVISED),
        params=(_TYPE_FILTER, *_LAST_EVENT_ID),
    ),
    Operation(
        "POST",
        WEBHOOK_PATH,
        "LiveKit's webhooks (not for clients)",
        "operations",
        TEXT,
        (400, 401, 413),
        request=None,
        description="Verified with LiveKit's API secret (`Authorization` is LiveKit's JWT).",
    ),
)

_WEBHOOK_BODY: Final = {
    "required": True,
    "content": {
        media: {"schema": {"type": "object"}}
        for media in ("application/webhook+json", "application/json")
    },
}

_PATH_PARAM = re.compile(r"\{(\w+)\}")


def _media_of(answer: type[BaseModel] | Media) -> tuple[str, Mapping[str, Any]]:
    if isinstance(answer, Media):
        return answer.media_type, answer.schema
    return "application/json", {"$ref": REF.format(model=answer.__name__)}


def _response(
    answer: Answer, description: str, headers: Mapping[str, Any] | None = None
) -> JsonDict:
    answers = answer if isinstance(answer, Sequence) else (answer,)
    content = dict(_media_of(one) for one in answers)
    response: JsonDict = {
        "description": description,
        "content": {media: {"schema": schema} for media, schema in content.items()},
    }
    if headers:
        response["headers"] = dict(headers)
    return response


def _rule(operation: Operation) -> RouteRule:
    return ROUTE_SCOPES[(operation.method, operation.path)]


def _operation(operation: Operation) -> JsonDict:
    rule = _rule(operation)
    statuses = set(operation.errors)
    if not rule.open:
        statuses |= {401, 403, 429}  # keys, scopes and the rate limit
    responses: JsonDict = {"200": _response(operation.ok, "OK")}
    for status, answer in operation.extra.items():
        responses[str(status)] = _response(answer, ERROR_MEANING.get(status, "See description"))
    for status in sorted(statuses - set(operation.extra)):
        responses[str(status)] = _response(
            ErrorEnvelope, ERROR_MEANING[status], _ERROR_HEADERS.get(status)
        )
    parameters: list[JsonDict] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string", "minLength": 1},
        }
        for name in _PATH_PARAM.findall(operation.path)
    ]
    parameters += [
        {
            "name": param.name,
            "in": param.where,
            "required": False,
            "schema": dict(param.schema),
            **({"description": param.description} if param.description else {}),
        }
        for param in operation.params
    ]
    scopes = sorted(scope.value for scope in rule.scopes)
    doc: JsonDict = {
        "operationId": _operation_id(operation),
        "summary": operation.summary,
        "tags": [operation.tag],
        "responses": responses,
        "security": [] if rule.open else [{BEARER_SCHEME: []}],
        "x-scopes": scopes,
    }
    description = operation.description
    if rule.open:
        description = f"{description} Open: no API key.".strip()
    else:
        description = f"{description} Scopes: {', '.join(scopes)}.".strip()
    doc["description"] = description
    if parameters:
        doc["parameters"] = parameters
    if operation.request is not None:
        doc["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": REF.format(model=operation.request.__name__)}
                }
            },
        }
    elif operation.path == WEBHOOK_PATH:
        doc["requestBody"] = _WEBHOOK_BODY
    return doc


def _operation_id(operation: Operation) -> str:
    words = re.sub(r"[{}]", "", operation.path).replace("/api/v1/", "/").strip("/")
    name = re.sub(r"[^0-9a-zA-Z]+", "_", words) or "root"
    return f"{operation.method.lower()}_{name}"


def _models() -> list[type[BaseModel]]:
    found: dict[str, type[BaseModel]] = {"ErrorEnvelope": ErrorEnvelope}
    for operation in OPERATIONS:
        answers: list[Answer] = [operation.ok, *operation.extra.values()]
        if operation.request is not None:
            answers.append(operation.request)
        for answer in answers:
            for one in answer if isinstance(answer, Sequence) else (answer,):
                if isinstance(one, type):
                    found[one.__name__] = one
    return list(found.values())


def build_document() -> JsonDict:
    """The OpenAPI 3.1 document of the API."""
    _, schemas = models_json_schema(
        [(model, "validation") for model in _models()], ref_template=REF
    )
    paths: dict[str, JsonDict] = {}
    for operation in OPERATIONS:
        paths.setdefault(operation.path, {})[operation.method.lower()] = _operation(operation)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Session Manager API",
            "version": __version__,
            "description": (
                "The control plane of a LiveKit-based voice / robot AI backend: sessions, "
                "microservices and events. Every error is `{error, message, timestamp}`. "
                "Without `api_keys` no key is asked for; with them, send "
                "`Authorization: Bearer <key>` (each operation lists the scopes it accepts "
                "in `x-scopes`)."
            ),
        },
        "tags": [
            {"name": "sessions"},
            {"name": "microservices"},
            {"name": "events"},
            {"name": "operations"},
        ],
        "paths": paths,
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {
                BEARER_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key of `api_keys`",
                }
            },
        },
    }


@dataclass(frozen=True, slots=True)
class Rendered:
    body: bytes
    etag: str


@functools.cache
def rendered_document() -> Rendered:
    """The document as JSON, built once per process (it depends on no setting)."""
    body = orjson.dumps(build_document())
    return Rendered(body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
