"""HTTP handlers. Each validates its input and puts one command on the supervisor's inbox; none
touches a session's state. Paths, fields and status codes follow the user's API document."""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Mapping
from typing import TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel

from session_manager import __version__
from session_manager.api.auth import access_of
from session_manager.api.limits import (
    MAX_IDEMPOTENCY_KEY,
    MAX_SESSIONS_PAGE,
    InputLimits,
    idempotency_key_ok,
)
from session_manager.api.metrics import render as render_metrics
from session_manager.api.models import (
    AddServiceRequest,
    CreateSessionRequest,
    CreateSessionResponse,
    HealthResponse,
    RegisterServiceRequest,
    RegisterServiceResponse,
    UpdateServiceRequest,
)
from session_manager.clock import now_rfc3339
from session_manager.commands import (
    AddSessionService,
    CreateSession,
    DeleteSession,
    DeregisterService,
    DrainService,
    GetService,
    GetSession,
    ListServices,
    ListSessions,
    LiveKitEvent,
    NewSession,
    RegisterService,
    RemoveSessionService,
    RotateServiceSecret,
    UpdateService,
)
from session_manager.daemon import WEBHOOK_PATH, Daemon
from session_manager.errors import InvalidRequest, ManagerError, ShuttingDown
from session_manager.livekit.webhooks import RELEVANT_KINDS, WebhookRejected, webhook_kind
from session_manager.logs import TRACE
from session_manager.registry.presence import CLOSE_TIMEOUT, MAX_MESSAGE
from session_manager.session.messages import CreateOptions, SessionCreated
from session_manager.session.record import JsonDict
from session_manager.session.states import SessionStatus
from session_manager.supervisor import Supervisor

DEFAULT_PAGE = 50
MAX_PAGE = MAX_SESSIONS_PAGE

log = logging.getLogger(__name__)

DAEMON = web.AppKey("daemon", Daemon)
routes = web.RouteTableDef()


def json_response(body: BaseModel | dict[str, object], status: int = 200) -> web.Response:
    payload = body.model_dump(mode="json") if isinstance(body, BaseModel) else body
    return web.Response(
        status=status, body=orjson.dumps(payload), content_type="application/json", charset="utf-8"
    )


def _supervisor(request: web.Request) -> Supervisor:
    return request.app[DAEMON].supervisor


def _int_param(query: Mapping[str, str], name: str, *, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"{name}: must be a whole number") from None
    if not low <= value <= high:
        raise InvalidRequest(f"{name}: must be between {low} and {high}")
    return value


def encode_cursor(view: JsonDict) -> str:
    raw = orjson.dumps([view["created_at"], view["session_id"]])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        created_at, session_id = orjson.loads(
            base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        )
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise InvalidRequest("cursor: not a cursor this API returned") from None
    if not isinstance(created_at, str) or not isinstance(session_id, str):
        raise InvalidRequest("cursor: not a cursor this API returned")
    return created_at, session_id


async def _body(request: web.Request) -> bytes:
    raw = await request.read()  # raises 413 past client_max_size
    if not raw.strip():
        raise InvalidRequest("Request body is empty; a JSON object is required")
    return raw


Body = TypeVar("Body", bound=BaseModel)


async def _validated(request: web.Request, model: type[Body]) -> Body:
    # The settings-dependent bounds (metadata size, longest duration_limit) reach the
    # validators as the validation context.
    limits = InputLimits.from_settings(request.app[DAEMON].settings)
    return model.model_validate_json(await _body(request), context=limits.context())


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """200 and the spec's body while the manager can serve; otherwise 503, `status:
    "unhealthy"` and which core part is down, why and since when (see the README: readiness
    and liveness)."""
    problems = request.app[DAEMON].health_problems()
    timestamp = now_rfc3339()
    if not problems:
        return json_response(HealthResponse(timestamp=timestamp, version=__version__))
    body: dict[str, object] = {
        "status": "unhealthy",
        "timestamp": timestamp,
        "version": __version__,
        "problems": [problem.view() for problem in problems],
    }
    return json_response(body, status=503)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    return render_metrics(request.app[DAEMON].metrics)


@routes.get("/api/v1/pools")
async def list_pools(request: web.Request) -> web.Response:
    """The warm pools (`warm_pools`), their members and counters: a read of the keeper's book,
    like /metrics (it changes nothing)."""
    return json_response({"pools": _supervisor(request).pool_views()})


@routes.post("/api/v1/microservices/register")
async def register_microservice(request: web.Request) -> web.Response:
    body = await _validated(request, RegisterServiceRequest)
    access = access_of(request)
    daemon = request.app[DAEMON]
    await daemon.egress.check_registration(body.endpoint)  # endpoint_allow, before anything
    registered: JsonDict = await _supervisor(request).ask(
        lambda reply: RegisterService(
            body.service_id, body.endpoint, body.metadata, reply, access=access
        )
    )
    answer = RegisterServiceResponse(
        service_id=body.service_id,
        signing_secret=registered["signing_secret"],
        livekit_url=daemon.gateway.endpoint.public_url,
    )
    return _no_store(json_response(answer))


