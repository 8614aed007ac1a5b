"""A reader's cursor into the event log, with a wake-up flag the log sets on a matching event.

The subscription keeps no queue of its own: it reads what is after its cursor from the log's
history when its reader asks, so a reader that never reads holds nothing but its cursor. If the
cursor has fallen out of the history, the next read starts with one `EventsDropped` notice.
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType
from typing import Protocol

from session_manager.clock import now_rfc3339
from session_manager.events.model import Event, EventPage

DEFAULT_BATCH = 256


class History(Protocol):
    """What a subscription reads from and leaves: the event log, seen from its readers (a
    protocol, so the log can import this module and not the other way round)."""

    def read(
        self,
        after_id: int,
        *,
        session_id: str | None,
        types: frozenset[str] | None,
        limit: int | None,
    ) -> EventPage: ...

    def unsubscribe(self, subscription: Subscription) -> None: ...


class Subscription:
    """Matching events after a cursor, then live ones; an async iterator of `Event`.

    Use `take_ready()` + `wait()` to write in batches with a heartbeat, or `async for`.
    """

    def __init__(
        self,
        log: History,
        *,
        session_id: str | None,
        types: frozenset[str] | None,
        cursor: int,
    ) -> None:
        self._log = log
        self.session_id = session_id
        self.types = types
        self._cursor = cursor
        # Something may be after the cursor: set by the log on a matching event, cleared by a
        # read that reached the end. Whatever is after the cursor at the start is ready.
        self._ready = True
        self._waiter: asyncio.Future[None] | None = None  # the one reader waiting, if any
        self._buffer: deque[Event] = deque()
        self._closed = False

    @property
    def cursor(self) -> int:
        """Every id up to this one has been read from the log: handed out, skipped as not
        matching, or (rarely: a notice overflowing a batch) waiting here for the next call."""
        return self._cursor

    @property
    def closed(self) -> bool:
        return self._closed

    def notify(self, event: Event) -> None:
        """Called by the log for each new event of this subscription's session (or of any
        session when it has none). O(1); never blocks."""
        if not self._ready and (self.types is None or event.type in self.types):
            self.wake()

    def wake(self) -> None:
        """Make a reader waiting in `wait()` return (e.g. for a heartbeat)."""
        self._ready = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take_ready(self, limit: int = DEFAULT_BATCH) -> list[Event]:
        """Up to `limit` events available now, without waiting; [] when there are none or the
        subscription is closed. A notice of missed events comes first when there is one."""
        if self._closed:
            return []
        if len(self._buffer) < limit and self._ready:
            # A notice comes on top of the events read: it may stay here for the next call.
            self._buffer.extend(self._read(limit - len(self._buffer)))
        return [self._buffer.popleft() for _ in range(min(limit, len(self._buffer)))]

    def _read(self, limit: int) -> list[Event]:
        # Cleared before reading: an event appended after this read sets it again.
        self._ready = False
        page = self._log.read(
            self._cursor, session_id=self.session_id, types=self.types, limit=limit
        )
        self._cursor = page.next_id
        if len(page.events) >= limit:
            self._ready = True  # stopped at the limit: there may be more
        if page.missed is None:
            return page.events
        return [page.missed.notice(now_rfc3339(), self.session_id), *page.events]

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until events may be ready, `wake()` is called or the subscription is closed;
        False on timeout. One reader at a time."""
        if self._buffer or self._closed or self._ready:
            return True
        if self._waiter is not None:
            raise RuntimeError("a subscription has one reader; another is already waiting")
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            if timeout is None:
                await waiter
            else:
                async with asyncio.timeout(timeout):
                    await waiter
        except TimeoutError:
            return False
        finally:
            self._waiter = None
        return True

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        while True:
            if self._buffer:
                return self._buffer.popleft()
            if self._closed:
                raise StopAsyncIteration
            if self._ready:
                self._buffer.extend(self._read(DEFAULT_BATCH))
                continue
            await self.wait()

    def close(self) -> None:
        """Stop: iteration ends, `take_ready` returns nothing, the log forgets this reader."""
        if self._closed:
            return
        self._closed = True
        self._buffer.clear()
        self._log.unsubscribe(self)
        self.wake()  # release a reader waiting in wait() or __anext__

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
