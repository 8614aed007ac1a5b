"""Embedded SQLite, reached through one thread so the event loop never waits on the disk.

Registrations and idempotency keys are written through: the caller is answered once they are
durable, or gets `StoreUnavailable` after a few attempts within `call_timeout`. Reads have the
same bound. Session views are written behind (`SessionWriteBehind`, which says how the store
never fails silently): the latest view of each session waits there, and its writer stores a
whole batch in one transaction, so a burst of sessions costs a few commits, not hundreds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson

from session_manager.errors import StartupFailed, StoreUnavailable
from session_manager.health_board import HealthBoard
from session_manager.logs import describe
from session_manager.store.base import JsonDict, SessionCursor
from session_manager.store.sqlite_checkpoints import BACKSTOP_PAGES, WalCheckpointer
from session_manager.store.write_behind import SessionWriteBehind, WriteObserver

log = logging.getLogger(__name__)

T = TypeVar("T")

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
-- A client key lists only its own sessions: the owner is read from the view by this very
-- expression in list queries, so the index serves them without a column to migrate.
CREATE INDEX IF NOT EXISTS sessions_by_owner
    ON sessions (json_extract(CAST(body AS TEXT), '$.owner'), created_at, session_id);
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    body BLOB NOT NULL
);
"""

SessionRow = tuple[str, str, str, str, bytes]
# Rows per INSERT of a batch (5 values each, far under SQLite's 32 766 variables). A batch is
# one statement, not `executemany`: the sqlite3 module lets go of the GIL around every step, and
# each time the disk thread wants it back it may wait a whole switch interval while the event
# loop runs; one statement asks once. Measured with the loop's thread busy: 58 ms for five rows
# with executemany, 10 ms as one statement (1.4 ms with the 1 ms switch interval `serve` sets).
ROWS_PER_STATEMENT = 500
INSERT_SESSIONS = (
    "INSERT OR REPLACE INTO sessions (session_id, status, user_identity, created_at, body) VALUES "
)


