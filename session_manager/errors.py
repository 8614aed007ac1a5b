"""Errors a caller of the manager can see. The API's one error middleware turns each into the
envelope `{error, message, timestamp}` with its HTTP status; nothing here knows about HTTP."""

from __future__ import annotations


class ManagerError(Exception):
    """Base of every error that reaches a caller; `code` is the envelope's `error` field."""

    status = 500
    code = "InternalError"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        # Response headers that go with the envelope (`Retry-After`, `WWW-Authenticate`).
        self.headers: dict[str, str] = dict(headers or {})


class InvalidRequest(ManagerError):
    status = 400
    code = "InvalidRequest"


class NotFound(ManagerError):
    status = 404
    code = "NotFound"


class Unauthorized(ManagerError):
    """No API key, or one the manager does not know."""

    status = 401
    code = "Unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ManagerError):
    """A known API key without the scope, or not the owner, of what it asks for."""

    status = 403
    code = "Forbidden"


class TooManyRequests(ManagerError):
    """A limit per caller was reached (rate, sessions per user, event streams, services)."""

    status = 429
    code = "TooManyRequests"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after))})


class AtCapacity(ManagerError):
    """The manager runs `max_live_sessions` sessions: no more until some end."""

    status = 503
    code = "AtCapacity"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after))})


class Timeout(ManagerError):
    status = 408
    code = "Timeout"


class LiveKitUnavailable(ManagerError):
    """LiveKit could not be reached, timed out, or answered with a server error."""

    status = 503
    code = "LiveKitUnavailable"


class LiveKitRefused(ManagerError):
    """LiveKit answered but refused the request (a 4xx of its own)."""

    status = 502
    code = "LiveKitError"
    livekit_code = ""


class MicroserviceUnavailable(ManagerError):
    """A required microservice could not be dispatched into the room."""

    status = 502
    code = "MicroserviceUnavailable"


class ShuttingDown(ManagerError):
    status = 503
    code = "ShuttingDown"


class SessionGone(ManagerError):
    """The session ended before it could answer: a DELETE, room_finished or a time limit won
    the race with this request. The caller asked about a session that no longer runs: 409."""

    status = 409
    code = "SessionTerminated"


class Conflict(ManagerError):
    status = 409
    code = "Conflict"


class NoCapacity(ManagerError):
    """No registered instance can take the session: all unhealthy, draining or full."""

    status = 503
    code = "NoCapacity"


class StoreUnavailable(ManagerError):
    """The store cannot take writes now (failing disk, or too much waiting to be written)."""

    status = 503
    code = "StoreUnavailable"


class Unhealthy(ManagerError):
    """A core part of the manager is down; new work is refused until it is back."""

    status = 503
    code = "Unavailable"


class StartupFailed(Exception):
    """Start-up cannot go on; the message is one line for the operator (no traceback)."""
