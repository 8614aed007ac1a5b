"""What a starting manager does with the sessions a previous process left live.

A process that stops with shutdown_mode `keep`, or is killed, leaves its sessions in the store as
they were: their rooms, clients and services carry on in LiveKit. The next process takes them over
before it serves anything: it reads every stored session not yet Terminated, asks LiveKit which
rooms exist and who is in each, and decides per session:

- Running (WaitingForServices, Ready, Active) and its room is there: adopted. Its actor comes
  back with the room's participants (`Adopt`), which it compares with its record.
- Its room is gone: Terminated, "room lost".
- Creating: its creator never had an answer, so no user holds its token: Terminated, and its
  room (if it was made) deleted.
- Terminating: the end the previous process had begun is finished.
- With the managed LiveKit the rooms ended with the previous process: every one is Terminated,
  "LiveKit restarted".

Rooms this deployment created (tagged in their metadata) that no adopted session owns are
deleted. If LiveKit cannot be asked, sessions are adopted as stored; the room sweep compares
them with LiveKit once it answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field

from session_manager.clock import now_rfc3339
from session_manager.errors import ManagerError
from session_manager.events import EventLog, EventType
from session_manager.livekit.gateway import LiveKitGateway
from session_manager.livekit.webhooks import RoomEvent
from session_manager.session.deps import created_by
from session_manager.session.record import JsonDict, SessionRecord
from session_manager.session.states import RUNNING, SessionStatus
from session_manager.store.base import SessionCursor, Store

log = logging.getLogger(__name__)

S = SessionStatus
LIVEKIT_RESTARTED = "LiveKit restarted: the managed LiveKit's rooms ended with the last process"
ROOM_LOST = "room lost: LiveKit no longer has the session's room"
CREATE_INTERRUPTED = "session manager stopped while the session was being created"
END_INTERRUPTED = "session manager stopped while the session was ending"
LEFT_BEHIND = (S.CREATING, S.WAITING_FOR_SERVICES, S.READY, S.ACTIVE, S.TERMINATING)
PAGE = 100
LIVEKIT_CALLS_AT_ONCE = 32  # rooms asked about (or deleted) in parallel


@dataclass
class Adoption:
    record: SessionRecord
    participants: tuple[RoomEvent, ...] | None  # None: LiveKit could not be asked


@dataclass
class TakeOver:
    adopted: list[Adoption] = field(default_factory=list)
    ended: int = 0
    stray_rooms_deleted: int = 0


class SessionTakeOver:
    """Runs once, at start-up, before the supervisor's loop: see the module docstring."""

    def __init__(
        self,
        store: Store,
        gateway: LiveKitGateway,
        events: EventLog,
        *,
        rooms_survive: bool,
        deployment: str,
        livekit_timeout: float,
        flush_timeout: float,
    ) -> None:
        self._store = store
        self._gateway = gateway
        self._events = events
        self._rooms_survive = rooms_survive
        self._deployment = deployment
        self._timeout = livekit_timeout
        self._flush_timeout = flush_timeout
        self._at_once = asyncio.Semaphore(LIVEKIT_CALLS_AT_ONCE)

    async def run(self) -> TakeOver:
        """Take over every session the store holds as not ended (one process alone on its
        store). Raises ManagerError (StoreUnavailable) if they cannot be read."""
        return await self.take_over(await self._left_behind(), delete_strays=True)

    async def take_over(self, views: list[JsonDict], *, delete_strays: bool = False) -> TakeOver:
        """Take over these sessions (a cluster's process: those whose owner is gone). Rooms no
        session owns are deleted only with `delete_strays`: only a process alone on its store
        knows every session."""
        outcome = await self._decide(views, delete_strays=delete_strays)
        try:
            await self._store.flush(self._flush_timeout)
        except ManagerError:
            log.error("sessions ended at start-up could not be written; they end again next start")
        if outcome.adopted or outcome.ended:
            log.info(
                "sessions left by the previous process taken over",
                extra={
                    "adopted": len(outcome.adopted),
                    "ended": outcome.ended,
                    "stray_rooms_deleted": outcome.stray_rooms_deleted,
                },
            )
        return outcome

    async def _decide(self, views: list[JsonDict], *, delete_strays: bool) -> TakeOver:
        outcome = TakeOver()
        if not self._rooms_survive:
            await asyncio.gather(
                *(self._end(view, LIVEKIT_RESTARTED, delete_room=False) for view in views)
            )
            outcome.ended = len(views)
            return outcome
        rooms = await self._list_rooms()
        to_adopt: list[JsonDict] = []
        endings: list[Awaitable[None]] = []
        for view in views:
            status = S(view["status"])
            if status is S.CREATING:
                endings.append(self._end(view, CREATE_INTERRUPTED, delete_room=True))
            elif status is S.TERMINATING:
                endings.append(
                    self._end(view, view.get("reason") or END_INTERRUPTED, delete_room=True)
                )
            elif rooms is not None and view["room_name"] not in rooms:
                endings.append(self._end(view, ROOM_LOST, delete_room=False))
            else:
                to_adopt.append(view)
        await asyncio.gather(*endings)
        outcome.ended = len(endings)
        asked = await asyncio.gather(*(self._participants(view) for view in to_adopt))
        gone: list[Awaitable[None]] = []
        for view, (room_exists, participants) in zip(to_adopt, asked, strict=True):
            if not room_exists:
                gone.append(self._end(view, ROOM_LOST, delete_room=False))
                continue
            record = SessionRecord.from_view(view)
            assert record.status in RUNNING
            outcome.adopted.append(Adoption(record, participants))
        await asyncio.gather(*gone)
        outcome.ended += len(gone)
        if rooms is not None and delete_strays:
            outcome.stray_rooms_deleted = await self._delete_strays(rooms, outcome.adopted)
        return outcome

    async def _left_behind(self) -> list[JsonDict]:
        views: list[JsonDict] = []
        for status in LEFT_BEHIND:
            before: SessionCursor | None = None
            while page := await self._store.list_sessions(
                status=status.value, user_identity=None, limit=PAGE, before=before
            ):
                views += page
                before = (page[-1]["created_at"], page[-1]["session_id"])
        return views

    async def _list_rooms(self) -> dict[str, str] | None:
        try:
            return await self._gateway.list_rooms()
        except ManagerError as exc:
            log.warning(
                "LiveKit rooms could not be listed at start-up; sessions adopted as stored",
                extra={"error": exc.message},
            )
            return None

    async def _participants(self, view: JsonDict) -> tuple[bool, tuple[RoomEvent, ...] | None]:
        """(whether the room exists, who is in it: None when LiveKit could not say)."""
        async with self._at_once:
            try:
                participants = await self._gateway.list_participants(view["room_name"])
            except ManagerError as exc:
                log.warning(
                    "room participants could not be listed; adopted as stored",
                    extra={"session_id": view["session_id"], "error": exc.message},
                )
                return True, None
        return participants is not None, participants

    async def _end(self, view: JsonDict, reason: str, *, delete_room: bool) -> None:
        if delete_room:
            async with self._at_once:
                try:
                    await asyncio.wait_for(
                        self._gateway.delete_room(view["room_name"]), self._timeout
                    )
                except (ManagerError, TimeoutError) as exc:  # tagged: the room sweep retries
                    log.warning(
                        "room of a session left behind could not be deleted",
                        extra={"session_id": view["session_id"], "error": str(exc) or "timeout"},
                    )
        now = now_rfc3339()
        old = view["status"]
        self._store.save_session(
            {
                **view,
                "status": S.TERMINATED.value,
                "reason": reason,
                "terminated_at": now,
                "updated_at": now,
                "deadlines": {},
            }
        )
        session_id = view["session_id"]
        self._events.append(
            EventType.SESSION_STATUS_CHANGED,
            session_id=session_id,
            data={"old": old, "new": S.TERMINATED.value, "reason": reason},
        )
        self._events.append(
            EventType.SESSION_TERMINATED, session_id=session_id, data={"reason": reason}
        )
        log.warning(
            "ended a session left by the previous process",
            extra={"session_id": session_id, "was": old, "reason": reason},
        )

    async def _delete_strays(self, rooms: dict[str, str], adopted: list[Adoption]) -> int:
        owned = {adoption.record.room_name for adoption in adopted}
        strays = [
            name
            for name, metadata in rooms.items()
            if name not in owned and created_by(metadata) == self._deployment
        ]

        async def delete(name: str) -> None:
            async with self._at_once:
                try:
                    await self._gateway.delete_room(name)
                except ManagerError as exc:
                    log.warning(
                        "stray room could not be deleted",
                        extra={"room_name": name, "error": exc.message},
                    )
                    return
            log.info("deleted a room no session owns", extra={"room_name": name})

        await asyncio.gather(*(delete(name) for name in strays))
        return len(strays)