class SqliteStore:
    """See the module docstring. `board` (optional) hears when the store goes down and comes
    back; `on_fatal(reason)` (optional) is called once if the session writer dies."""

    def __init__(
        self,
        path: Path,
        *,
        board: HealthBoard | None = None,
        on_fatal: Callable[[str], None] | None = None,
        max_pending: int = 50_000,
        flush_timeout: float = 10.0,
        call_timeout: float = 5.0,
        attempts: int = 3,
        retry_backoff: float = 0.1,
        max_backoff: float = 5.0,
        on_write: WriteObserver | None = None,
    ) -> None:
        self._path = path
        self._flush_timeout = flush_timeout
        self._call_timeout = call_timeout
        self._attempts = attempts
        self._retry_backoff = retry_backoff
        self._max_backoff = max_backoff
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._db: sqlite3.Connection | None = None
        self._checkpoints = WalCheckpointer(path, timeout=call_timeout)
        self._views = SessionWriteBehind(
            self._write_batch,
            name="sqlite-session-writer",
            log=log,
            board=board,
            on_fatal=on_fatal,
            max_pending=max_pending,
            flush_timeout=flush_timeout,
            retry_backoff=retry_backoff,
            max_backoff=max_backoff,
            on_write=on_write,
        )

    # lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            await asyncio.wait_for(self._run(self._open_sync), self._flush_timeout)
        except TimeoutError:
            problem = f"cannot open {self._path}: no answer within {self._flush_timeout:g} s"
        except (OSError, sqlite3.Error) as exc:
            problem = _open_problem(self._path, exc)
        else:
            self._views.start()
            self._checkpoints.start()
            return
        self._executor.shutdown(wait=False, cancel_futures=True)
        raise StartupFailed(problem)

    def _open_sync(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        # Registrations hold signing secrets: only the manager's user may read the file.
        self._path.touch(mode=0o600)
        self._path.chmod(0o600)
        db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            # Checkpoints run beside the writer (`WalCheckpointer`); this is only the backstop.
            db.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
            db.executescript(SCHEMA)
        except BaseException:
            db.close()
            raise
        self._db = db

    async def aclose(self) -> None:
        await self._views.aclose()
        await self._checkpoints.aclose()
        closed = self._db is None
        if not closed:
            try:
                await asyncio.wait_for(self._run(self._close_sync), self._call_timeout)
                closed = True
            except Exception as exc:
                log.error("closing the database failed", extra={"error": describe(exc)})
        # A thread stuck on the disk cannot be stopped; it is abandoned rather than waited for.
        self._executor.shutdown(wait=closed, cancel_futures=True)

    def _close_sync(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()

    # health ------------------------------------------------------------------------------

    @property
    def backlog(self) -> int:
        return self._views.backlog

    @property
    def healthy(self) -> bool:
        return self._views.healthy

    def check_capacity(self) -> None:
        self._views.check_capacity()

    # calls through the disk thread -------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the disk thread, retrying failures with backoff, all within
        `call_timeout`; `StoreUnavailable` (one line, no SQLite internals) if it never works."""
        delay = self._retry_backoff
        attempt = 1
        try:
            async with asyncio.timeout(self._call_timeout):
                while True:
                    try:
                        return await self._run(fn, *args)
                    except Exception as exc:
                        if attempt >= self._attempts:
                            raise
                        log.warning(
                            "store call failed; retrying",
                            extra={"operation": what, "attempt": attempt, "error": describe(exc)},
                        )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._max_backoff)
                    attempt += 1
        except TimeoutError:
            log.error(
                "store call timed out",
                extra={"operation": what, "timeout": self._call_timeout, "attempts": attempt},
            )
            raise StoreUnavailable(
                f"the store did not {what} within {self._call_timeout:g} s"
            ) from None
        except Exception:
            log.exception("store call failed", extra={"operation": what, "attempts": attempt})
            raise StoreUnavailable(f"the store could not {what}") from None

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("SqliteStore used while not open")
        return self._db

    def _execute(self, sql: str, params: tuple[Any, ...]) -> None:
        self._conn.execute(sql, params)

    def _fetchall(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, params).fetchall()

    # registrations -----------------------------------------------------------------------

    async def save_service(self, service: JsonDict) -> None:
        what = "save a registration"
        await self._call(
            what,
            self._execute,
            "INSERT OR REPLACE INTO services (service_id, body) VALUES (?, ?)",
            (service["service_id"], _encode(what, service)),
        )

    async def delete_service(self, service_id: str) -> None:
        await self._call(
            "delete a registration",
            self._execute,
            "DELETE FROM services WHERE service_id = ?",
            (service_id,),
        )

    async def load_services(self) -> list[JsonDict]:
        rows = await self._call(
            "load registrations",
            self._fetchall,
            "SELECT body FROM services ORDER BY service_id",
            (),
        )
        return [orjson.loads(row[0]) for row in rows]

    # idempotency keys --------------------------------------------------------------------

    async def save_idempotency(self, key: str, entry: JsonDict) -> None:
        what = "save an idempotency key"
        await self._call(
            what,
            self._execute,
            "INSERT OR REPLACE INTO idempotency (key, body) VALUES (?, ?)",
            (key, _encode(what, entry)),
        )

    async def get_idempotency(self, key: str) -> JsonDict | None:
        rows = await self._call(
            "read an idempotency key",
            self._fetchall,
            "SELECT body FROM idempotency WHERE key = ?",
            (key,),
        )
        return orjson.loads(rows[0][0]) if rows else None

    async def delete_idempotency(self, key: str) -> None:
        await self._call(
            "delete an idempotency key",
            self._execute,
            "DELETE FROM idempotency WHERE key = ?",
            (key,),
        )

    async def purge(self, *, sessions_created_before: str, keys_created_before: float) -> int:
        return await self._call(
            "purge old rows", self._purge, sessions_created_before, keys_created_before
        )

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
        return int(ended + keys)

    # sessions ----------------------------------------------------------------------------

    def save_session(self, view: JsonDict) -> None:
        self._views.save(view)

    async def flush(self, timeout: float | None = None) -> None:
        await self._views.flush(timeout)

    async def get_session(self, session_id: str) -> JsonDict | None:
        waiting = self._views.unwritten(session_id)
        if waiting is not None:
            return waiting
        rows = await self._call(
            "read a session",
            self._fetchall,
            "SELECT body FROM sessions WHERE session_id = ?",
            (session_id,),
        )
        return orjson.loads(rows[0][0]) if rows else None

    async def list_sessions(
        self,
        *,
        status: str | None,
        user_identity: str | None,
        limit: int,
        before: SessionCursor | None,
        owner: str | None = None,
    ) -> list[JsonDict]:
        async def stored(skip: frozenset[str]) -> list[JsonDict]:
            return await self._call(
                "list sessions",
                self._list_stored,
                status,
                user_identity,
                owner,
                limit,
                before,
                skip,
            )

        return await self._views.listing(
            stored,
            status=status,
            user_identity=user_identity,
            owner=owner,
            limit=limit,
            before=before,
        )

    def _list_stored(
        self,
        status: str | None,
        user_identity: str | None,
        owner: str | None,
        limit: int,
        before: SessionCursor | None,
        skip: frozenset[str],
    ) -> list[JsonDict]:
        """Up to `limit` stored sessions, newest first, leaving out those in `skip`: page on
        until enough are found (usually one page, as few views wait at a time)."""
        filters: list[str] = []
        params: list[Any] = []
        if status is not None:
            filters.append("status = ?")
            params.append(status)
        if user_identity is not None:
            filters.append("user_identity = ?")
            params.append(user_identity)
        if owner is not None:  # the id of the API key that created the session, in its view
            filters.append("json_extract(CAST(body AS TEXT), '$.owner') = ?")
            params.append(owner)
        found: list[JsonDict] = []
        cursor = before
        while True:
            clauses, page_params = list(filters), list(params)
            if cursor is not None:
                clauses.append("(created_at < ? OR (created_at = ? AND session_id < ?))")
                page_params += [cursor[0], cursor[0], cursor[1]]
            where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
            rows = self._fetchall(
                f"SELECT session_id, created_at, body FROM sessions {where}"
                " ORDER BY created_at DESC, session_id DESC LIMIT ?",
                (*page_params, limit),
            )
            found += [orjson.loads(body) for session_id, _, body in rows if session_id not in skip]
            if len(found) >= limit or len(rows) < limit:
                return found[:limit]
            cursor = (rows[-1][1], rows[-1][0])

    async def _write_batch(self, views: list[JsonDict]) -> list[tuple[str, str]]:
        """`_write_sessions` on the disk thread, within `flush_timeout`: a disk that hangs
        fails the batch (it is retried) rather than stall the writer."""
        return await asyncio.wait_for(self._run(self._write_sessions, views), self._flush_timeout)

    def _write_sessions(self, views: list[JsonDict]) -> list[tuple[str, str]]:
        """Write the views in one transaction. A view that cannot become a row is left out
        (it would fail every retry of the batch); returns those as (session_id, why)."""
        rows: list[SessionRow] = []
        dropped: list[tuple[str, str]] = []
        for view in views:
            try:
                rows.append(_session_row(view))
            except Exception as exc:
                dropped.append((str(view.get("session_id")), describe(exc)))
        chunks = [
            rows[start : start + ROWS_PER_STATEMENT]
            for start in range(0, len(rows), ROWS_PER_STATEMENT)
        ]
        if len(chunks) == 1:
            self._insert_sessions(chunks[0])  # one statement: a transaction of its own
        elif chunks:
            with self._conn:
                self._conn.execute("BEGIN")
                for chunk in chunks:
                    self._insert_sessions(chunk)
        return dropped

    def _insert_sessions(self, rows: list[SessionRow]) -> None:
        values = ",".join(["(?, ?, ?, ?, ?)"] * len(rows))
        self._conn.execute(INSERT_SESSIONS + values, [value for row in rows for value in row])


def _session_row(view: JsonDict) -> SessionRow:
    columns = (view["session_id"], view["status"], view["user_identity"], view["created_at"])
    if not all(isinstance(column, str) for column in columns):
        raise TypeError("session_id, status, user_identity and created_at must be strings")
    return (*columns, orjson.dumps(view))


def _encode(what: str, value: JsonDict) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
        log.error("value cannot be serialised", extra={"operation": what, "error": describe(exc)})
        raise StoreUnavailable(f"the store could not {what}: it cannot be serialised") from None


def _open_problem(path: Path, exc: OSError | sqlite3.Error) -> str:
    """One line for the operator: the file, and what is wrong with it."""
    if isinstance(exc, OSError):
        for folder in (path.parent, *path.parent.parents):
            if folder.exists() and not folder.is_dir():
                return f"cannot open {path}: {folder} is not a directory"
        return f"cannot open {path}: {(exc.strerror or describe(exc)).lower()}"
    # The primary code of an extended one; errors raised by the module itself have none.
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    if code == sqlite3.SQLITE_NOTADB:
        return f"{path} is not a SQLite database"
    if code == sqlite3.SQLITE_CORRUPT:
        return f"{path} is a corrupt SQLite database"
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return f"{path} is locked by another process"
    if code == sqlite3.SQLITE_READONLY:
        return f"cannot write {path}: read-only"
    if code == sqlite3.SQLITE_FULL:
        return f"cannot write {path}: disk full"
    if code == sqlite3.SQLITE_IOERR:
        return f"cannot read or write {path}: I/O error"
    if code in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
        if path.is_dir():
            return f"cannot open {path}: it is a directory"
        target, access = (path, os.R_OK | os.W_OK) if path.exists() else (path.parent, os.W_OK)
        if not os.access(target, access):
            return f"cannot open {path}: permission denied"
    return f"cannot open {path}: {describe(exc)}"
