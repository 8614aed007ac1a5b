"""Owns the SQLite store's checkpoint task and thread: the write-ahead log is copied back into
the database beside the writer, never in the middle of a create's commit.

With `synchronous=NORMAL` a commit to the log does not wait for the disk; a checkpoint does (it
syncs the log, copies its pages, syncs the database). Left to SQLite, the checkpoint runs inside
whichever commit crosses 1 000 pages, and every create waiting on that batch waits for the disk
too: measured, that was a batch of 20–50 ms a couple of times a minute under load, enough to set
create-session's p99. Here a connection of its own, on a thread of its own, runs a PASSIVE
checkpoint every `interval` seconds (it never waits for the writer, nor the writer for it). The
writer keeps an automatic checkpoint only as a backstop (`BACKSTOP_PAGES`), so a checkpointer that
is stuck or failing never lets the log grow without bound.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from session_manager.logs import describe
from session_manager.periodic import Periodic

log = logging.getLogger(__name__)

# Pages (4 KiB) in the log past which the writer checkpoints by itself: ~40 MB, reached only
# when the checkpointer has not run for a long while.
BACKSTOP_PAGES = 10_000


class WalCheckpointer:
    """Owns one task (a `Periodic`), one thread and one connection: the log's checkpoints."""

    def __init__(self, path: Path, *, interval: float = 1.0, timeout: float = 5.0) -> None:
        self._path = path
        self._interval = interval
        self._timeout = timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-checkpoint")
        self._db: sqlite3.Connection | None = None
        self._running: Future[None] | None = None
        self._failing = False
        self._periodic = Periodic("sqlite-checkpointer", self._checkpoint, interval=interval)

    def start(self) -> None:
        self._periodic.start()

    async def aclose(self) -> None:
        await self._periodic.aclose()
        idle = self._running is None or self._running.done()
        if idle:
            # Closed on the thread that used the connection; nothing else is queued there.
            try:
                closing = self._executor.submit(self._close_sync)
                await asyncio.wait_for(asyncio.wrap_future(closing), self._timeout)
            except (TimeoutError, sqlite3.Error) as exc:
                idle = False
                extra = {"error": describe(exc)}
                log.warning("sqlite checkpoint connection not closed", extra=extra)
        # A thread stuck on the disk cannot be stopped; it is abandoned rather than waited for.
        self._executor.shutdown(wait=idle, cancel_futures=True)

    async def _checkpoint(self) -> None:
        if self._running is not None and not self._running.done():
            return  # the last one is still on the disk: never queue a second behind it
        self._running = self._executor.submit(self._checkpoint_sync)
        try:
            await asyncio.wait_for(asyncio.wrap_future(self._running), self._timeout)
        except TimeoutError:
            self._report("the log's checkpoint is taking long; the writer's backstop holds")
            return
        except (OSError, sqlite3.Error) as exc:
            self._report(f"the log's checkpoint failed: {describe(exc)}")
            return
        if self._failing:
            self._failing = False
            log.info("the log's checkpoints run again")

    def _report(self, problem: str) -> None:
        if not self._failing:
            self._failing = True
            log.warning("sqlite checkpoint trouble", extra={"error": problem})

    def _checkpoint_sync(self) -> None:
        if self._db is None:
            self._db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _close_sync(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()
