"""The HTTP client that asks microservices to join a room: timeouts, bounded retries, backoff.

The wire format is fixed by services written for the earlier implementation:
POST {endpoint}/join-room {session_id, room_name, service_identity, access_token, livekit_url}
answered by 2xx {success, message, session_id, service_id}.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

import aiohttp
import orjson

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JoinRoomRequest:
    session_id: str
    room_name: str
    service_identity: str
    access_token: str
    livekit_url: str

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "session_id": self.session_id,
                "room_name": self.room_name,
                "service_identity": self.service_identity,
                "access_token": self.access_token,
                "livekit_url": self.livekit_url,
            }
        )


@dataclass(frozen=True)
class DispatchOutcome:
    ok: bool
    attempts: int
    error: str | None = None
    message: str | None = None
    elapsed_ms: float = 0.0
    # The service answered but said no (HTTP 409 or 503, or success: false): another instance
    # may be tried at once, without back-off.
    declined: bool = False


class _Retryable(Exception):
    """A failure worth another attempt: no answer, a timeout, a 5xx."""


class _Final(Exception):
    """A failure another attempt will not fix: a 4xx, an answer we cannot read."""


class _Declined(Exception):
    """The service refused this session (busy, draining, …): ask another instance instead."""


DECLINE_STATUSES = frozenset({409, 503})


@dataclass(frozen=True)
class DispatchPolicy:
    timeout: float
    attempts: int
    backoff: float


class MicroserviceClient:
    """Calls microservices on behalf of session actors; one pooled HTTP client for all of them."""

    def __init__(self, http: aiohttp.ClientSession, policy: DispatchPolicy) -> None:
        self._http = http
        self._policy = policy

    async def join_room(self, endpoint: str, request: JoinRoomRequest) -> DispatchOutcome:
        started = time.monotonic()
        error = "not attempted"
        attempt = 0
        for attempt in range(1, self._policy.attempts + 1):
            try:
                message = await self._post_join(endpoint, request)
            except _Declined as exc:
                return DispatchOutcome(
                    False, attempt, error=str(exc), elapsed_ms=_ms_since(started), declined=True
                )
            except _Final as exc:
                error = str(exc)
                break
            except _Retryable as exc:
                error = str(exc)
                log.debug(
                    "join-room attempt failed",
                    extra={
                        "service_id": request.service_identity,
                        "attempt": attempt,
                        "error": error,
                    },
                )
                if attempt < self._policy.attempts:
                    await asyncio.sleep(self._backoff(attempt))
                continue
            return DispatchOutcome(True, attempt, message=message, elapsed_ms=_ms_since(started))
        return DispatchOutcome(False, attempt, error=error, elapsed_ms=_ms_since(started))

    def _backoff(self, attempt: int) -> float:
        # Exponential with full jitter, so a burst of failed dispatches does not retry in step.
        return random.uniform(0, self._policy.backoff * (2 ** (attempt - 1)))

    async def _post_join(self, endpoint: str, request: JoinRoomRequest) -> str:
        url = f"{endpoint.rstrip('/')}/join-room"
        timeout = aiohttp.ClientTimeout(total=self._policy.timeout)
        try:
            async with self._http.post(
                url,
                data=request.body(),
                headers={"Content-Type": "application/json"},
                timeout=timeout,
            ) as response:
                raw = await response.read()
                status = response.status
        except TimeoutError:
            raise _Retryable(f"join-room timed out after {self._policy.timeout}s") from None
        except aiohttp.ClientError as exc:
            raise _Retryable(f"join-room failed: {type(exc).__name__}: {exc}") from None

        if status in DECLINE_STATUSES:
            raise _Declined(f"service declined join-room: HTTP {status}{_reason(raw)}")
        if status >= 500:
            raise _Retryable(f"join-room answered HTTP {status}{_reason(raw)}")
        if status >= 300:
            raise _Final(f"join-room answered HTTP {status}{_reason(raw)}")
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise _Final("join-room answered with a body that is not JSON") from None
        if not isinstance(answer, dict):
            raise _Final("join-room answered with JSON that is not an object")
        if answer.get("success") is not True:
            raise _Declined(
                f"service declined join-room: {answer.get('message') or 'no reason given'}"
            )
        message = answer.get("message")
        return message if isinstance(message, str) else ""

    async def leave_room(self, endpoint: str, session_id: str, room_name: str) -> str | None:
        """Ask a service to leave a room; one attempt, best effort. Returns the error, if any."""
        url = f"{endpoint.rstrip('/')}/leave-room"
        body = orjson.dumps({"session_id": session_id, "room_name": room_name})
        try:
            async with self._http.post(
                url,
                data=body,
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=self._policy.timeout),
            ) as response:
                await response.read()
                return (
                    None if response.status < 300 else f"leave-room answered HTTP {response.status}"
                )
        except TimeoutError:
            return f"leave-room timed out after {self._policy.timeout}s"
        except aiohttp.ClientError as exc:
            return f"leave-room failed: {type(exc).__name__}: {exc}"

    async def check_health(self, endpoint: str, timeout: float) -> str | None:
        """`GET {endpoint}/health`; None when it answers 2xx, else what went wrong."""
        url = f"{endpoint.rstrip('/')}/health"
        try:
            async with self._http.get(
                url, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response:
                await response.read()
                return None if response.status < 300 else f"health answered HTTP {response.status}"
        except TimeoutError:
            return f"health check timed out after {timeout}s"
        except aiohttp.ClientError as exc:
            return f"health check failed: {type(exc).__name__}: {exc}"


def _reason(raw: bytes) -> str:
    """A short reason from an error body, when it carries one."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return ""
    if isinstance(body, dict):
        for key in ("message", "error"):
            if isinstance(body.get(key), str):
                return f": {body[key][:200]}"
    return ""


def _ms_since(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
