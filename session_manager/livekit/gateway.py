"""Rooms and tokens through LiveKit's server API, each call bounded by a timeout."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import aiohttp
from livekit import api

from session_manager.errors import LiveKitRefused, LiveKitUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")


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

    def __init__(self, endpoint: LiveKitEndpoint, *, timeout: float) -> None:
        self.endpoint = endpoint
        self._timeout = timeout
        self._http: aiohttp.ClientSession | None = None
        self._api: api.LiveKitAPI | None = None

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            connector=aiohttp.TCPConnector(limit=256),
        )
        # failover=False: our own timeout and error mapping apply; region discovery is a
        # LiveKit Cloud feature and would retry a dead local server for many seconds.
        self._api = api.LiveKitAPI(
            self.endpoint.api_url,
            self.endpoint.api_key,
            self.endpoint.api_secret,
            session=self._http,
            failover=False,
        )

    async def aclose(self) -> None:
        if self._api is not None:
            await self._api.aclose()
            self._api = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    @property
    def _rooms(self) -> api.room_service.RoomService:
        if self._api is None:
            raise RuntimeError("LiveKitGateway used before start()")
        return self._api.room

    async def create_room(self, name: str, *, metadata: str, empty_timeout: int) -> None:
        request = api.CreateRoomRequest(name=name, metadata=metadata, empty_timeout=empty_timeout)
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

    async def list_room_names(self) -> list[str]:
        response = await self._call("ListRooms", self._rooms.list_rooms(api.ListRoomsRequest()))
        return [room.name for room in response.rooms]

    def mint_token(
        self,
        *,
        identity: str,
        room_name: str,
        ttl: timedelta,
        name: str | None = None,
        attributes: dict[str, str] | None = None,
    ) -> str:
        grants = api.VideoGrants(
            room_join=True,
            room=room_name,
            can_publish=True,
            can_subscribe=True,
            can_publish_data=True,
        )
        token = (
            api.AccessToken(self.endpoint.api_key, self.endpoint.api_secret)
            .with_identity(identity)
            .with_ttl(ttl)
            .with_grants(grants)
        )
        if name:
            token = token.with_name(name)
        if attributes:
            token = token.with_attributes(attributes)
        return token.to_jwt()

    async def _call(self, method: str, call: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(call, self._timeout)
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
            raise LiveKitUnavailable(f"LiveKit is unreachable ({method}): {exc}") from exc
