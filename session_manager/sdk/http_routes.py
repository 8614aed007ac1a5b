"""The HTTP endpoints the manager calls on a microservice: join-room, leave-room,
session-started (a warm pool's room handed to a user), health.

join-room and leave-room act only on calls the manager signed (`CallVerifier`): anything else
is answered 401 and does nothing. /health answers unsigned probes (load balancers, people) and
verifies a signed one, so a manager signing with a secret this service does not hold sees 401
and marks it Unhealthy. join-room connects only to a LiveKit the service trusts
(`TrustedLiveKit`); another `livekit_url` is answered 403 without connecting.
"""

from __future__ import annotations

import json
import logging

from aiohttp import web
from pydantic import BaseModel, ValidationError

from .handler import LeaveReason
from .payloads import (
    HealthReply,
    JoinRoomRequest,
    LeaveRoomRequest,
    ServiceReply,
    SessionStartedRequest,
)
from .room_sessions import JoinStatus, RoomSessions
from .verification import SIGNED_HEADERS, CallVerifier, TrustedLiveKit

logger = logging.getLogger(__name__)

_JOIN_STATUS_HTTP = {
    JoinStatus.JOINED: 200,
    JoinStatus.ALREADY_JOINED: 200,
    JoinStatus.FAILED: 500,
    JoinStatus.SHUTTING_DOWN: 503,
    JoinStatus.AT_CAPACITY: 503,  # the manager takes 503 as a decline: it asks another instance
}


def _json(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(
        text=model.model_dump_json(), status=status, content_type="application/json"
    )


def _session_id_of(body: bytes) -> str | None:
    """The session_id of a body that failed validation, when it has a usable one."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    if isinstance(parsed, dict):
        value = parsed.get("session_id")
        if isinstance(value, str) and value:
            return value
    return None


def _describe_invalid(error: ValidationError) -> str:
    # Inputs are left out on purpose: they may contain the access token.
    problems = [
        f"{'.'.join(str(part) for part in issue['loc']) or 'body'}: {issue['msg']}"
        for issue in error.errors(include_input=False, include_url=False)
    ]
    return "; ".join(problems)


class MicroserviceRoutes:
    def __init__(
        self,
        service_id: str,
        sessions: RoomSessions,
        verifier: CallVerifier,
        trusted_livekit: TrustedLiveKit,
    ) -> None:
        self._service_id = service_id
        self._sessions = sessions
        self._verifier = verifier
        self._trusted_livekit = trusted_livekit

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/join-room", self.join_room)
        app.router.add_post("/leave-room", self.leave_room)
        app.router.add_post("/session-started", self.session_started)
        app.router.add_get("/health", self.health)
        return app

    def _reply(
        self, *, success: bool, message: str, session_id: str | None, status: int = 200
    ) -> web.Response:
        reply = ServiceReply(
            success=success, message=message, session_id=session_id, service_id=self._service_id
        )
        return _json(reply, status)

    def _bad_request(self, what: str, body: bytes, error: ValidationError) -> web.Response:
        message = f"Invalid {what} request: {_describe_invalid(error)}"
        session_id = _session_id_of(body)
        logger.warning("rejected malformed request", extra={"path": what, "session_id": session_id})
        return self._reply(success=False, message=message, session_id=session_id, status=400)

    async def _unverified(
        self, what: str, request: web.Request, body: bytes
    ) -> web.Response | None:
        """401 for a call the manager did not sign (or signed too long ago, or already sent)."""
        reason = await self._verifier.verify(body, request.headers)
        if reason is None:
            return None
        logger.warning("refused an unverified call", extra={"path": what, "reason": reason})
        return self._reply(
            success=False, message=f"Unauthorized: {reason}", session_id=None, status=401
        )

    async def join_room(self, request: web.Request) -> web.Response:
        body = await request.read()
        refused = await self._unverified("join-room", request, body)
        if refused is not None:
            return refused
        try:
            join = JoinRoomRequest.model_validate_json(body)
        except ValidationError as error:
            return self._bad_request("join-room", body, error)
        if not self._trusted_livekit.trusts(join.livekit_url):
            logger.warning(
                "refused a join-room naming an untrusted LiveKit",
                extra={"session_id": join.session_id},
            )
            return self._reply(
                success=False,
                message="livekit_url is not a LiveKit server this service trusts",
                session_id=join.session_id,
                status=403,
            )
        outcome = await self._sessions.join(join)
        status = _JOIN_STATUS_HTTP[outcome.status]
        return self._reply(
            success=status == 200,
            message=outcome.message,
            session_id=join.session_id,
            status=status,
        )

    async def leave_room(self, request: web.Request) -> web.Response:
        body = await request.read()
        refused = await self._unverified("leave-room", request, body)
        if refused is not None:
            return refused
        try:
            leave = LeaveRoomRequest.model_validate_json(body)
        except ValidationError as error:
            return self._bad_request("leave-room", body, error)
        was_joined = await self._sessions.leave(leave.session_id, LeaveReason.LEAVE_REQUESTED)
        # Leaving a session twice is not an error: the manager may retry a leave it timed out on.
        message = "Left the room" if was_joined else "Session was not joined; nothing to leave"
        return self._reply(success=True, message=message, session_id=leave.session_id)

    async def session_started(self, request: web.Request) -> web.Response:
        body = await request.read()
        refused = await self._unverified("session-started", request, body)
        if refused is not None:
            return refused
        try:
            started = SessionStartedRequest.model_validate_json(body)
        except ValidationError as error:
            return self._bad_request("session-started", body, error)
        if not self._sessions.started(started):
            return self._reply(
                success=False,
                message="Session is not joined",
                session_id=started.session_id,
                status=404,
            )
        return self._reply(success=True, message="Session started", session_id=started.session_id)

    async def health(self, request: web.Request) -> web.Response:
        if any(name in request.headers for name in SIGNED_HEADERS):
            refused = await self._unverified("health", request, await request.read())
            if refused is not None:
                return refused
        sessions = len(self._sessions.joined_ids())
        if self._sessions.closing:
            # Lets the manager stop sending work to a service that is on its way out.
            reply = HealthReply(
                status="shutting_down", service_id=self._service_id, sessions=sessions
            )
            return _json(reply, 503)
        reply = HealthReply(status="healthy", service_id=self._service_id, sessions=sessions)
        return _json(reply)
