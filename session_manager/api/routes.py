"""HTTP handlers. Each validates its input and puts one command on the supervisor's inbox; none
touches a session's state. Paths, fields and status codes follow the user's API document."""

from __future__ import annotations

import logging

import orjson
from aiohttp import web
from pydantic import BaseModel

from session_manager import __version__
from session_manager.api.models import (
    CreateSessionRequest,
    CreateSessionResponse,
    HealthResponse,
    RegisterServiceRequest,
    RegisterServiceResponse,
)
from session_manager.clock import now_rfc3339
from session_manager.daemon import WEBHOOK_PATH, Daemon
from session_manager.errors import InvalidRequest
from session_manager.livekit.webhooks import WebhookRejected
from session_manager.session.messages import CreateOptions, SessionCreated
from session_manager.session.record import JsonDict
from session_manager.supervisor import (
    CreateSession,
    GetSession,
    LiveKitEvent,
    NewSession,
    RegisterService,
)

log = logging.getLogger(__name__)

DAEMON = web.AppKey("daemon", Daemon)
routes = web.RouteTableDef()


def json_response(body: BaseModel | dict[str, object], status: int = 200) -> web.Response:
    payload = body.model_dump(mode="json") if isinstance(body, BaseModel) else body
    return web.Response(
        status=status, body=orjson.dumps(payload), content_type="application/json", charset="utf-8"
    )


async def _body(request: web.Request) -> bytes:
    raw = await request.read()  # raises 413 past client_max_size
    if not raw.strip():
        raise InvalidRequest("Request body is empty; a JSON object is required")
    return raw


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    return json_response(HealthResponse(timestamp=now_rfc3339(), version=__version__))


@routes.post("/api/v1/microservices/register")
async def register_microservice(request: web.Request) -> web.Response:
    body = RegisterServiceRequest.model_validate_json(await _body(request))
    supervisor = request.app[DAEMON].supervisor
    await supervisor.ask(
        lambda reply: RegisterService(body.service_id, body.endpoint, body.metadata, reply)
    )
    return json_response(RegisterServiceResponse(service_id=body.service_id))


@routes.post("/api/v1/create-session")
async def create_session(request: web.Request) -> web.Response:
    body = CreateSessionRequest.model_validate_json(await _body(request))
    if body.timeout_secs is not None and not body.wait_until_ready:
        raise InvalidRequest("timeout_secs: only meaningful with wait_until_ready: true")
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
    )
    created: SessionCreated = await request.app[DAEMON].supervisor.ask(
        lambda reply: CreateSession(spec, reply)
    )
    return json_response(
        CreateSessionResponse(
            session_id=created.session_id,
            room_name=created.room_name,
            access_token=created.access_token,
            livekit_url=created.livekit_url,
            status=created.status,
        )
    )


@routes.get("/api/v1/sessions/{session_id}")
async def get_session(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    view: JsonDict = await request.app[DAEMON].supervisor.ask(
        lambda reply: GetSession(session_id, reply)
    )
    return json_response(view)


@routes.post(WEBHOOK_PATH)
async def livekit_webhook(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    body = (await request.read()).decode("utf-8", errors="replace")
    try:
        event = daemon.webhooks.verify(body, request.headers.get("Authorization", ""))
    except WebhookRejected as exc:
        log.warning("webhook rejected", extra={"reason": str(exc)})
        raise web.HTTPUnauthorized(text=f"webhook rejected: {exc}") from None
    daemon.supervisor.tell(LiveKitEvent(event))
    return web.Response(text="ok")
