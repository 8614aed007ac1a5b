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

A log given a `sink` is one replica of a stream shared by several processes (`redis_feed`):
`append` hands the event to the sink instead of recording it, and the stream's events, every
process's, come back through `ingest` with ids the stream gave them, increasing but not
consecutive. Readers see no difference, and an id from one replica means the same on another.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from session_manager.clock import now_rfc3339
from session_manager.events.model import (
    Event,
    EventPage,
    EventType,
    JsonDict,
    MissedEvents,
    MissedReason,
)
from session_manager.events.subscription import Subscription

log = logging.getLogger(__name__)

DEFAULT_HISTORY = 10_000

EventListener = Callable[[Event], None]


class EventSink(Protocol):
    """Where a log that replicates a shared stream sends the events it is asked to record; they
    come back, every process's, with their ids, through `EventLog.ingest`."""

    def publish(self, event: Event) -> None:
        """Take an event to record (its id is 0). Synchronous; never blocks nor raises."""

    def id_horizon(self) -> int:
        """The highest id an event may have been given by now, in any process: a reader
        resuming from an id above this log's newest but not above this one (another replica
        had it first) waits for the events after it instead of being told it is unknown."""


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
    def __init__(
        self,
        history: int = DEFAULT_HISTORY,
        *,
        first_id: int | None = None,
        sink: EventSink | None = None,
    ) -> None:
        if history < 1:
            raise ValueError("history must keep at least one event")
        self._capacity = history
        # The ring: the event recorded n-th (from 0) is in slot n % history.
        self._slots: list[Event | None] = [None] * history
        self._recorded = 0
        self._first_id = _clock_first_id() if first_id is None else first_id
        if self._first_id < 1:
            raise ValueError("first_id must be positive")
        self._last_id = self._first_id - 1
        self._lost_through = self._first_id - 1  # the newest id not (or no longer) kept
        # With a sink: the end of the newest stretch of ids the stream lost before this log
        # read them (`skip_to`); any session may have had events in it.
        self._gap_through = 0
        self._sink = sink
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
        """The id of the newest event; `first_id - 1` before the first one (with a sink: the
        end of what this log skipped, when that is newer)."""
        return self._last_id

    @property
    def oldest_id(self) -> int:
        """The id of the oldest event still kept; `last_id + 1` when none is."""
        kept = min(self._recorded, self._capacity)
        if not kept:
            return self._last_id + 1
        return self._id_at(self._recorded - kept)

    @property
    def recorded(self) -> int:
        """How many events this log has recorded since it was made (appended or ingested)."""
        return self._recorded

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
        per target).

        With a sink, the event (credentials removed, its time set) goes to the sink and is
        returned with id 0: it reaches the history, its readers and the listeners when the
        stream gives it back to `ingest`, with its id."""
        event = Event(
            id=0 if self._sink is not None else self._last_id + 1,
            type=type,
            timestamp=now_rfc3339(),
            session_id=session_id,
            service_id=service_id,
            data=data if data is not None else {},
        )
        if self._sink is not None:
            try:
                self._sink.publish(event)
            except Exception:
                log.exception("event sink failed", extra={"event_type": event.type})
            return event
        self._record(event)
        return event

    def ingest(self, event: Event) -> bool:
        """Record an event that has its id already, given by the stream this log replicates:
        kept, indexed, its readers woken and the listeners called, as `append` does. Ids must
        increase: one not above `last_id` is refused (False) and logged."""
        if event.id <= self._last_id:
            log.warning(
                "event out of order refused",
                extra={"event_id": event.id, "last_id": self._last_id},
            )
            return False
        self._record(event)
        return True

    def skip_to(self, through_id: int) -> None:
        """Ids up to `through_id` will never be recorded here (a replica: they are older than
        the stream it reads, or the stream lost them before it read them). Before the first
        event this is where the log starts: a reader resuming from an older id is told it is
        unknown. After, a reader whose cursor is before it is told it missed events up to it."""
        if through_id <= self._last_id:
            return
        if self._recorded:
            self._gap_through = through_id
        else:
            self._first_id = through_id + 1
        self._lost_through = self._last_id = through_id
        for subscription in self._subscriptions():
            subscription.wake()

    def _record(self, event: Event) -> None:
        self._last_id = event.id
        slot = self._recorded % self._capacity
        self._recorded += 1
        evicted = self._slots[slot]
        if evicted is not None:
            self._evict(evicted)
        self._slots[slot] = event
        if event.session_id is not None:
            self._index(event.session_id, event)
        self._wake(event)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed", extra={"event_id": event.id})

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
        self._lost_through = max(self._lost_through, event.id)  # a gap may be newer
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
        if self._sink is not None:
            newest = max(newest, self._sink.id_horizon())
        oldest = self.oldest_id
        known = after_id <= 0 or self._first_id - 1 <= after_id <= newest
        start_after = max(after_id, self._first_id - 1) if known else oldest - 1
        if session_id is None:
            lost_through = self._lost_through
        else:
            lost_through = max(self._session_evicted_through(session_id), self._gap_through)
        missed: MissedEvents | None = None
        if not known:
            missed = MissedEvents(None, oldest - 1, MissedReason.UNKNOWN_LAST_EVENT_ID)
        elif lost_through > start_after:
            missed = MissedEvents(start_after + 1, lost_through, MissedReason.HISTORY_EXCEEDED)
        start_after = max(start_after, oldest - 1, self._gap_through)
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
        for position in range(self._position_after(after_id), self._recorded):
            event = self._slots[position % self._capacity]
            assert event is not None
            looked_through = event.id
            if types is None or event.type in types:
                events.append(event)
                if limit is not None and len(events) >= limit:
                    break
        return events, looked_through

    def _id_at(self, position: int) -> int:
        event = self._slots[position % self._capacity]
        assert event is not None
        return event.id

    def _position_after(self, after_id: int) -> int:
        """The position of the oldest kept event whose id is above `after_id` (the end when
        none is): computed when the kept ids are consecutive, else a binary search."""
        end = self._recorded
        start = max(0, end - self._capacity)
        if start == end:
            return end
        oldest, newest = self._id_at(start), self._id_at(end - 1)
        if after_id < oldest:
            return start
        if after_id >= newest:
            return end
        if newest - oldest == end - 1 - start:
            return start + (after_id - oldest) + 1
        below, above = start, end - 1  # id at `below` <= after_id < id at `above`
        while above - below > 1:
            middle = (below + above) // 2
            if self._id_at(middle) <= after_id:
                below = middle
            else:
                above = middle
        return above

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

    def _subscriptions(self) -> list[Subscription]:
        subscriptions = list(self._unfiltered)
        for subscribers in self._by_session.values():
            subscriptions.extend(subscribers)
        return subscriptions

    def close(self) -> None:
        """End every subscription (their streams finish) and refuse new ones. `append` still
        works: sessions ending during shutdown are still recorded and sent to webhooks."""
        self._closed = True
        for subscription in self._subscriptions():
            subscription.close()
