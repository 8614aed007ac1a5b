"""Registering the service with the Session Manager, retrying while the manager is not up.

The register answer carries the registration's `signing_secret` (the manager signs every call to
the service with it) and the `livekit_url` the manager hands out. A service that finds its id
already registered (a restart) cannot know the secret the manager kept, so it asks for a new one
(`POST /api/v1/microservices/{id}/rotate-secret`) before it takes itself out of draining.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import aiohttp
from standardwebhooks import Webhook

from session_manager.client import (
    DEFAULT_TIMEOUT,
    ApiError,
    ServiceCredentials,
    SessionManagerClient,
)

from .payloads import RegisterRequest
from .redaction import describe_error

logger = logging.getLogger(__name__)

REGISTER_PATH = "/api/v1/microservices/register"
SERVICES_PATH = "/api/v1/microservices"


class RegistrationError(RuntimeError):
    """The manager refused the registration for good (a 4xx other than "already exists"), or
    its answer lacks the signing secret (a manager older than this SDK)."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the manager's register (or rotate-secret) answer tells the service."""

    signing_secret: str
    livekit_url: str | None

    def __repr__(self) -> str:  # never the secret
        return f"Credentials(livekit_url={self.livekit_url!r})"


OnCredentials = Callable[[Credentials], None]


@dataclass(frozen=True, slots=True)
class RetryBackoff:
    """Capped exponential backoff between registration attempts."""

    initial_delay: float = 0.2
    max_delay: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.initial_delay <= 0 or self.max_delay < self.initial_delay or self.multiplier < 1:
            raise ValueError("need 0 < initial_delay <= max_delay and multiplier >= 1")

    def delays(self) -> Iterator[float]:
        delay = self.initial_delay
        while True:
            yield delay
            delay = min(delay * self.multiplier, self.max_delay)


class _Verdict(enum.Enum):
    REGISTERED = "registered"
    ALREADY_REGISTERED = "already_registered"
    RETRY = "retry"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class _Answer:
    verdict: _Verdict
    detail: str
    body: ServiceCredentials | None = None  # the answer to register or rotate-secret


def _credentials(body: ServiceCredentials | None) -> Credentials | None:
    if body is None or not body.signing_secret:
        return None
    try:
        Webhook(body.signing_secret)  # a whsec_ secret the verifier can use
    except Exception:
        return None
    return Credentials(body.signing_secret, body.livekit_url)


def _client(http: aiohttp.ClientSession, manager_url: str) -> SessionManagerClient:
    """The API client on the runner's session: its API key header and its request timeout."""
    timeout = http.timeout.total or DEFAULT_TIMEOUT
    return SessionManagerClient(manager_url, http=http, timeout=timeout)


def _failed(error: ApiError) -> _Answer:
    """What an ApiError from the client means for the registration."""
    if error.status == 0:  # refused, reset or timed out: the manager is not (yet) reachable
        cause = error.__cause__
        return _Answer(_Verdict.RETRY, describe_error(cause) if cause else error.message)
    detail = f"HTTP {error.status}: {error.message}"
    if 200 <= error.status < 300:  # an answer without the fields it should have
        return _Answer(_Verdict.REGISTERED, detail)
    # The manager answers a duplicate id with 400 "Service ID already exists": a restarted
    # service is still known to it, so carry on instead of failing to come up.
    if error.status == 400 and "already exists" in error.message.lower():
        return _Answer(_Verdict.ALREADY_REGISTERED, error.message)
    if error.status >= 500 or error.status in (408, 429):
        return _Answer(_Verdict.RETRY, detail)
    return _Answer(_Verdict.REFUSED, detail)


def _granted(answer: ServiceCredentials) -> _Answer:
    if not answer.success:
        return _Answer(_Verdict.REFUSED, f"HTTP 200: {answer.message}")
    return _Answer(_Verdict.REGISTERED, answer.message, answer)


async def _attempt(
    http: aiohttp.ClientSession, manager_url: str, payload: RegisterRequest
) -> _Answer:
    try:
        answer = await _client(http, manager_url).register_service(
            payload.service_id, payload.endpoint, payload.metadata
        )
    except ApiError as error:
        return _failed(error)
    return _granted(answer)


async def _refresh(
    http: aiohttp.ClientSession, manager_url: str, payload: RegisterRequest
) -> _Answer:
    try:
        await _client(http, manager_url).update_service(
            payload.service_id, endpoint=payload.endpoint, metadata=payload.metadata, draining=False
        )
    except ApiError as error:
        if 200 <= error.status < 300:  # updated; only the answer's shape is unexpected
            return _Answer(_Verdict.REGISTERED, error.message)
        # The registration vanished in between (404): try registering again.
        return _Answer(_Verdict.RETRY, _failed(error).detail)
    return _Answer(_Verdict.REGISTERED, "updated")


