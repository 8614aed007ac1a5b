"""The HTTP client that calls microservices: join-room (timeouts, bounded retries, backoff),
leave-room and health.

The wire format is fixed by services written for the earlier implementation:
POST {endpoint}/join-room {session_id, room_name, service_identity, access_token, livekit_url}
answered by 2xx {success, message, session_id, service_id}. Fields were only ever added after
those five (`session_metadata`, `user_identity`, `user_name`: whose session it is and what it is
for); services written before them ignore them.

Every call is signed (Standard Webhooks headers, see `session_manager.events.signing`) with the
secret of the registration it is for, and with the secrets of the other registrations at the
same endpoint (see `Registry.signing_secrets`); services that verify nothing ignore the headers.
Each attempt is a new message (its own `webhook-id`): a retry is not refused as a replay.

Every call goes only where `endpoint_allow` lets it (`session_manager.egress`: the IP literal is
checked here, a host name as the client resolves it), never follows a redirect (a 3xx is a
failure), and reads at most 64 KiB of any answer. What a failure reports is generic: "not
reachable", never the text of a connection error, which could tell a stranger what lives on the
manager's network.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp
import orjson

from session_manager.egress import EndpointGuard, safe_origin
from session_manager.events.model import JsonDict, has_sensitive_key, scrub
from session_manager.events.signing import Signer

log = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 64 * 1024  # read at most this much of any answer of a service
_READ_CHUNK = 16 * 1024

SigningSecrets = Callable[[str, str], Sequence[str]]
JoinRoomObserver = Callable[[str, "DispatchOutcome"], None]
"""(service id, outcome) of every finished join-room call: for metrics."""
"""(service id, endpoint) -> the secrets a call to that service at that endpoint is signed
with, its own first; empty: sent unsigned."""


@dataclass(frozen=True)
class JoinRoomRequest:
    session_id: str
    room_name: str
    service_identity: str
    access_token: str
    livekit_url: str
    # Added fields: what the session is for (see `service_metadata`) and whose it is.
    session_metadata: JsonDict = field(default_factory=dict)
    user_identity: str = ""
    user_name: str | None = None
    # A warm pool's member (`session_manager.pools`): no user yet; `session-started` brings the
    # user and the metadata when one takes the room. Sent only when true.
    pooled: bool = False

    def body(self) -> bytes:
        body: JsonDict = {
            "session_id": self.session_id,
            "room_name": self.room_name,
            "service_identity": self.service_identity,
            "access_token": self.access_token,
            "livekit_url": self.livekit_url,
            "session_metadata": self.session_metadata,
            "user_identity": self.user_identity,
            "user_name": self.user_name,
        }
        if self.pooled:
            body["pooled"] = True
        return orjson.dumps(body)


@dataclass(frozen=True)
class SessionStartedRequest:
    """`POST {endpoint}/session-started`: a warm pool's room a service is already in was handed
    to a user; the session-context fields of join-room, now known."""

    session_id: str
    room_name: str
    service_identity: str
    session_metadata: JsonDict
    user_identity: str
    user_name: str | None
    pool: str

    def body(self) -> bytes:
        return orjson.dumps(self.__dict__)


def service_metadata(metadata: JsonDict) -> JsonDict:
    """The session's metadata as join-room hands it to a service: the user's create-session
    `metadata` without the keys (at any depth) that name a credential, by the rule events
    follow. The call leaves the manager for an endpoint anyone with a `service` key may have
    registered, and the only credential it is meant to carry is the service's own token."""
    if not has_sensitive_key(metadata):
        return metadata
    removed: list[str] = []
    kept: JsonDict = scrub(metadata, "", removed)
    log.debug("credential left out of session_metadata", extra={"keys": ",".join(removed)})
    return kept


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


class _TooLarge(Exception):
    """An answer longer than MAX_ANSWER_BYTES."""


class _NotAllowed(Exception):
    """The endpoint is not one `endpoint_allow` lets the manager call."""


