"""Embedded SQLite, reached through one thread so the event loop never waits on the disk.

Registrations are written through (the caller is answered once they are durable). Session views
are written behind: the latest view of each session waits in `_pending` and a writer task stores
a whole batch in one transaction, so a burst of sessions costs a few commits, not hundreds.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Any, TypeVar

import orjson

from session_manager.store.base import JsonDict, SessionCursor

log = logging.getLogger(__name__)

T = TypeVar("T")
FLUSH_TIMEOUT = 5.0
BATCH_WINDOW = 0.02  # seconds the writer waits after a wake-up for more views to arrive

SCHEMA = """
CREATE TABLE IF NOT EXISTS services (
    service_id TEXT PRIMARY KEY,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    user_identity TEXT NOT NULL,
    created_at TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_created ON sessions (created_at, session_id);
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    body BLOB NOT NULL
);
"""


class SqliteStore:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._db: sqlite3.Connection | None = None
        self._pending: dict[str, JsonDict] = {}
        self._writing: dict[str, JsonDict] = {}  # the batch on its way to disk, still readable
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        # flush(): every save bumps `_queued`; the writer publishes `_written` after each batch.
        self._queued = 0
        self._written = 0
        self._batch_written = asyncio.Condition()

    async def open(self) -> None:
        await self._run(self._open_sync)
        self._writer = asyncio.create_task(self._write_behind(), name="sqlite-session-writer")

    def _open_sync(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        self._db = db

    async def aclose(self) -> None:
        self._closing = True
        self._wakeup.set()
        if self._writer is not None:
            try:
                await asyncio.wait_for(self._writer, 10)
            except TimeoutError:
                log.error(
                    "session writer did not finish; cancelling",
                    extra={"pending": len(self._pending)},
                )
                self._writer.cancel()
                with suppress(asyncio.CancelledError):
                    await self._writer
            self._writer = None
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("SqliteStore used before open()")
        return self._db

    # registrations -------------------------------------------------------------------------

    async def save_service(self, service: JsonDict) -> None:
        await self._run(
            self._conn.execute,
            "INSERT OR REPLACE INTO services (service_id, body) VALUES (?, ?)",
            (service["service_id"], orjson.dumps(service)),
        )

    async def delete_service(self, service_id: str) -> None:
        await self._run(
            self._conn.execute, "DELETE FROM services WHERE service_id = ?", (service_id,)
        )

    async def load_services(self) -> list[JsonDict]:
        rows = await self._run(self._fetchall, "SELECT body FROM services ORDER BY service_id", ())
        return [orjson.loads(row[0]) for row in rows]

    def _fetchall(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, params).fetchall()

    # sessions ------------------------------------------------------------------------------

    def save_session(self, view: JsonDict) -> None:
        self._pending[view["session_id"]] = view
        self._queued += 1
        self._wakeup.set()

    async def flush(self) -> None:
        target = self._queued
        async with self._batch_written:
            await self._batch_written.wait_for(lambda: self._written >= target)

    async def list_sessions(
        self,
        *,
        status: str | None,
        user_identity: str | None,
        limit: int,
        before: SessionCursor | None,
    ) -> list[JsonDict]:
        # Read what was published just before; a disk that is failing must not hang the list.
        with suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), FLUSH_TIMEOUT)
        clauses: list[str] = []
        params: list[Any] = []
        if status is not None:
            clauses.append("status = ?")
            params.append(status)
        if user_identity is not None:
            clauses.append("user_identity = ?")
            params.append(user_identity)
        if before is not None:
            clauses.append("(created_at < ? OR (created_at = ? AND session_id < ?))")
            params += [before[0], before[0], before[1]]
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT body FROM sessions {where} ORDER BY created_at DESC, session_id DESC LIMIT ?"
        rows = await self._run(self._fetchall, sql, (*params, limit))
        return [orjson.loads(row[0]) for row in rows]

    async def purge(self, *, sessions_created_before: str, keys_created_before: float) -> int:
        return int(await self._run(self._purge, sessions_created_before, keys_created_before))

    def _purge(self, sessions_before: str, keys_before: float) -> int:
        with self._conn:
            self._conn.execute("BEGIN")
            ended = self._conn.execute(
                "DELETE FROM sessions WHERE status = 'Terminated' AND created_at < ?",
                (sessions_before,),
            ).rowcount
            keys = self._conn.execute(
                "DELETE FROM idempotency"
                " WHERE json_extract(CAST(body AS TEXT), '$.created_at') < ?",
                (keys_before,),
            ).rowcount
        return ended + keys

    async def save_idempotency(self, key: str, entry: JsonDict) -> None:
        await self._run(
            self._conn.execute,
            "INSERT OR REPLACE INTO idempotency (key, body) VALUES (?, ?)",
            (key, orjson.dumps(entry)),
        )

    async def get_idempotency(self, key: str) -> JsonDict | None:
        rows = await self._run(self._fetchall, "SELECT body FROM idempotency WHERE key = ?", (key,))
        return orjson.loads(rows[0][0]) if rows else None

    async def delete_idempotency(self, key: str) -> None:
        await self._run(self._conn.execute, "DELETE FROM idempotency WHERE key = ?", (key,))

    async def get_session(self, session_id: str) -> JsonDict | None:
        pending = self._pending.get(session_id) or self._writing.get(session_id)
        if pending is not None:
            return pending
        rows = await self._run(
            self._fetchall, "SELECT body FROM sessions WHERE session_id = ?", (session_id,)
        )
        return orjson.loads(rows[0][0]) if rows else None

    async def _write_behind(self) -> None:
        while True:
            await self._wakeup.wait()
            if not self._closing:
                # Let a burst gather: one commit for many sessions instead of one each.
                await asyncio.sleep(BATCH_WINDOW)
            self._wakeup.clear()
            covered = self._queued
            batch, self._pending = self._pending, {}
            if batch:
                self._writing = batch
                try:
                    await self._run(self._write_sessions, list(batch.values()))
                except sqlite3.Error:
                    log.exception(
                        "writing sessions failed; will retry", extra={"count": len(batch)}
                    )
                    # Newer views that arrived meanwhile win over the batch we failed to write.
                    self._pending = {**batch, **self._pending}
                    await asyncio.sleep(1.0)
                    self._wakeup.set()
                    continue
                finally:
                    self._writing = {}
            async with self._batch_written:
                self._written = covered
                self._batch_written.notify_all()
            if self._closing and not self._pending:
                return

    def _write_sessions(self, views: list[JsonDict]) -> None:
        rows = [
            (v["session_id"], v["status"], v["user_identity"], v["created_at"], orjson.dumps(v))
            for v in views
        ]
        with self._conn:
            self._conn.execute("BEGIN")
            self._conn.executemany(
                "INSERT OR REPLACE INTO sessions (session_id, status, user_identity, created_at,"
                " body) VALUES (?, ?, ?, ?, ?)",
                rows,
            )
