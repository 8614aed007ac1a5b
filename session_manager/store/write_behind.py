"""Session views written behind, the same way by every store that keeps them out of the process.

`save` only queues the latest view of a session; a writer task stores a whole batch at once, so
a burst of sessions costs a few writes, not hundreds. A view queued is readable at once
(`unwritten`, `listing`). What the writer promises, whatever the store behind it:
- a batch that cannot be written is logged (ERROR; the traceback once per failure streak) and
  retried with capped exponential backoff, and the store is down on its health board from the
  first failed write until one succeeds;
- a view that cannot be written at all is dropped alone, with an ERROR naming its session;
- views waiting to be written are bounded by `max_pending`: at the bound the store is down on
  its board and `check_capacity` refuses new sessions with `StoreUnavailable`, while views of
  sessions already running are still accepted (coalesced per session, they cannot grow the
  backlog past the number of sessions). It is back when the backlog drains below the bound;
- the writer task is watched: if it dies anyway, `flush` waiters get `StoreUnavailable` at once,
  the store is down for good and `on_fatal(reason)` is called so the process can exit non-zero.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress

from session_manager.errors import StoreUnavailable
from session_manager.health_board import STORE, HealthBoard
from session_manager.logs import describe
from session_manager.observers import report
from session_manager.store.base import JsonDict, SessionCursor, listed_before, matches
from session_manager.supervision import cancel_and_wait, watch

BATCH_WINDOW = 0.02  # seconds the writer waits after a wake-up for more views to arrive

WRITER_STOPPED = "the store's session writer has stopped"
WRITES_FAILING = "session views cannot be written"

# Stores views; returns those it left out, as (session_id, why). Raising fails the whole batch.
WriteBatch = Callable[[list[JsonDict]], Awaitable[list[tuple[str, str]]]]
# Told how each batch went: (written, seconds it took).
WriteObserver = Callable[[bool, float], None]
# Up to a listing's `limit` stored views, newest first, leaving out the sessions given.
ListStored = Callable[[frozenset[str]], Awaitable[list[JsonDict]]]


class SessionWriteBehind:
    """Owns its writer loop: the task that stores the queued session views in batches, started
    by `start` and stopped by `aclose`.

    `write_batch(views)` stores them. A view it cannot store at all (it would fail every retry
    of its batch) it leaves out and returns as (session_id, why); anything it raises fails the
    batch, which is retried. `name` is the writer task's name and `log` the store's logger, which
    tells what happens to the views. `describe(exc)` is an error on one line for those logs;
    `traceback_of(exc)` the exception whose traceback is logged once per failure streak (None:
    none). `board` (optional) hears when the store goes down and comes back; `on_fatal(reason)`
    (optional) is called once if the writer dies; `on_write(ok, seconds)` (optional) hears how
    long each batch took to write or fail."""

    def __init__(
        self,
        write_batch: WriteBatch,
        *,
        name: str,
        log: logging.Logger,
        board: HealthBoard | None = None,
        on_fatal: Callable[[str], None] | None = None,
        max_pending: int = 50_000,
        flush_timeout: float = 10.0,
        retry_backoff: float = 0.1,
        max_backoff: float = 5.0,
        describe: Callable[[BaseException], str] = describe,
        traceback_of: Callable[[Exception], Exception | None] = lambda exc: exc,
        on_write: WriteObserver | None = None,
    ) -> None:
        self._write_batch = write_batch
        self._name = name
        self._log = log
        self._board = board
        self._on_fatal = on_fatal
        self._max_pending = max_pending
        self._flush_timeout = flush_timeout
        self._retry_backoff = retry_backoff
        self._max_backoff = max_backoff
        self._describe = describe
        self._traceback_of = traceback_of
        self._on_write = on_write
        self._pending: dict[str, JsonDict] = {}
        self._writing: dict[str, JsonDict] = {}  # the batch on its way to the store, still readable
        self._wakeup = asyncio.Event()
        self._hurry = asyncio.Event()  # someone waits in flush(): write without the batch window
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        # flush(): every save bumps `_queued`; the writer publishes `_written` after each batch
        # and answers the waiters whose target it reached.
        self._queued = 0
        self._written = 0
        self._flush_waiters: list[tuple[int, asyncio.Future[None]]] = []
        # What the health board was last told (None: up), and why the store may be down.
        self._failing = False
        self._over_bound = False
        self._writer_died = False
        self._reported: str | None = None

    # lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer, once the store can be written to."""
        self._writer = asyncio.create_task(self._write_loop(), name=self._name)
        watch(self._writer, self._on_writer_death)

    async def aclose(self) -> None:
        """Write what is pending, within the flush timeout (what is left is logged), then stop
        the writer (cancel and await)."""
        self._closing = True
        self._wakeup.set()
        if self._writer is not None and not self._writer_died:
            try:
                await self.flush(self._flush_timeout)
            except StoreUnavailable:
                self._log.error(
                    "session views left unwritten at close",
                    extra={"count": self.backlog, "timeout": self._flush_timeout},
                )
        await cancel_and_wait([self._writer])
        self._writer = None

    # health ------------------------------------------------------------------------------

    @property
    def backlog(self) -> int:
        return len(self._pending) + len(self._writing)

    @property
    def healthy(self) -> bool:
        return self._trouble() is None

    def check_capacity(self) -> None:
        if self._writer_died:
            raise StoreUnavailable(WRITER_STOPPED)
        if self.backlog >= self._max_pending:
            raise StoreUnavailable(
                f"{self.backlog} session views are waiting to be written; try again later"
            )

    def _trouble(self) -> str | None:
        if self._writer_died:
            return WRITER_STOPPED
        if self._failing:
            return WRITES_FAILING
        if self._over_bound:
            return f"{self._max_pending} or more session views are waiting to be written"
        return None

    def _report_health(self) -> None:
        trouble = self._trouble()
        if trouble == self._reported:
            return
        self._reported = trouble
        if self._board is None:
            return
        if trouble is None:
            self._board.up(STORE)
        else:
            self._board.down(STORE, trouble)

    def _check_backlog(self) -> None:
        over = self.backlog >= self._max_pending
        if over != self._over_bound:
            self._over_bound = over
            self._report_health()

    def _on_writer_death(self, error: BaseException | None) -> None:
        self._writer_died = True
        waiters, self._flush_waiters = self._flush_waiters, []
        for _, done in waiters:
            if not done.done():
                done.set_exception(StoreUnavailable(WRITER_STOPPED))
        self._report_health()
        if self._on_fatal is not None:
            self._on_fatal(WRITER_STOPPED)

    # views -------------------------------------------------------------------------------

    def save(self, view: JsonDict) -> None:
        """Queue the latest view of a session (see `Store.save_session`)."""
        self._pending[view["session_id"]] = view
        self._queued += 1
        self._wakeup.set()
        if not self._over_bound:
            self._check_backlog()

    async def flush(self, timeout: float | None = None) -> None:
        """See `Store.flush`."""
        limit = self._flush_timeout if timeout is None else timeout
        if self._writer_died:
            raise StoreUnavailable(WRITER_STOPPED)
        target = self._queued
        if self._written >= target:
            return
        if self._writer is None:
            raise StoreUnavailable("the store is not open")
        done = asyncio.get_running_loop().create_future()
        self._flush_waiters.append((target, done))
        self._hurry.set()
        try:
            await asyncio.wait_for(done, limit)
        except TimeoutError:
            raise StoreUnavailable(f"session views were not written within {limit:g} s") from None

    def unwritten(self, session_id: str) -> JsonDict | None:
        """The view of the session that waits to be written, if one does: newer than the one
        stored."""
        return self._pending.get(session_id) or self._writing.get(session_id)

    async def listing(
        self,
        stored: ListStored,
        *,
        status: str | None,
        user_identity: str | None,
        owner: str | None,
        limit: int,
        before: SessionCursor | None,
    ) -> list[JsonDict]:
        """The stored views `stored(skip)` lists, with the views waiting to be written merged in
        rather than waited for: a store that is failing or slow must not stall every listing.
        Their stored versions are older, so those are skipped."""
        waiting = {**self._writing, **self._pending}
        fresh = [
            view
            for view in waiting.values()
            if matches(view, status, user_identity, owner) and listed_before(view, before)
        ]
        found = await stored(frozenset(waiting))
        return heapq.nlargest(
            limit, [*fresh, *found], key=lambda v: (v["created_at"], v["session_id"])
        )

    # the writer --------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        delay = self._retry_backoff
        while True:
            await self._wakeup.wait()
            if not self._closing and not self._failing:
                # Let a burst gather: one write for many sessions instead of one each
                # (unless a flush is waiting: a create is answered only once it is written).
                with suppress(TimeoutError):
                    async with asyncio.timeout(BATCH_WINDOW):
                        await self._hurry.wait()
            self._hurry.clear()
            self._wakeup.clear()
            covered = self._queued
            batch, self._pending = self._pending, {}
            if batch:
                self._writing = batch
                started = time.perf_counter()
                try:
                    dropped = await self._write_batch(list(batch.values()))
                except Exception as exc:
                    self._observe_write(False, started)
                    # Newer views that arrived meanwhile win over the batch we failed to write.
                    self._pending = {**batch, **self._pending}
                    self._writing = {}
                    self._write_failed(exc, len(batch), delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._max_backoff)
                    self._wakeup.set()
                    continue
                self._observe_write(True, started)
                self._writing = {}
                delay = self._retry_backoff
                for session_id, error in dropped:
                    self._log.error(
                        "session view cannot be serialised; dropped",
                        extra={"session_id": session_id, "error": error},
                    )
                if self._failing:
                    self._failing = False
                    self._log.warning(
                        "session views are written again", extra={"count": len(batch)}
                    )
            self._written = covered
            self._answer_flushes()
            self._check_backlog()
            self._report_health()

    def _observe_write(self, ok: bool, started: float) -> None:
        report(self._on_write, ok, time.perf_counter() - started)

    def _write_failed(self, exc: Exception, count: int, retry_in: float) -> None:
        extra = {"count": count, "retry_in": retry_in, "error": self._describe(exc)}
        if self._failing:
            self._log.error("writing session views failed again; will retry", extra=extra)
            return
        self._failing = True
        self._log.error(
            "writing session views failed; will retry",
            extra=extra,
            exc_info=self._traceback_of(exc),
        )
        self._report_health()

    def _answer_flushes(self) -> None:
        waiting: list[tuple[int, asyncio.Future[None]]] = []
        for target, done in self._flush_waiters:
            if done.done():
                continue  # its caller gave up
            if target <= self._written:
                done.set_result(None)
            else:
                waiting.append((target, done))
        self._flush_waiters = waiting