class MicroserviceClient:
    """Calls microservices on behalf of session actors (and the health monitor, with a client
    of its own); one pooled HTTP client for all of them. `http` should resolve host names
    through the guard's resolver (see `egress.GuardedResolver`)."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        policy: DispatchPolicy,
        *,
        guard: EndpointGuard | None = None,
        secrets: SigningSecrets | None = None,
        on_join_room: JoinRoomObserver | None = None,
    ) -> None:
        self._http = http
        self._policy = policy
        self._guard = guard
        self._secrets = secrets
        self._on_join_room = on_join_room

    def _headers(self, service_id: str | None, endpoint: str, body: bytes) -> dict[str, str]:
        headers = {"Content-Type": "application/json"} if body else {}
        secrets = self._secrets(service_id, endpoint) if self._secrets and service_id else ()
        if secrets:
            headers.update(Signer(*secrets).headers(body))
        return headers

    def _check(self, endpoint: str) -> None:
        refusal = self._guard.check_call(endpoint) if self._guard is not None else None
        if refusal is not None:
            log.warning(
                "call to a service endpoint refused",
                extra={"endpoint": safe_origin(endpoint), "reason": refusal},
            )
            raise _NotAllowed

    async def _call(
        self,
        method: str,
        endpoint: str,
        path: str,
        *,
        service_id: str | None,
        body: bytes,
        timeout: float,
    ) -> tuple[int, bytes]:
        """One signed call: (status, at most MAX_ANSWER_BYTES of the answer). Raises
        _NotAllowed, _TooLarge, TimeoutError, aiohttp.ClientError."""
        self._check(endpoint)
        url = f"{endpoint.rstrip('/')}/{path}"
        try:
            async with self._http.request(
                method,
                url,
                data=body or None,
                headers=self._headers(service_id, endpoint, body),
                timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=False,
            ) as response:
                return response.status, await _read_capped(response)
        except aiohttp.ClientError as exc:
            # The details stay in the operator's log; the caller is told something generic.
            log.debug(
                "call to a service failed",
                extra={"endpoint": safe_origin(endpoint), "path": path, "error": repr(exc)},
            )
            raise

    async def join_room(self, endpoint: str, request: JoinRoomRequest) -> DispatchOutcome:
        outcome = await self._join_room(endpoint, request)
        if self._on_join_room is not None:
            self._on_join_room(request.service_identity, outcome)
        return outcome

    async def _join_room(self, endpoint: str, request: JoinRoomRequest) -> DispatchOutcome:
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
        try:
            status, raw = await self._call(
                "POST",
                endpoint,
                "join-room",
                service_id=request.service_identity,
                body=request.body(),
                timeout=self._policy.timeout,
            )
        except _NotAllowed:
            raise _Final(f"join-room {NOT_ALLOWED}") from None
        except _TooLarge:
            raise _Final(f"join-room {TOO_LARGE}") from None
        except TimeoutError:
            raise _Retryable(f"join-room timed out after {self._policy.timeout}s") from None
        except aiohttp.ClientError as exc:
            raise _Retryable(_failed("join-room", exc)) from None

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

    async def leave_room(
        self, endpoint: str, session_id: str, room_name: str, *, service_id: str | None = None
    ) -> str | None:
        """Ask a service to leave a room; one attempt, best effort. Returns the error, if any.
        `service_id`: the registration whose secret signs the call."""
        body = orjson.dumps({"session_id": session_id, "room_name": room_name})
        return await self._simple_call(
            "leave-room", "POST", endpoint, service_id, body, self._policy.timeout
        )

    async def session_started(self, endpoint: str, request: SessionStartedRequest) -> str | None:
        """Tell a service in a warm pool's room whose session it now is; one attempt, signed
        like join-room. Returns the error, if any; a 404 (a service that does not implement
        it) is no error: it keeps serving, without the context."""
        try:
            status, _ = await self._call(
                "POST",
                endpoint,
                "session-started",
                service_id=request.service_identity,
                body=request.body(),
                timeout=self._policy.timeout,
            )
        except _NotAllowed:
            return f"session-started {NOT_ALLOWED}"
        except _TooLarge:
            return f"session-started {TOO_LARGE}"
        except TimeoutError:
            return f"session-started timed out after {self._policy.timeout}s"
        except aiohttp.ClientError as exc:
            return _failed("session-started", exc)
        if status < 300 or status == 404:
            return None
        return f"session-started answered HTTP {status}"

    async def check_health(
        self, endpoint: str, timeout: float, *, service_id: str | None = None
    ) -> str | None:
        """`GET {endpoint}/health` (signed over the empty body); None when it answers 2xx,
        else what went wrong."""
        return await self._simple_call("health", "GET", endpoint, service_id, b"", timeout)

    async def _simple_call(
        self,
        what: str,
        method: str,
        endpoint: str,
        service_id: str | None,
        body: bytes,
        timeout: float,
    ) -> str | None:
        try:
            status, _ = await self._call(
                method, endpoint, what, service_id=service_id, body=body, timeout=timeout
            )
        except _NotAllowed:
            return f"{what} {NOT_ALLOWED}"
        except _TooLarge:
            return f"{what} {TOO_LARGE}"
        except TimeoutError:
            return f"{what} timed out after {timeout}s"
        except aiohttp.ClientError as exc:
            return _failed(what, exc)
        return None if status < 300 else f"{what} answered HTTP {status}"


NOT_ALLOWED = "failed: endpoint not allowed (endpoint_allow)"
TOO_LARGE = f"answered with more than {MAX_ANSWER_BYTES // 1024} KiB"


def _failed(what: str, exc: aiohttp.ClientError) -> str:
    """A failure to reach a service, told without the words of the connection error (they may
    name internal addresses, or say which ports answer)."""
    if isinstance(exc, aiohttp.ClientConnectorError):  # refused, no route, name refused
        return f"{what} failed: endpoint not reachable"
    return f"{what} failed: connection lost ({type(exc).__name__})"


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    """The answer's body, at most MAX_ANSWER_BYTES of it; _TooLarge past that."""
    length = response.content_length
    if length is not None and length > MAX_ANSWER_BYTES:
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(_READ_CHUNK):
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


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