def _no_store(response: web.Response) -> web.Response:
    """An answer that carries a secret is kept by no cache."""
    response.headers["Cache-Control"] = "no-store"
    return response


IDEMPOTENCY_HEADER = "Idempotency-Key"


@routes.post("/api/v1/create-session")
@routes.post("/api/v1/sessions")  # the REST spelling of the same thing
async def create_session(request: web.Request) -> web.Response:
    body = await _validated(request, CreateSessionRequest)
    if body.timeout_secs is not None and not body.wait_until_ready:
        raise InvalidRequest("timeout_secs: only meaningful with wait_until_ready: true")
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is not None and not idempotency_key_ok(key):
        raise InvalidRequest(
            f"{IDEMPOTENCY_HEADER}: must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"
        )
    owner = access_of(request).owner
    if key is not None and owner is not None:
        key = f"{owner}/{key}"  # each API key has its own idempotency keys
    spec = NewSession(
        user_identity=body.user_identity,
        user_name=body.user_name,
        room_name=body.room_name,
        metadata=body.metadata,
        required_services=body.required_services,
        # Without timeout_secs a waiting caller is bounded by join_timeout, like everyone else.
        options=CreateOptions(
            wait_until_ready=body.wait_until_ready, wait_timeout=body.timeout_secs
        ),
        owner=owner,
    )
    # "The same body" means the same request once parsed: key order and spacing do not count.
    # Only a request with a key is compared, so only then is the hash worth its cost.
    body_hash = (
        hashlib.sha256(
            orjson.dumps(body.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
        ).hexdigest()
        if key is not None
        else ""
    )
    created: SessionCreated = await _supervisor(request).ask(
        lambda reply: CreateSession(spec, reply, key, body_hash)
    )
    await _stored_before_answered(request, created)
    return json_response(
        CreateSessionResponse(
            session_id=created.session_id,
            room_name=created.room_name,
            access_token=created.access_token,
            livekit_url=created.livekit_url,
            status=created.status,
        )
    )


async def _stored_before_answered(request: web.Request, created: SessionCreated) -> None:
    """Wait until the session's view as answered (no longer Creating) is written. The actor
    publishes it right after it settles the creator's reply, so a flush now covers it; without
    this a kill just after the answer leaves the session stored as Creating, and the next
    process ends it as never answered and deletes the room its user holds a token for. A store
    that cannot write now does not hold the answer back: the session runs in this process."""
    daemon = request.app[DAEMON]
    try:
        await daemon.store.flush(daemon.settings.store_flush_timeout)
    except ManagerError as exc:
        log.warning(
            "created session answered before its view could be written",
            extra={"session_id": created.session_id, "error": exc.message},
        )


async def _readable_everywhere(request: web.Request, session_id: str) -> None:
    """Several managers on one Redis: the change just answered is written before the answer,
    so a read on any process right after sees it (it reads from Redis). One process alone
    reads its own live sessions from memory, and needs no wait."""
    daemon = request.app[DAEMON]
    if daemon.cluster is None:
        return
    try:
        await daemon.store.flush(daemon.settings.store_flush_timeout)
    except ManagerError as exc:
        log.warning(
            "change answered before it could be written",
            extra={"session_id": session_id, "error": exc.message},
        )


@routes.get("/api/v1/sessions")
async def list_sessions(request: web.Request) -> web.Response:
    query = request.query
    status = query.get("status")
    if status is not None and status not in {s.value for s in SessionStatus}:
        raise InvalidRequest(f"status: must be one of {', '.join(s.value for s in SessionStatus)}")
    limit = _int_param(query, "limit", default=DEFAULT_PAGE, low=1, high=MAX_PAGE)
    before = decode_cursor(query["cursor"]) if query.get("cursor") else None
    views: list[JsonDict] = await _supervisor(request).ask(
        lambda reply: ListSessions(
            status, query.get("user_identity"), limit + 1, before, reply, access=access_of(request)
        )
    )
    page, more = views[:limit], len(views) > limit
    next_cursor = encode_cursor(page[-1]) if more else None
    return json_response({"sessions": page, "next_cursor": next_cursor})


@routes.get("/api/v1/sessions/{session_id}")
async def get_session(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    view: JsonDict = await _supervisor(request).ask(
        lambda reply: GetSession(session_id, reply, access=access_of(request))
    )
    return json_response(view)


@routes.delete("/api/v1/sessions/{session_id}")
async def delete_session(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    view: JsonDict = await _supervisor(request).ask(
        lambda reply: DeleteSession(session_id, reply, access=access_of(request))
    )
    await _readable_everywhere(request, session_id)
    return json_response(view)


@routes.post("/api/v1/sessions/{session_id}/services")
async def add_session_service(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    body = await _validated(request, AddServiceRequest)
    view: JsonDict = await _supervisor(request).ask(
        lambda reply: AddSessionService(session_id, body.service, reply, access=access_of(request))
    )
    await _readable_everywhere(request, session_id)
    return json_response(view)


@routes.delete("/api/v1/sessions/{session_id}/services/{service_id}")
async def remove_session_service(request: web.Request) -> web.Response:
    session_id, service_id = request.match_info["session_id"], request.match_info["service_id"]
    view: JsonDict = await _supervisor(request).ask(
        lambda reply: RemoveSessionService(session_id, service_id, reply, access=access_of(request))
    )
    await _readable_everywhere(request, session_id)
    return json_response(view)


@routes.get("/api/v1/microservices")
async def list_microservices(request: web.Request) -> web.Response:
    service_type, status = request.query.get("type"), request.query.get("status")
    views: list[JsonDict] = await _supervisor(request).ask(
        lambda reply: ListServices(service_type, status, reply)
    )
    return json_response({"microservices": views})


@routes.get("/api/v1/microservices/{service_id}")
async def get_microservice(request: web.Request) -> web.Response:
    service_id = request.match_info["service_id"]
    view: JsonDict = await _supervisor(request).ask(
        lambda reply: GetService(service_id, reply, access=access_of(request))
    )
    return json_response(view)


@routes.put("/api/v1/microservices/{service_id}")
async def update_microservice(request: web.Request) -> web.Response:
    service_id = request.match_info["service_id"]
    body = await _validated(request, UpdateServiceRequest)
    access = access_of(request)
    if body.endpoint is not None:
        await request.app[DAEMON].egress.check_registration(body.endpoint)
    view: JsonDict = await _supervisor(request).ask(
        lambda reply: UpdateService(
            service_id, body.endpoint, body.metadata, body.draining, reply, access=access
        )
    )
    return json_response(view)


@routes.delete("/api/v1/microservices/{service_id}")
async def deregister_microservice(request: web.Request) -> web.Response:
    service_id = request.match_info["service_id"]
    await _supervisor(request).ask(
        lambda reply: DeregisterService(service_id, reply, access=access_of(request))
    )
    return json_response(
        {"success": True, "service_id": service_id, "message": "Microservice deregistered"}
    )


@routes.post("/api/v1/microservices/{service_id}/drain")
async def drain_microservice(request: web.Request) -> web.Response:
    service_id = request.match_info["service_id"]
    view: JsonDict = await _supervisor(request).ask(
        lambda reply: DrainService(service_id, reply, access=access_of(request))
    )
    return json_response(view)


@routes.post("/api/v1/microservices/{service_id}/rotate-secret")
async def rotate_microservice_secret(request: web.Request) -> web.Response:
    """A new signing secret for the registration, in force at once; answered this once."""
    service_id = request.match_info["service_id"]
    rotated: JsonDict = await _supervisor(request).ask(
        lambda reply: RotateServiceSecret(service_id, reply, access=access_of(request))
    )
    answer = {
        "success": True,
        "service_id": service_id,
        "signing_secret": rotated["signing_secret"],
        "livekit_url": request.app[DAEMON].gateway.endpoint.public_url,
        "message": "Signing secret rotated",
    }
    return _no_store(json_response(answer))


@routes.get("/api/v1/microservices/{service_id}/presence")
async def microservice_presence(request: web.Request) -> web.StreamResponse:
    """An SDK instance's presence: a WebSocket it holds for as long as it runs; its loss
    without a goodbye is the death of the process (`registry.presence`). Only for a
    registered instance, with the key that registered it; one per instance (a new one
    replaces the old); messages of at most MAX_MESSAGE bytes."""
    service_id = request.match_info["service_id"]
    board = request.app[DAEMON].presence
    if board.closing:
        raise ShuttingDown("the session manager is shutting down")
    await _supervisor(request).ask(
        lambda reply: GetService(service_id, reply, access=access_of(request))
    )
    socket = web.WebSocketResponse(timeout=CLOSE_TIMEOUT, max_msg_size=MAX_MESSAGE, compress=False)
    if not socket.can_prepare(request).ok:
        raise InvalidRequest("presence: a WebSocket upgrade is required")
    await socket.prepare(request)
    await board.serve(service_id, socket)
    return socket


@routes.post(WEBHOOK_PATH)
async def livekit_webhook(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    body = await request.read()
    kind = webhook_kind(body)
    if kind is None:
        raise InvalidRequest("webhook body is not a JSON object with an event")
    if kind not in RELEVANT_KINDS:
        # Nothing acts on it, so nothing needs to trust it: skip the signature check.
        log.log(TRACE, "webhook ignored", extra={"kind": kind})
        return web.Response(text="ignored")
    authorization = request.headers.get("Authorization", "")
    if not authorization.isascii():  # a token is ASCII; the JWT library fails on anything else
        raise web.HTTPUnauthorized(text="webhook rejected: Authorization is not a token")
    try:
        event = daemon.livekit_webhooks.verify(body, authorization)
    except WebhookRejected as exc:
        log.warning("webhook rejected", extra={"reason": str(exc)})
        # The caller gets the reason ("bad signature"), not the JWT library's words about it.
        reason = str(exc).partition(": ")[0]
        raise web.HTTPUnauthorized(text=f"webhook rejected: {reason}") from None
    daemon.supervisor.tell(LiveKitEvent(event))
    return web.Response(text="ok")
