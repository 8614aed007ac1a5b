"""The event log: the one writer of events and the bounded history every reader reads from.

`append` is synchronous and cheap (a slot in a ring buffer, a per-session index entry, a wake-up
flag per interested subscriber): session actors call it from their own loop and it never awaits.
Readers never get their own copy of the stream. A subscription is a cursor into the history: it
reads what is after its cursor when it is ready to, so a slow or stalled reader costs the writer
and the other readers nothing, and memory is bounded by the history alone. A reader whose cursor
falls out of the history (it was too slow, or came back too late) is told what it missed with
one synthetic `EventsDropped` event and goes on from the oldest event still kept.

Ids are consecutive within one process. By default the first id is the wall clock in
microseconds, so ids keep increasing across restarts and a Last-Event-ID from an earlier process
is recognised as unknown (and reported as a gap) instead of silently skipping new events.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from session_manager.clock import now_rfc3339
from session_manager.events.model import (
    Event,
    EventType,
    JsonDict,
    MissedEvents,
    MissedReason,
)
from session_manager.events.subscription import Subscription

log = logging.getLogger(__name__)

DEFAULT_HISTORY = 10_000

EventListener = Callable[[Event], None]


@dataclass(frozen=True, slots=True)
class EventPage:
    """What `since` found: the matching events, where to continue, and what was lost."""

    events: list[Event]
    next_id: int  # pass as `after_id` next time: every id up to it has been looked at
    missed: MissedEvents | None = None

    @property
    def gap(self) -> bool:
        return self.missed is not None


@dataclass(slots=True)
class _SessionEvents:
    """The kept events of one session, oldest first, and the newest of its evicted ones."""

    events: deque[Event]
    evicted_through: int = 0


def _clock_first_id() -> int:
    return time.time_ns() // 1_000


def _normalise_types(types: Iterable[str] | None) -> frozenset[str] | None:
    return None if types is None else frozenset(str(name) for name in types)


class EventLog:
    def __init__(self, history: int = DEFAULT_HISTORY, *, first_id: int | None = None) -> None:
        if history < 1:
            raise ValueError("history must keep at least one event")
        self._capacity = history
        self._slots: list[Event | None] = [None] * history
        self._first_id = _clock_first_id() if first_id is None else first_id
        if self._first_id < 1:
            raise ValueError("first_id must be positive")
        self._next_id = self._first_id
        self._sessions: dict[str, _SessionEvents] = {}
        # Sessions none of whose events are kept any more, with their newest evicted id; at
        # most `history` of them, the oldest forgotten first (their ids are <= the floor).
        self._retired: dict[str, int] = {}
        self._retired_floor = 0
        self._unfiltered: set[Subscription] = set()
        self._by_session: dict[str, set[Subscription]] = {}
        self._listeners: list[EventListener] = []
        self._closed = False

    # what the log holds -------------------------------------------------------------------

    @property
    def history(self) -> int:
        return self._capacity

    @property
    def first_id(self) -> int:
        """The id of the first event this log issued (or will issue)."""
        return self._first_id

    @property
    def last_id(self) -> int:
        """The id of the newest event; `first_id - 1` before the first one."""
        return self._next_id - 1

    @property
    def oldest_id(self) -> int:
        """The id of the oldest event still kept; `last_id + 1` when none is."""
        return max(self._first_id, self._next_id - self._capacity)

    @property
    def subscriber_count(self) -> int:
        return len(self._unfiltered) + sum(len(subs) for subs in self._by_session.values())

    @property
    def closed(self) -> bool:
        return self._closed

    # the one writer ----------------------------------------------------------------------

    def append(
        self,
        type: EventType | str,
        *,
        session_id: str | None = None,
        service_id: str | None = None,
        data: JsonDict | None = None,
    ) -> Event:
        """Record an event and wake its readers. Synchronous; never waits on any reader.

        Its cost does not depend on the history or on how far behind readers are: a slot in
        the ring, an index entry, one flag per subscriber of that session (or unfiltered) that
        was waiting (about a microsecond each), and each listener (webhooks: one queue append
        per target)."""
        event = Event(
            id=self._next_id,
            type=type,
            timestamp=now_rfc3339(),
            session_id=session_id,
            service_id=service_id,
            data=data if data is not None else {},
        )
        self._next_id += 1
        slot = event.id % self._capacity
        evicted = self._slots[slot]
        if evicted is not None:
            self._evict(evicted)
        self._slots[slot] = event
        if session_id is not None:
            self._index(session_id, event)
        self._wake(event)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed", extra={"event_id": event.id})
        return event

    def add_listener(self, listener: EventListener) -> None:
        """Call `listener(event)` synchronously for every new event. It must not block."""
        self._listeners.append(listener)

    def remove_listener(self, listener: EventListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _index(self, session_id: str, event: Event) -> None:
        entry = self._sessions.get(session_id)
        if entry is None:
            evicted_through = self._retired.pop(session_id, 0)
            entry = self._sessions[session_id] = _SessionEvents(deque(), evicted_through)
        entry.events.append(event)

    def _evict(self, event: Event) -> None:
        session_id = event.session_id
        if session_id is None:
            return
        entry = self._sessions[session_id]
        entry.events.popleft()  # ids leave the ring in order: always the session's oldest
        entry.evicted_through = event.id
        if entry.events:
            return
        del self._sessions[session_id]
        self._retired[session_id] = event.id
        if len(self._retired) > self._capacity:
            forgotten = next(iter(self._retired))
            self._retired_floor = max(self._retired_floor, self._retired.pop(forgotten))

    def _wake(self, event: Event) -> None:
        for subscription in self._unfiltered:
            subscription.notify(event)
        if event.session_id is not None:
            for subscription in self._by_session.get(event.session_id, ()):
                subscription.notify(event)

    # readers -------------------------------------------------------------------------------

    def since(
        self,
        after_id: int,
        *,
        session_id: str | None = None,
        types: Iterable[str] | None = None,
        limit: int | None = None,
    ) -> EventPage:
        """The kept events with an id above `after_id` that match the filters, oldest first.

        `after_id` 0 (or less) means from the start. `missed` says whether matching events
        after `after_id` are no longer kept, or whether `after_id` is not an id of this log.
        """
        return self.read(
            after_id, session_id=session_id, types=_normalise_types(types), limit=limit
        )

    def read(
        self,
        after_id: int,
        *,
        session_id: str | None,
        types: frozenset[str] | None,
        limit: int | None,
    ) -> EventPage:
        """`since`, with the filters already in the form readers of this package keep."""
        if limit is not None and limit < 1:
            raise ValueError("limit must be at least 1")
        newest = self.last_id
        oldest = self.oldest_id
        known = after_id <= 0 or self._first_id - 1 <= after_id <= newest
        start_after = max(after_id, self._first_id - 1) if known else oldest - 1
        if session_id is None:
            lost_through = oldest - 1
        else:
            lost_through = self._session_evicted_through(session_id)
        missed: MissedEvents | None = None
        if not known:
            missed = MissedEvents(None, oldest - 1, MissedReason.UNKNOWN_LAST_EVENT_ID)
        elif lost_through > start_after:
            missed = MissedEvents(start_after + 1, lost_through, MissedReason.HISTORY_EXCEEDED)
        start_after = max(start_after, oldest - 1)
        if session_id is None:
            events, looked_through = self._scan_all(start_after, types, limit)
        else:
            events, looked_through = self._scan_session(session_id, start_after, types, limit)
        return EventPage(events, max(looked_through, start_after), missed)

    def _session_evicted_through(self, session_id: str) -> int:
        entry = self._sessions.get(session_id)
        if entry is not None:
            return entry.evicted_through
        # Not known: never had an event evicted, or forgotten with ids <= the floor.
        return self._retired.get(session_id, self._retired_floor)

    def _scan_all(
        self, after_id: int, types: frozenset[str] | None, limit: int | None
    ) -> tuple[list[Event], int]:
        events: list[Event] = []
        looked_through = after_id
        for event_id in range(after_id + 1, self._next_id):
            event = self._slots[event_id % self._capacity]
            assert event is not None and event.id == event_id
            looked_through = event_id
            if types is None or event.type in types:
                events.append(event)
                if limit is not None and len(events) >= limit:
                    break
        return events, looked_through

    def _scan_session(
        self, session_id: str, after_id: int, types: frozenset[str] | None, limit: int | None
    ) -> tuple[list[Event], int]:
        entry = self._sessions.get(session_id)
        newer: list[Event] = []
        if entry is not None:
            for event in reversed(entry.events):  # the newest are the ones a reader wants
                if event.id <= after_id:
                    break
                newer.append(event)
        newer.reverse()
        if types is not None:
            newer = [event for event in newer if event.type in types]
        if limit is not None and len(newer) > limit:
            newer = newer[:limit]
            return newer, newer[-1].id
        return newer, self.last_id

    def subscribe(
        self,
        *,
        session_id: str | None = None,
        types: Iterable[str] | None = None,
        last_event_id: int | None = None,
    ) -> Subscription:
        """A live stream of matching events after `last_event_id` (None: only new events;
        0: everything kept). Close it (or use it as an async context manager) when done."""
        cursor = self.last_id if last_event_id is None else last_event_id
        subscription = Subscription(
            self, session_id=session_id, types=_normalise_types(types), cursor=cursor
        )
        if self._closed:
            subscription.close()
            return subscription
        if session_id is None:
            self._unfiltered.add(subscription)
        else:
            self._by_session.setdefault(session_id, set()).add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        session_id = subscription.session_id
        if session_id is None:
            self._unfiltered.discard(subscription)
            return
        subscribers = self._by_session.get(session_id)
        if subscribers is not None:
            subscribers.discard(subscription)
            if not subscribers:
                del self._by_session[session_id]

    def close(self) -> None:
        """End every subscription (their streams finish) and refuse new ones. `append` still
        works: sessions ending during shutdown are still recorded and sent to webhooks."""
        self._closed = True
        subscriptions = list(self._unfiltered)
        for subscribers in self._by_session.values():
            subscriptions.extend(subscribers)
        for subscription in subscriptions:
            subscription.close()
