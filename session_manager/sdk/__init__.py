"""SDK for writing Session Manager microservices.

A microservice subclasses `SessionHandler` and runs it with `MicroserviceRunner` (or the blocking
`run_service`). The SDK serves the endpoints the manager calls (join-room, leave-room, health),
connects to the LiveKit room of each session, registers the service with the manager, and shuts
everything down cleanly. It acts only on calls the manager signed (Standard Webhooks, with the
secret of the registration) and joins only the LiveKit servers it trusts (`verification`).

This package is self-contained: it imports nothing from the rest of `session_manager`, so it can
be vendored into a microservice on its own.
"""

from .handler import JoinedSession, LeaveReason, SessionHandler
from .log_format import ExtraFieldsFormatter, configure_logging
from .registration import Credentials, RegistrationError, RetryBackoff
from .room_sessions import RoomFactory
from .runner import MicroserviceRunner, ServiceClosedError, run_service
from .verification import CallVerifier, TrustedLiveKit

__all__ = [
    "CallVerifier",
    "Credentials",
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
    "configure_logging",
    "run_service",
]
