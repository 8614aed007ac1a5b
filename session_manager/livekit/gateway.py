"""Rooms and tokens through LiveKit's server API, each call bounded by a timeout."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import aiohttp
from livekit import api

from session_manager.errors import LiveKitRefused, LiveKitUnavailable
from session_manager.livekit.tokens import SERVER_TOKEN_REFRESH, TokenMinter
from session_manager.livekit.webhooks import RoomEvent, participant_present
from session_manager.observers import report

log = logging.getLogger(__name__)

T = TypeVar("T")
# Told of each call to LiveKit's API: (method, outcome: ok, refused or error, seconds).
CallObserver = Callable[[str, str, float], None]


@dataclass(frozen=True)
class LiveKitEndpoint:
    """Where LiveKit's server API is reached and which URL clients are told to use."""

    api_url: str
    public_url: str
    api_key: str
    api_secret: str


def _http_url(url: str) -> str:
    if url.startswith("ws"):
        return "http" + url[2:]
    return url


def _ws_url(url: str) -> str:
    if url.startswith("http"):
        return "ws" + url[4:]
    return url


def make_endpoint(
    url: str, api_key: str, api_secret: str, public_url: str | None
) -> LiveKitEndpoint:
    return LiveKitEndpoint(
        api_url=_http_url(url),
        public_url=_ws_url(public_url or url),
        api_key=api_key,
        api_secret=api_secret,
    )


