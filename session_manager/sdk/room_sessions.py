"""The rooms this service is in: joining, leaving, noticing a room that closed, and shutdown.
A join-room for a new session beyond `max_sessions` is declined.

Each session owns its tasks: the connect task (awaited by every join-room request for that
session, cancelled by leave-room and shutdown) and the handler's `on_join` task (cancelled and
awaited whenever the session ends). Teardowns started by LiveKit events, and connection attempts
abandoned after a timeout, live in `OwnedTasks` groups closed at shutdown.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import MappingProxyType

from livekit import rtc

from .handler import JoinedSession, LeaveReason, SessionHandler
from .owned_tasks import OwnedTasks, cancel_and_wait
from .payloads import JoinRoomRequest, SessionStartedRequest
from .redaction import describe_error

logger = logging.getLogger(__name__)

RoomFactory = Callable[[], rtc.Room]
"""Makes an unconnected room; the SDK calls `connect(url, token)` and `disconnect()` on it."""


class JoinStatus(enum.Enum):
    JOINED = "joined"
    ALREADY_JOINED = "already_joined"
    FAILED = "failed"
    SHUTTING_DOWN = "shutting_down"
    AT_CAPACITY = "at_capacity"


@dataclass(frozen=True, slots=True)
class JoinOutcome:
    status: JoinStatus
    message: str


class _Phase(enum.Enum):
    CONNECTING = "connecting"
    JOINED = "joined"
    LEAVING = "leaving"
    FAILED = "failed"
    LEFT = "left"


@dataclass(eq=False)
class _RoomSession:
    request: JoinRoomRequest
    phase: _Phase = _Phase.CONNECTING
    room: rtc.Room | None = None
    joined: JoinedSession | None = None
    connect_task: asyncio.Task[None] | None = None
    handler_task: asyncio.Task[None] | None = None
    failure: str | None = None
    # Set when LiveKit reports a disconnect before the connect call has returned.
    lost_while_connecting: str | None = None
    on_disconnected: Callable[[int], None] | None = None
    # A join-room for this session that came while it was in the room ("Already in room"): if
    # the room drops it next (LiveKit removed it, and the manager, told first, is dispatching it
    # again), it joins again with this newer request instead of staying out.
    rejoin: JoinRoomRequest | None = None

    @property
    def token(self) -> str:
        return self.request.access_token.get_secret_value()

    def log_fields(self) -> dict[str, str]:
        return {"session_id": self.request.session_id, "room_name": self.request.room_name}


def livekit_disconnect_reason(reason: object) -> str:
    """The name of a LiveKit `DisconnectReason` value, or its repr when it has none."""
    if isinstance(reason, int):
        try:
            return rtc.DisconnectReason.Name(reason)  # type: ignore[arg-type]
        except ValueError:
            pass
    return repr(reason)


class RoomSessions:
    def __init__(
        self,
        *,
        service_id: str,
        handler: SessionHandler,
        room_factory: RoomFactory,
        connect_timeout: float,
        disconnect_timeout: float = 5.0,
        abandoned_connect_timeout: float = 60.0,
        teardown_grace: float = 10.0,
        max_sessions: int | None = None,
    ) -> None:
        self._service_id = service_id
        self._max_sessions = max_sessions
        self._handler = handler
        self._room_factory = room_factory
        self._connect_timeout = connect_timeout
        self._disconnect_timeout = disconnect_timeout
        self._abandoned_connect_timeout = abandoned_connect_timeout
        self._teardown_grace = teardown_grace
        self._sessions: dict[str, _RoomSession] = {}
        self._closing = False
        self._teardowns = OwnedTasks("session teardown")
        self._started_callbacks = OwnedTasks("session-started callback")
        self._abandoned_connects = OwnedTasks("abandoned room connect")

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def at_capacity(self) -> bool:
        """Whether `max_sessions` sessions are joined or being joined already."""
        return self._max_sessions is not None and len(self._sessions) >= self._max_sessions

    def joined_ids(self) -> frozenset[str]:
        return frozenset(
            session_id
            for session_id, session in self._sessions.items()
            if session.phase is _Phase.JOINED
        )

    async def join(self, request: JoinRoomRequest) -> JoinOutcome:
        if self._closing:
            return JoinOutcome(JoinStatus.SHUTTING_DOWN, "Service is shutting down")
        session = self._sessions.get(request.session_id)
        first_request = session is None
        if session is None and self.at_capacity:
            logger.info(
                "declined a join-room: at capacity",
                extra={"session_id": request.session_id, "max_sessions": self._max_sessions},
            )
            return JoinOutcome(
                JoinStatus.AT_CAPACITY,
                f"Service is at capacity (max_sessions {self._max_sessions})",
            )
        if session is None:
            session = _RoomSession(request)
            self._sessions[request.session_id] = session
            session.connect_task = asyncio.create_task(
                self._connect(session), name=f"connect room {request.room_name}"
            )
        assert session.connect_task is not None
        # asyncio.wait rather than await: a join-room request that goes away must not cancel a
        # connection that another request for the same session may be waiting on.
        await asyncio.wait({session.connect_task})
        if session.failure is not None:
            status = JoinStatus.SHUTTING_DOWN if self._closing else JoinStatus.FAILED
            return JoinOutcome(status, session.failure)
        if first_request:
            return JoinOutcome(JoinStatus.JOINED, f"Joined room {request.room_name}")
        if session.phase is _Phase.JOINED:
            session.rejoin = request
        # Reported against the room actually joined, whatever this repeated request says.
        return JoinOutcome(
            JoinStatus.ALREADY_JOINED, f"Already in room {session.request.room_name}"
        )

    def started(self, request: SessionStartedRequest) -> bool:
        """A warm pool's room this service is in was handed to a user: the session's context
        is filled in, and the handler's `on_session_started` runs in a task of its own.
        False when the service is not in that session."""
        session = self._sessions.get(request.session_id)
        if session is None or session.phase is not _Phase.JOINED or session.joined is None:
            return False
        joined = replace(
            session.joined,
            metadata=MappingProxyType(dict(request.session_metadata)),
            user_identity=request.user_identity,
            user_name=request.user_name,
        )
        session.joined = joined
        logger.info("session started in a pooled room", extra=session.log_fields())
        self._started_callbacks.spawn(
            self._run_on_session_started(joined), name=f"session-started {request.session_id}"
        )
        return True

    async def _run_on_session_started(self, joined: JoinedSession) -> None:
        try:
            await self._handler.on_session_started(joined)
        except Exception:
            logger.exception("on_session_started failed", extra={"session_id": joined.session_id})

    async def leave(self, session_id: str, reason: str) -> bool:
        """Leave a session; False when the service was not in it."""
        session = self._sessions.get(session_id)
        if session is None:
            return False
        if session.phase is _Phase.CONNECTING:
            await cancel_and_wait(session.connect_task)
            return True
        if session.phase is not _Phase.JOINED:
            return False
        session.phase = _Phase.LEAVING
        await self._end(session, reason)
        return True

    async def close(self) -> None:
        """Refuse new joins, abort joins in progress, leave every room with reason shutdown."""
        self._closing = True
        connecting = [s for s in self._sessions.values() if s.phase is _Phase.CONNECTING]
        for session in connecting:
            await cancel_and_wait(session.connect_task)
        # Recomputed after the awaits: a connect may have completed before it could be cancelled.
        joined = [s for s in self._sessions.values() if s.phase is _Phase.JOINED]
        for session in joined:
            session.phase = _Phase.LEAVING
        await asyncio.gather(*(self._end(s, LeaveReason.SHUTDOWN) for s in joined))
        # Teardowns already started by a room that closed itself are let finish their on_leave.
        await self._teardowns.close(grace=self._teardown_grace)
        await self._started_callbacks.close(grace=0)
        await self._abandoned_connects.close(grace=0)

    async def _connect(self, session: _RoomSession) -> None:
        request = session.request
        log_fields = session.log_fields()
        logger.info("joining room", extra={**log_fields, "livekit_url": request.livekit_url})
        try:
            room = self._room_factory()
            session.room = room

            def on_disconnected(reason: int) -> None:
                self._room_disconnected(session, reason)

            session.on_disconnected = on_disconnected
            # Registered before connecting so that no disconnect can slip past unnoticed.
            room.on("disconnected", on_disconnected)
            await self._connect_within_timeout(session, room)
            if session.lost_while_connecting is not None:
                await self._disconnect_quietly(room, log_fields)
                raise ConnectionError(
                    f"room disconnected while joining ({session.lost_while_connecting})"
                )
        except BaseException as error:
            session.phase = _Phase.FAILED
            if isinstance(error, asyncio.CancelledError):
                session.failure = f"Join of room {request.room_name} was cancelled"
            else:
                session.failure = (
                    f"Failed to join room {request.room_name}: "
                    f"{describe_error(error, session.token)}"
                )
            self._forget(session)
            logger.warning("room join failed", extra={**log_fields, "error": session.failure})
            self._stop_listening(session)
            if isinstance(error, asyncio.CancelledError):
                raise
            return
        session.joined = JoinedSession(
            session_id=request.session_id,
            room_name=request.room_name,
            service_id=self._service_id,
            service_identity=request.service_identity,
            livekit_url=request.livekit_url,
            room=room,
            metadata=MappingProxyType(dict(request.session_metadata)),
            user_identity=request.user_identity or None,
            user_name=request.user_name,
            pooled=request.pooled,
        )
        session.phase = _Phase.JOINED
        session.handler_task = asyncio.create_task(
            self._run_on_join(session), name=f"on_join {request.session_id}"
        )
        logger.info("joined room", extra=log_fields)

    async def _connect_within_timeout(self, session: _RoomSession, room: rtc.Room) -> None:
        request = session.request
        connect = asyncio.create_task(
            room.connect(request.livekit_url, session.token),
            name=f"livekit connect {request.room_name}",
        )
        try:
            done, _ = await asyncio.wait({connect}, timeout=self._connect_timeout)
        finally:
            if not connect.done():
                # Cancelling rtc.Room.connect only stops the Python side from waiting: the native
                # SDK still completes the join, which would leave a ghost participant in the room.
                # So let it finish in the background and disconnect it then.
                self._abandoned_connects.spawn(
                    self._disconnect_when_connected(room, connect, session.log_fields()),
                    name=f"abandon connect {request.room_name}",
                )
        if not done:
            raise TimeoutError(f"no connection within {self._connect_timeout:g} s")
        connect.result()

    async def _disconnect_when_connected(
        self, room: rtc.Room, connect: asyncio.Task[None], log_fields: dict[str, str]
    ) -> None:
        try:
            async with asyncio.timeout(self._abandoned_connect_timeout):
                await connect
        except Exception:
            return  # it never connected, so there is nothing to leave
        logger.info("disconnecting a room whose join was abandoned", extra=log_fields)
        await self._disconnect_quietly(room, log_fields)

    def _room_disconnected(self, session: _RoomSession, reason: int) -> None:
        """LiveKit's `disconnected` event; our own `room.disconnect()` is filtered out by phase."""
        reason_name = livekit_disconnect_reason(reason)
        if session.phase is _Phase.CONNECTING:
            session.lost_while_connecting = reason_name
            return
        if session.phase is not _Phase.JOINED:
            return
        logger.info(
            "room disconnected", extra={**session.log_fields(), "livekit_reason": reason_name}
        )
        session.phase = _Phase.LEAVING
        leave_reason = f"{LeaveReason.ROOM_DISCONNECTED}:{reason_name}"
        self._teardowns.spawn(
            self._end_then_rejoin(session, leave_reason),
            name=f"teardown {session.request.session_id}",
        )

    async def _end_then_rejoin(self, session: _RoomSession, reason: str) -> None:
        await self._end(session, reason)
        request = session.rejoin
        if request is None or self._closing or request.session_id in self._sessions:
            return  # nothing asked for it again, or a newer join-room is already at it
        if self.at_capacity:  # another session took its place meanwhile
            logger.info("not joining again: at capacity", extra=session.log_fields())
            return
        logger.info(
            "joining again: the manager asked while the room was dropping us",
            extra=session.log_fields(),
        )
        again = _RoomSession(request)
        self._sessions[request.session_id] = again
        # Owned like any connect: close() cancels it while it is CONNECTING.
        again.connect_task = asyncio.create_task(
            self._connect(again), name=f"connect room {request.room_name}"
        )

    async def _run_on_join(self, session: _RoomSession) -> None:
        assert session.joined is not None
        try:
            await self._handler.on_join(session.joined)
        except Exception:
            logger.exception("on_join failed", extra=session.log_fields())
            # A handler that crashed cannot serve the room; staying in it would only look alive.
            if session.phase is _Phase.JOINED:
                session.phase = _Phase.LEAVING
                self._teardowns.spawn(
                    self._end(session, LeaveReason.ON_JOIN_FAILED),
                    name=f"teardown {session.request.session_id}",
                )

    async def _end(self, session: _RoomSession, reason: str) -> None:
        """Cancel on_join, disconnect, call on_leave. The caller has set phase LEAVING."""
        reason = str(reason)  # a plain str for the handler and the logs, not the enum member
        log_fields = session.log_fields()
        self._forget(session)
        assert session.room is not None and session.joined is not None
        self._stop_listening(session)
        await cancel_and_wait(session.handler_task)
        await self._disconnect_quietly(session.room, log_fields)
        try:
            await self._handler.on_leave(session.joined, reason)
        except Exception:
            logger.exception("on_leave failed", extra=log_fields)
        session.phase = _Phase.LEFT
        logger.info("left room", extra={**log_fields, "reason": reason})

    async def _disconnect_quietly(self, room: rtc.Room, log_fields: dict[str, str]) -> None:
        try:
            async with asyncio.timeout(self._disconnect_timeout):
                await room.disconnect()
        except Exception as error:
            # Leaving must go on (on_leave, shutdown) even if the room cannot say goodbye.
            logger.warning(
                "room disconnect failed", extra={**log_fields, "error": describe_error(error)}
            )

    def _stop_listening(self, session: _RoomSession) -> None:
        if session.room is not None and session.on_disconnected is not None:
            session.room.off("disconnected", session.on_disconnected)
            session.on_disconnected = None

    def _forget(self, session: _RoomSession) -> None:
        if self._sessions.get(session.request.session_id) is session:
            del self._sessions[session.request.session_id]
