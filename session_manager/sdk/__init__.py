"""SDK for writing Session Manager microservices.

A microservice is a `SessionHandler` subclass or an ``async def entrypoint(session)`` function,
run with `MicroserviceRunner` (or the blocking `run_service`, which also reads the command line
and the environment: see `cli`). The SDK serves the endpoints the manager calls (join-room,
leave-room, health), connects to the LiveKit room of each session, registers the service with
the manager, declines sessions beyond its `max_sessions`, and shuts everything down cleanly. It
acts only on calls the manager signed (Standard Webhooks, with the secret of the registration)
and joins only the LiveKit servers it trusts (`verification`).

This package imports nothing from the rest of `session_manager` but the API client
(`session_manager.client`, itself only aiohttp and pydantic), which it registers with; the two
can be vendored into a microservice on their own.

It needs the livekit realtime SDK, the package's `sdk` extra (`pip install
'session-manager[sdk]'`); the manager itself runs without it.
"""

try:
    from livekit import rtc as _rtc  # noqa: F401  (only to say what is missing, once)
except ImportError as missing:
    raise ImportError(
        "session_manager.sdk needs the livekit realtime SDK: pip install 'session-manager[sdk]'"
    ) from missing

from .cli import API_KEY_ENV, MANAGER_URL_ENV, add_service_arguments, runner_options
from .handler import Entrypoint, JoinedSession, LeaveReason, SessionHandler
from .log_format import ExtraFieldsFormatter, configure_logging
from .registration import Credentials, RegistrationError, RetryBackoff
from .room_sessions import RoomFactory
from .runner import MicroserviceRunner, ServiceClosedError, run_service
from .verification import CallVerifier, TrustedLiveKit

__all__ = [
    "API_KEY_ENV",
    "MANAGER_URL_ENV",
    "CallVerifier",
    "Credentials",
    "Entrypoint",
    "ExtraFieldsFormatter",
    "JoinedSession",
    "LeaveReason",
    "MicroserviceRunner",
    "RegistrationError",
    "RetryBackoff",
    "RoomFactory",
    "ServiceClosedError",
    "SessionHandler",
    "TrustedLiveKit",
    "add_service_arguments",
    "configure_logging",
    "run_service",
    "runner_options",
]