class LiveKitGateway:
    """The manager's only door to LiveKit's server API."""

    def __init__(
        self,
        endpoint: LiveKitEndpoint,
        *,
        timeout: float,
        on_call: CallObserver | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._timeout = timeout
        self._on_call = on_call
        self._tokens = TokenMinter(endpoint.api_key, endpoint.api_secret)
        self._http: aiohttp.ClientSession | None = None
        self._api: api.LiveKitAPI | None = None
        self._api_renew_at = 0.0
        self._admin: api.room_service.RoomService | None = None
        self._dispatcher: api.agent_dispatch_service.AgentDispatchService | None = None

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            connector=aiohttp.TCPConnector(limit=256),
        )

    def _client(self) -> api.LiveKitAPI:
        """The server-API client, signed with one token reused for a few minutes: signing a
        fresh one for every call (what a key/secret client does) cost more than the call."""
        if self._http is None:
            raise RuntimeError("LiveKitGateway used before start()")
        if self._api is None or time.monotonic() >= self._api_renew_at:
            # failover=False: our own timeout and error mapping apply; region discovery is a
            # LiveKit Cloud feature and would retry a dead local server for many seconds.
            self._api = api.LiveKitAPI.with_token(
                self._tokens.server(), self.endpoint.api_url, session=self._http, failover=False
            )
            self._api_renew_at = time.monotonic() + SERVER_TOKEN_REFRESH
        return self._api

    async def aclose(self) -> None:
        self._api = None  # it borrows our HTTP session: nothing of its own to close
        self._admin = None
        self._dispatcher = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    @property
    def _rooms(self) -> api.room_service.RoomService:
        return self._client().room

    def _room_admin(self) -> api.room_service.RoomService:
        """Room-admin calls (RemoveParticipant) need a token naming the room, which our shared
        server token cannot: this client signs one per call. They are rare."""
        if self._http is None:
            raise RuntimeError("LiveKitGateway used before start()")
        if self._admin is None:
            self._admin = api.room_service.RoomService(
                self._http,
                self.endpoint.api_url,
                self.endpoint.api_key,
                self.endpoint.api_secret,
                failover=False,
            )
        return self._admin

    async def probe(self) -> None:
        """Return if LiveKit answers `GET /` with 200 "OK" within the timeout (livekit-server
        does once it is up; it needs no token); raise LiveKitUnavailable otherwise."""
        if self._http is None:
            raise RuntimeError("LiveKitGateway used before start()")
        url = self.endpoint.api_url.rstrip("/") + "/"
        # What callers and /health read names no address (issue 9: LiveKit's internal address
        # stays out of error messages); the log says where.
        try:
            async with asyncio.timeout(self._timeout), self._http.get(url) as response:
                body = await response.text(errors="replace")
        except TimeoutError as exc:
            log.debug("livekit probe failed", extra={"url": url, "error": "timeout"})
            raise LiveKitUnavailable(
                f"LiveKit unreachable: no answer within {self._timeout:g} s"
            ) from exc
        except aiohttp.ClientError as exc:
            log.debug("livekit probe failed", extra={"url": url, "error": str(exc)})
            raise LiveKitUnavailable(f"LiveKit unreachable: {_kind_of(exc)}") from exc
        if response.status != 200 or body.strip() != "OK":
            raise LiveKitUnavailable(f"LiveKit unreachable: GET / answered {response.status}")

    async def list_rooms(self) -> dict[str, str]:
        """Every room LiveKit has now: its name and its metadata."""
        response = await self._call("ListRooms", self._rooms.list_rooms(api.ListRoomsRequest()))
        return {room.name: room.metadata for room in response.rooms}

    async def list_participants(self, room: str) -> tuple[RoomEvent, ...] | None:
        """Who is in a room now, one participant_joined event each; None if the room is gone."""
        request = api.ListParticipantsRequest(room=room)
        try:
            response = await self._call(
                "ListParticipants", self._room_admin().list_participants(request)
            )
        except LiveKitRefused as exc:
            if exc.livekit_code != api.ServerErrorCode.NOT_FOUND:
                raise
            return None
        return tuple(
            participant_present(
                room,
                info.identity,
                info.sid,
                dict(info.attributes),
                api.ParticipantInfo.Kind.Name(info.kind),
            )
            for info in response.participants
        )

    async def create_room(
        self, name: str, *, metadata: str, empty_timeout: int, departure_timeout: int = 0
    ) -> None:
        """`departure_timeout` 0: LiveKit's own (20 s)."""
        request = api.CreateRoomRequest(
            name=name,
            metadata=metadata,
            empty_timeout=empty_timeout,
            departure_timeout=departure_timeout,
        )
        await self._call("CreateRoom", self._rooms.create_room(request))

    async def delete_room(self, name: str) -> None:
        """Delete a room; one that is already gone counts as deleted."""
        try:
            await self._call(
                "DeleteRoom", self._rooms.delete_room(api.DeleteRoomRequest(room=name))
            )
        except LiveKitRefused as exc:
            if exc.livekit_code != api.ServerErrorCode.NOT_FOUND:
                raise

    async def update_room_metadata(self, room: str, metadata: str) -> None:
        """Replace a room's metadata (a warm pool's room handed to its user says whose it is)."""
        request = api.UpdateRoomMetadataRequest(room=room, metadata=metadata)
        await self._call("UpdateRoomMetadata", self._room_admin().update_room_metadata(request))

    async def remove_participant(self, room: str, identity: str) -> None:
        """Disconnect one participant; one (or a room) that is already gone counts as removed."""
        request = api.RoomParticipantIdentity(room=room, identity=identity)
        try:
            await self._call("RemoveParticipant", self._room_admin().remove_participant(request))
        except LiveKitRefused as exc:
            if exc.livekit_code != api.ServerErrorCode.NOT_FOUND:
                raise

    async def create_dispatch(self, room: str, agent_name: str, metadata: str) -> str:
        """Ask LiveKit to hand a job for `room` to a livekit-agents worker registered as
        `agent_name`; returns the dispatch's id. LiveKit accepts it even when no such worker
        is connected: nothing joins then."""
        request = api.CreateAgentDispatchRequest(
            agent_name=agent_name, room=room, metadata=metadata
        )
        dispatch = await self._call(
            "CreateDispatch", self._dispatch_admin().create_dispatch(request)
        )
        return str(dispatch.id)

    async def delete_dispatch(self, dispatch_id: str, room: str) -> None:
        """Withdraw a dispatch (LiveKit ends its job: the agent leaves); one that, or whose
        room, is already gone counts as deleted."""
        try:
            await self._call(
                "DeleteDispatch", self._dispatch_admin().delete_dispatch(dispatch_id, room)
            )
        except LiveKitRefused as exc:
            if exc.livekit_code != api.ServerErrorCode.NOT_FOUND:
                raise

    def _dispatch_admin(self) -> api.agent_dispatch_service.AgentDispatchService:
        """Agent dispatch needs room-admin rights naming the room, as RemoveParticipant does:
        this client signs a token per call."""
        if self._http is None:
            raise RuntimeError("LiveKitGateway used before start()")
        if self._dispatcher is None:
            self._dispatcher = api.agent_dispatch_service.AgentDispatchService(
                self._http,
                self.endpoint.api_url,
                self.endpoint.api_key,
                self.endpoint.api_secret,
                failover=False,
            )
        return self._dispatcher

    def mint_token(
        self,
        *,
        identity: str,
        room_name: str,
        ttl: timedelta,
        name: str | None = None,
        attributes: dict[str, str] | None = None,
        kind: str | None = None,
    ) -> str:
        """A participant token for `room_name`; `kind` is LiveKit's participant kind
        (`tokens.KIND_AGENT` for services), none for a standard participant (the user)."""
        return self._tokens.participant(
            identity=identity,
            room_name=room_name,
            ttl=ttl,
            name=name,
            attributes=attributes,
            kind=kind,
        )

    async def _call(self, method: str, call: Awaitable[T]) -> T:
        """One call to LiveKit's API within the timeout, its errors as the manager's, timed for
        `on_call` (a call its caller gave up on is not counted)."""
        started = time.perf_counter()
        outcome: str | None = "error"
        try:
            result = await self._call_unobserved(method, call)
            outcome = "ok"
            return result
        except LiveKitRefused:
            outcome = "refused"
            raise
        except asyncio.CancelledError:
            outcome = None
            raise
        finally:
            if outcome is not None:
                report(self._on_call, method, outcome, time.perf_counter() - started)

    async def _call_unobserved(self, method: str, call: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._timeout):  # no extra task, unlike wait_for
                return await call
        except api.ServerError as exc:
            log.debug("livekit refused", extra={"method": method, "code": exc.code})
            if exc.status >= 500:
                raise LiveKitUnavailable(f"LiveKit {method} failed: {exc.message}") from exc
            refused = LiveKitRefused(f"LiveKit refused {method}: {exc.code}: {exc.message}")
            refused.livekit_code = exc.code
            raise refused from exc
        except TimeoutError as exc:
            raise LiveKitUnavailable(f"LiveKit {method} timed out after {self._timeout}s") from exc
        except aiohttp.ClientError as exc:
            log.debug("livekit call failed", extra={"method": method, "error": str(exc)})
            raise LiveKitUnavailable(f"LiveKit is unreachable ({method}): {_kind_of(exc)}") from exc


def _kind_of(error: aiohttp.ClientError) -> str:
    """What went wrong, without the address aiohttp puts in its messages."""
    if isinstance(error, aiohttp.ClientConnectorError):
        number = error.os_error.errno  # its strerror may quote the address: only the number
        return f"connection failed ({os.strerror(number)})" if number else "connection failed"
    return type(error).__name__
