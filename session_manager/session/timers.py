"""A session actor's timers: each is a message (a deadline passed) posted to the actor's inbox
when it fires. The ones a restarted manager must honour keep their due moment in the record's
`deadlines`, stored with the session's view."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta

from session_manager.clock import utc_now
from session_manager.session.deps import duration_limit
from session_manager.session.messages import (
    ClientGraceExpired,
    ClientJoinDeadlinePassed,
    DurationLimitReached,
    JoinDeadlinePassed,
    SessionMessage,
)
from session_manager.session.record import SessionRecord
from session_manager.session.states import SessionStatus

# The timers a session's view stores the deadlines of (by these names), so that a restarted
# manager adopting the session fires them when they were due. WaitDeadlinePassed is not among
# them: it only matters to a creator still waiting on the process that ended.
STORED_TIMERS: dict[type, str] = {
    DurationLimitReached: "duration_limit",
    JoinDeadlinePassed: "services_join",
    ClientJoinDeadlinePassed: "client_join",
    ClientGraceExpired: "client_reconnect",
}
TIMER_BY_NAME = {name: timer for timer, name in STORED_TIMERS.items()}


class SessionTimers:
    """Owns one session actor's timer handles, at most one per message type, and keeps the
    record's `deadlines` in step with them; a timer that fires posts its message through
    `post` (the actor's `tell`)."""

    def __init__(self, record: SessionRecord, post: Callable[[SessionMessage], None]) -> None:
        self._record = record
        self._post = post
        self._handles: dict[type, asyncio.TimerHandle] = {}

    def __contains__(self, message_type: type) -> bool:
        return message_type in self._handles

    def start(self, message_type: type, delay: float, due: datetime | None = None) -> None:
        self.cancel(message_type)
        loop = asyncio.get_running_loop()
        self._handles[message_type] = loop.call_later(delay, self._fired, message_type)
        name = STORED_TIMERS.get(message_type)
        if name is not None:
            self._record.deadlines[name] = due or utc_now() + timedelta(seconds=delay)

    def cancel(self, message_type: type) -> None:
        handle = self._handles.pop(message_type, None)
        if handle is not None:
            handle.cancel()
        self._record.deadlines.pop(STORED_TIMERS.get(message_type, ""), None)

    def cancel_all(self) -> None:
        """Every timer stops; the stored deadlines stay (a session kept for the next process
        is adopted with them)."""
        for handle in self._handles.values():
            handle.cancel()
        self._handles.clear()

    def restore(self, join_timeout: float) -> None:
        """Restart the timers of a session adopted from a past process at their stored
        deadlines (one already due fires at once)."""
        record, now = self._record, utc_now()
        deadlines = dict(record.deadlines)
        limit = duration_limit(record.metadata)
        if limit is not None and "duration_limit" not in deadlines:  # stored before deadlines
            deadlines["duration_limit"] = record.created_at + timedelta(seconds=limit)
        for name, due in deadlines.items():
            timer = TIMER_BY_NAME.get(name)
            if timer is not None:
                self.start(timer, max(0.0, (due - now).total_seconds()), due=due)
        if record.status is SessionStatus.WAITING_FOR_SERVICES and JoinDeadlinePassed not in self:
            self.start(JoinDeadlinePassed, join_timeout)

    def _fired(self, message_type: type) -> None:
        self._handles.pop(message_type, None)
        self._record.deadlines.pop(STORED_TIMERS.get(message_type, ""), None)
        self._post(message_type())
