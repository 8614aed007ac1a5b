"""An async, typed client for the Session Manager's HTTP API (aiohttp).

```python
async with SessionManagerClient("http://127.0.0.1:8080", api_key="…") as manager:
    created = await manager.create_session("user123", ["asr-service-1"])
    session = await manager.get_session(created.session_id)
    async for event in manager.events(session_id=created.session_id):
        print(event.id, event.type)
```

Every non-2xx answer, and every failure to get one (refused connection, timeout), is raised as
one `ApiError` carrying the envelope's `error` and `message` and the HTTP `status` (0 when no
answer came). Every call has a timeout. The answers are pydantic models that ignore nothing: a
field the manager adds later is kept as an extra attribute.

This module imports nothing else of the manager (aiohttp, pydantic and the standard library
only), so the microservice SDK can use it to register.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8080"
URL_ENV = "SESSION_MANAGER_URL"
API_KEY_ENV = "SESSION_MANAGER_API_KEY"
DEFAULT_TIMEOUT = 10.0

# ------------------------------------------------------------------------------------ answers


class _Answer(BaseModel):
    model_config = ConfigDict(extra="allow")


class ClientState(_Answer):
    joined: bool
    joined_at: str | None = None
    left_at: str | None = None


class ServiceSlot(_Answer):
    """One required microservice of a session and the instance filling it."""

    requirement: str
    service_id: str
    type: str | None = None
    endpoint: str
    state: str
    attempts: int = 0
    redispatches: int = 0
    declined_by: list[str] = Field(default_factory=list)
    error: str | None = None
    dispatched_at: str | None = None
    joined_at: str | None = None
    left_at: str | None = None
    join_ms: float | None = None
    dispatch_id: str | None = None


class Session(_Answer):
    session_id: str
    room_name: str
    status: str
    reason: str | None = None
    user_identity: str
    user_name: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    client: ClientState
    services: list[ServiceSlot] = Field(default_factory=list)
    created_at: str
    updated_at: str
    ready_at: str | None = None
    active_at: str | None = None
    terminated_at: str | None = None
    ready_ms: float | None = None
    owner: str | None = None
    deadlines: dict[str, str] = Field(default_factory=dict)


class SessionPage(_Answer):
    sessions: list[Session]
    next_cursor: str | None = None


class CreatedSession(_Answer):
    session_id: str
    room_name: str
    access_token: str
    livekit_url: str
    status: str

    def __repr__(self) -> str:  # never the token
        return f"CreatedSession(session_id={self.session_id!r}, status={self.status!r})"


class Service(_Answer):
    service_id: str
    endpoint: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    status: str
    draining: bool
    sessions: int = 0
    max_sessions: int | None = None
    last_error: str | None = None
    last_check_at: str | None = None
    registered_at: str
    updated_at: str


class ServiceCredentials(_Answer):
    """The answer to register and rotate-secret: the secret the manager signs its calls to the
    service with (handed out this once) and the LiveKit URL those calls name."""

    success: bool = True
    service_id: str
    message: str = ""
    signing_secret: str = ""
    livekit_url: str | None = None

    def __repr__(self) -> str:  # never the secret
        return f"ServiceCredentials(service_id={self.service_id!r}, success={self.success!r})"


class Deregistered(_Answer):
    success: bool
    service_id: str
    message: str


class Event(_Answer):
    id: int
    type: str
    timestamp: str
    session_id: str | None = None
    service_id: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class Health(_Answer):
    status: str
    timestamp: str
    version: str
    problems: list[dict[str, Any]] = Field(default_factory=list)


class _ServiceList(_Answer):
    microservices: list[Service]


# ------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An answer other than 2xx (`status`, and the envelope's `error` and `message`), or no
    usable answer at all: `status` 0 with `error` "Unreachable" or "Timeout", or a 2xx whose body
    is not what the API documents (`error` "UnexpectedAnswer")."""

    def __init__(
        self, status: int, error: str, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(f"HTTP {status} {error}: {message}" if status else f"{error}: {message}")
        self.status = status
        self.error = error
        self.message = message
        self.retry_after = retry_after


def _error_from(status: int, text: str, headers: Mapping[str, str]) -> ApiError:
    error, message = f"HTTP{status}", text.strip()[:300]
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        if isinstance(parsed.get("error"), str):
            error = parsed["error"]
        if isinstance(parsed.get("message"), str):
            message = parsed["message"]
    retry_after: float | None = None
    try:
        retry_after = float(headers.get("Retry-After", ""))
    except ValueError:
        pass
    return ApiError(status, error, message, retry_after)


def _transport_error(error: BaseException) -> ApiError:
    if isinstance(error, TimeoutError):
        return ApiError(0, "Timeout", "no answer in time")
    text = str(error) or type(error).__name__
    return ApiError(0, "Unreachable", text)


Model = TypeVar("Model", bound=BaseModel)

# ------------------------------------------------------------------------------------- client


class SessionManagerClient:
    """The Session Manager's HTTP API. Use as `async with`, or call `aclose()`.

    `api_key` is sent as `Authorization: Bearer <key>`. `timeout` bounds every call (seconds),
    and each call may pass its own. `http` shares an aiohttp session the caller owns (and
    closes): its default headers and timeout then apply where this client sets none.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        http: aiohttp.ClientSession | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._own_http = http is None
        self._http = http

    def __repr__(self) -> str:  # never the key
        return f"SessionManagerClient({self.url!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own_http and self._http is not None:
            await self._http.close()
        self._http = None if self._own_http else self._http

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        return self._http

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        ok_statuses: Iterable[int] = (),
    ) -> Any:
        """One call; returns the parsed JSON of a 2xx answer (or of a status in
        `ok_statuses`), raises ApiError otherwise."""
        all_headers = {**self._headers, **(headers or {})}
        try:
            async with self._session().request(
                method,
                self.url + path,
                json=json_body,
                params=params,
                headers=all_headers,
                timeout=aiohttp.ClientTimeout(total=timeout or self.timeout),
            ) as response:
                text = await response.text()
                status, answer_headers = response.status, response.headers
        except (aiohttp.ClientError, TimeoutError) as error:
            raise _transport_error(error) from error
        if not (200 <= status < 300 or status in ok_statuses):
            raise _error_from(status, text, answer_headers)
        try:
            return json.loads(text) if text else None
        except ValueError:
            raise ApiError(status, "UnexpectedAnswer", "the answer is not JSON") from None

    async def _call(self, model: type[Model], method: str, path: str, **options: Any) -> Model:
        body = await self.request(method, path, **options)
        try:
            return model.model_validate(body)
        except ValidationError as error:
            fields = ", ".join(str(e["loc"][0]) for e in error.errors() if e["loc"]) or "body"
            raise ApiError(
                200, "UnexpectedAnswer", f"the answer does not fit {model.__name__}: {fields}"
            ) from None

    # -------------------------------------------------------------------------- health

    async def health(self, *, timeout: float | None = None) -> Health:
        """`status` "healthy", or "unhealthy" (a 503) with the `problems`."""
        return await self._call(Health, "GET", "/health", timeout=timeout, ok_statuses=(503,))

    # ------------------------------------------------------------------------ sessions

    async def create_session(
        self,
        user_identity: str,
        required_services: Iterable[str],
        *,
        user_name: str | None = None,
        room_name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        wait_until_ready: bool = False,
        timeout_secs: float | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> CreatedSession:
        body: dict[str, Any] = {
            "user_identity": user_identity,
            "required_services": list(required_services),
        }
        optional = {"user_name": user_name, "room_name": room_name, "timeout_secs": timeout_secs}
        body.update({k: v for k, v in optional.items() if v is not None})
        if metadata is not None:
            body["metadata"] = dict(metadata)
        if wait_until_ready:
            body["wait_until_ready"] = True
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        if timeout is None and timeout_secs is not None:
            timeout = max(self.timeout, timeout_secs + 5.0)  # the manager waits that long
        return await self._call(
            CreatedSession,
            "POST",
            "/api/v1/sessions",
            json_body=body,
            headers=headers,
            timeout=timeout,
        )

    async def get_session(self, session_id: str, *, timeout: float | None = None) -> Session:
        return await self._call(Session, "GET", _path("sessions", session_id), timeout=timeout)

    async def list_sessions(
        self,
        *,
        status: str | None = None,
        user_identity: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
        timeout: float | None = None,
    ) -> SessionPage:
        """One page, newest first; pass its `next_cursor` as `cursor` for the next."""
        given = {"status": status, "user_identity": user_identity, "cursor": cursor}
        params = {k: v for k, v in given.items() if v is not None}
        if limit is not None:
            params["limit"] = str(limit)
        return await self._call(
            SessionPage, "GET", "/api/v1/sessions", params=params, timeout=timeout
        )

    async def iter_sessions(
        self,
        *,
        status: str | None = None,
        user_identity: str | None = None,
        page_size: int | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[Session]:
        """Every session, page after page."""
        cursor: str | None = None
        while True:
            page = await self.list_sessions(
                status=status,
                user_identity=user_identity,
                limit=page_size,
                cursor=cursor,
                timeout=timeout,
            )
            for session in page.sessions:
                yield session
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def delete_session(self, session_id: str, *, timeout: float | None = None) -> Session:
        return await self._call(Session, "DELETE", _path("sessions", session_id), timeout=timeout)

    async def add_service(
        self, session_id: str, service: str, *, timeout: float | None = None
    ) -> Session:
        """Add a requirement (a service id, "type:X", "agent:NAME") to a live session."""
        return await self._call(
            Session,
            "POST",
            _path("sessions", session_id, "services"),
            json_body={"service": service},
            timeout=timeout,
        )

    async def remove_service(
        self, session_id: str, service_id: str, *, timeout: float | None = None
    ) -> Session:
        return await self._call(
            Session,
            "DELETE",
            _path("sessions", session_id, "services", service_id),
            timeout=timeout,
        )

    # ------------------------------------------------------------------------ services

    async def register_service(
        self,
        service_id: str,
        endpoint: str,
        metadata: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> ServiceCredentials:
        body = {"service_id": service_id, "endpoint": endpoint, "metadata": dict(metadata or {})}
        return await self._call(
            ServiceCredentials,
            "POST",
            "/api/v1/microservices/register",
            json_body=body,
            timeout=timeout,
        )

    async def get_service(self, service_id: str, *, timeout: float | None = None) -> Service:
        return await self._call(Service, "GET", _path("microservices", service_id), timeout=timeout)

    async def list_services(
        self,
        *,
        type: str | None = None,
        status: str | None = None,
        timeout: float | None = None,
    ) -> list[Service]:
        given = {"type": type, "status": status}
        params = {k: v for k, v in given.items() if v is not None}
        listed = await self._call(
            _ServiceList, "GET", "/api/v1/microservices", params=params, timeout=timeout
        )
        return listed.microservices

    async def update_service(
        self,
        service_id: str,
        *,
        endpoint: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        draining: bool | None = None,
        timeout: float | None = None,
    ) -> Service:
        """Change what is given; `draining=False` takes a drained instance back into service."""
        body: dict[str, Any] = {}
        if endpoint is not None:
            body["endpoint"] = endpoint
        if metadata is not None:
            body["metadata"] = dict(metadata)
        if draining is not None:
            body["draining"] = draining
        return await self._call(
            Service, "PUT", _path("microservices", service_id), json_body=body, timeout=timeout
        )

    async def drain_service(self, service_id: str, *, timeout: float | None = None) -> Service:
        return await self._call(
            Service, "POST", _path("microservices", service_id, "drain"), timeout=timeout
        )

    async def deregister_service(
        self, service_id: str, *, timeout: float | None = None
    ) -> Deregistered:
        return await self._call(
            Deregistered, "DELETE", _path("microservices", service_id), timeout=timeout
        )

    async def rotate_secret(
        self, service_id: str, *, timeout: float | None = None
    ) -> ServiceCredentials:
        return await self._call(
            ServiceCredentials,
            "POST",
            _path("microservices", service_id, "rotate-secret"),
            timeout=timeout,
        )

    # -------------------------------------------------------------------------- events

    async def events(
        self,
        *,
        session_id: str | None = None,
        types: Iterable[str] = (),
        last_event_id: int | None = None,
        follow_session: bool = False,
        reconnect: bool = True,
        retry_delay: float = 0.5,
        connect_timeout: float | None = None,
        idle_timeout: float = 60.0,
    ) -> AsyncIterator[Event]:
        """The live event stream (SSE), from after `last_event_id` (else from now).

        A dropped connection, or one silent for `idle_timeout` (the manager sends a keep-alive
        every 15 s), is reopened with `Last-Event-ID`, so nothing inside the manager's history
        is missed or repeated; past it the manager sends one `EventsDropped` event. With
        `follow_session` (and `session_id`) the session's own stream is read, from its first
        kept event, and the iterator ends after its `SessionTerminated`. An error answer other
        than 429 or 5xx is raised as ApiError; with `reconnect=False` so is every failure.
        """
        if follow_session:
            if session_id is None:
                raise ValueError("follow_session needs a session_id")
            path, params = _path("sessions", session_id, "events"), {}
        else:
            path, params = "/api/v1/events", {"session_id": session_id} if session_id else {}
        type_list = ",".join(types)
        if type_list:
            params["type"] = type_list
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout or self.timeout, sock_read=idle_timeout
        )
        last = last_event_id
        while True:
            headers = {**self._headers, "Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            try:
                async with self._session().get(
                    self.url + path, params=params, headers=headers, timeout=timeout
                ) as response:
                    if response.status != 200:
                        raise _error_from(response.status, await response.text(), response.headers)
                    async for event in _sse_events(response.content):
                        last = event.id
                        yield event
                        if follow_session and event.type == "SessionTerminated":
                            return
                if follow_session:
                    return  # the session's stream ended: the session has
                error: ApiError = ApiError(0, "Unreachable", "the stream ended")
            except ApiError as exc:
                if exc.status != 429 and exc.status < 500:
                    raise
                error = exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = _transport_error(exc)
            if not reconnect:
                raise error
            log.info("event stream lost; reconnecting", extra={"error": str(error), "last": last})
            await asyncio.sleep(error.retry_after or retry_delay)


def _path(*parts: str) -> str:
    return "/api/v1/" + "/".join(quote(part, safe="") for part in parts)


async def _sse_events(stream: aiohttp.StreamReader) -> AsyncIterator[Event]:
    """The events of an SSE stream; comments and frames without data are skipped."""
    data: list[str] = []
    async for raw in stream:
        line = raw.decode("utf-8").rstrip("\r\n")
        if line:
            field, _, value = line.partition(":")
            if field == "data":
                data.append(value.removeprefix(" "))
            continue
        if data:
            try:
                yield Event.model_validate_json("\n".join(data))
            except ValidationError:
                raise ApiError(200, "UnexpectedAnswer", "an event frame is not an event") from None
            data = []