async def _rotate(http: aiohttp.ClientSession, manager_url: str, service_id: str) -> _Answer:
    try:
        answer = _granted(await _client(http, manager_url).rotate_secret(service_id))
    except ApiError as error:
        answer = _failed(error)
        if error.status == 404:  # the registration vanished in between: register again
            return _Answer(_Verdict.RETRY, answer.detail)
    if answer.verdict is _Verdict.ALREADY_REGISTERED:  # not an answer rotate gives
        return _Answer(_Verdict.REFUSED, answer.detail)
    return answer


async def rotate_at_manager(
    http: aiohttp.ClientSession, manager_url: str, service_id: str
) -> Credentials:
    """Ask the manager for a new signing secret (in force there at once). Raises
    RegistrationError when it cannot be had."""
    answer = await _rotate(http, manager_url, service_id)
    credentials = _credentials(answer.body) if answer.verdict is _Verdict.REGISTERED else None
    if credentials is None:
        raise RegistrationError(
            f"Session manager did not rotate the signing secret of {service_id!r}: "
            f"{answer.detail or 'no signing_secret in its answer'}"
        )
    return credentials


async def drain_at_manager(
    http: aiohttp.ClientSession, manager_url: str, service_id: str
) -> str | None:
    """Ask the manager to send this instance no new sessions; best effort, one attempt.
    Returns what went wrong, if anything."""
    try:
        await _client(http, manager_url).drain_service(service_id)
    except ApiError as error:
        if 200 <= error.status < 300:  # drained; only the answer's shape is unexpected
            return None
        return _failed(error).detail
    return None


async def register_until_accepted(
    http: aiohttp.ClientSession,
    manager_url: str,
    payload: RegisterRequest,
    backoff: RetryBackoff,
    on_credentials: OnCredentials | None = None,
) -> Credentials:
    """POST the registration until the manager accepts it; retries forever on transient errors.
    Returns the signing secret and LiveKit URL the manager answered, and hands them to
    `on_credentials` as soon as they are known (before a refresh takes the service out of
    draining, so that no call signed with the new secret finds the service without it).

    Raises RegistrationError when the manager refuses it. Stops only by cancellation otherwise,
    so the caller bounds it (the runner cancels it at shutdown). `http` carries the per-request
    timeout.
    """
    url = manager_url.rstrip("/") + REGISTER_PATH
    base = manager_url.rstrip("/")
    log_fields = {"service_id": payload.service_id, "endpoint": payload.endpoint, "url": url}
    learn = on_credentials or (lambda _: None)
    for attempt, delay in enumerate(backoff.delays(), start=1):
        answer = await _attempt(http, base, payload)
        if answer.verdict is _Verdict.REGISTERED:
            credentials = _required_credentials(answer, payload.service_id)
            learn(credentials)
            logger.info("registered with the session manager", extra=log_fields)
            return credentials
        if answer.verdict is _Verdict.ALREADY_REGISTERED:
            # A restarted service: it cannot know the secret the manager kept, so it asks for a
            # new one; then it brings the manager's record up to date (it may have moved to
            # another port, and it drained itself when it stopped).
            answer = await _rotate(http, manager_url, payload.service_id)
            if answer.verdict is _Verdict.REGISTERED:
                credentials = _required_credentials(answer, payload.service_id)
                learn(credentials)
                answer = await _refresh(http, manager_url, payload)
                if answer.verdict is _Verdict.REGISTERED:
                    logger.info("registration refreshed with the session manager", extra=log_fields)
                    return credentials
        if answer.verdict is _Verdict.REFUSED:
            raise RegistrationError(
                f"Session manager at {url} refused to register service "
                f"{payload.service_id!r}: {answer.detail}"
            )
        logger.warning(
            "registration attempt failed; retrying",
            extra={**log_fields, "attempt": attempt, "retry_in_s": delay, "error": answer.detail},
        )
        await asyncio.sleep(delay)
    raise AssertionError("unreachable: the backoff delays never end")


def _required_credentials(answer: _Answer, service_id: str) -> Credentials:
    credentials = _credentials(answer.body)
    if credentials is None:
        raise RegistrationError(
            f"Session manager answered the registration of {service_id!r} without a valid "
            "signing_secret: it is older than this SDK, whose service refuses unsigned calls"
        )
    return credentials
