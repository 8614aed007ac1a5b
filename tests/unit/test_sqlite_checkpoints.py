"""The SQLite store's log is checkpointed beside the writer, and a batch of any size is written
whole."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from session_manager.store import SqliteStore
from session_manager.store.sqlite import ROWS_PER_STATEMENT
from session_manager.store.sqlite_checkpoints import WalCheckpointer
from tests.polling import eventually
from tests.unit.test_store_faults import view

BODY = "x" * 2000  # a view about the size of a session's with a few services


def fill_log(path: Path, rows: int) -> sqlite3.Connection:
    """Rows committed to the log only: automatic checkpoints off. The caller closes the
    connection at the end (closing the last one checkpoints)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v TEXT)")
    db.executemany("INSERT INTO t (v) VALUES (?)", [(BODY,) for _ in range(rows)])
    return db


async def test_the_log_is_copied_into_the_database_beside_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    keep_open = fill_log(path, 500)
    before = path.stat().st_size
    assert (tmp_path / "db.sqlite3-wal").stat().st_size > 500 * len(BODY)
    checkpoints = WalCheckpointer(path, interval=0.02)
    checkpoints.start()
    try:
        await eventually(lambda: path.stat().st_size > before + 500 * len(BODY))
    finally:
        await checkpoints.aclose()
        keep_open.close()


async def test_without_the_checkpointer_the_log_stays_in_the_log(tmp_path: Path) -> None:
    """The control for the test above: nothing else copies the pages meanwhile."""
    path = tmp_path / "db.sqlite3"
    keep_open = fill_log(path, 500)
    try:
        assert path.stat().st_size < 500 * len(BODY)
    finally:
        keep_open.close()


async def test_the_store_checkpoints_while_it_writes(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = SqliteStore(path)
    await store.open()
    try:
        for number in range(300):
            store.save_session(view(f"s-{number}", padding=BODY))
        await store.flush(10.0)
        await eventually(lambda: path.stat().st_size > 300 * len(BODY))
    finally:
        await store.aclose()


async def test_a_batch_larger_than_one_statement_is_written_whole(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = SqliteStore(path)
    await store.open()
    count = ROWS_PER_STATEMENT * 2 + 7
    try:
        for number in range(count):
            store.save_session(view(f"s-{number}"))
        await store.flush(10.0)
    finally:
        await store.aclose()
    reopened = SqliteStore(path)
    await reopened.open()
    try:
        assert await reopened.get_session(f"s-{count - 1}") is not None
        listed = await reopened.list_sessions(
            status=None, user_identity=None, limit=count + 10, before=None
        )
        assert len(listed) == count
    finally:
        await reopened.aclose()
