"""The SQLite store never fails silently: a view it cannot serialise is dropped alone, a failing
disk is retried and reported on the health board, waits are bounded, the backlog is bounded, a
dead writer is noticed at once, and a database it cannot use stops start-up with one line.

Faults are injected by subclasses that make the disk-thread methods fail or stall; everything
else runs on real SQLite files."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from session_manager.errors import StartupFailed, StoreUnavailable
from session_manager.health_board import STORE, HealthBoard
from session_manager.store import SqliteStore
from session_manager.store.base import JsonDict
from tests.polling import eventually

# Retries that do not slow the tests down.
FAST: dict[str, Any] = {"retry_backoff": 0.001, "max_backoff": 0.01}
FOREVER = 10**9


def view(session_id: str, status: str = "Active", **extra: Any) -> JsonDict:
    return {
        "session_id": session_id,
        "created_at": f"2026-01-01T00:00:00.000Z-{session_id}",
        "status": status,
        "user_identity": "u",
        **extra,
    }


async def reopened(path: Path) -> SqliteStore:
    store = SqliteStore(path)
    await store.open()
    return store


def errors(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.ERROR and text in r.getMessage()]


class RecordingBoard(HealthBoard):
    def __init__(self) -> None:
        super().__init__()
        self.changes: list[tuple[str, str]] = []

    def down(self, component: str, reason: str) -> None:
        self.changes.append(("down", component))
        super().down(component, reason)

    def up(self, component: str) -> None:
        self.changes.append(("up", component))
        super().up(component)


class FlakyDisk(SqliteStore):
    """Session batches fail `failures` times (counted on the disk thread), then go through."""

    def __init__(self, path: Path, failures: int, **options: Any) -> None:
        super().__init__(path, **options)
        self.failures = failures
        self.failed = 0

    def _write_sessions(self, views: list[JsonDict]) -> list[tuple[str, str]]:
        if self.failures > 0:
            self.failures -= 1
            self.failed += 1
            raise sqlite3.OperationalError("disk I/O error")
        return super()._write_sessions(views)


class StuckDisk(SqliteStore):
    """Session batches wait on the disk thread until the test releases them."""

    def __init__(self, path: Path, **options: Any) -> None:
        super().__init__(path, **options)
        self.released = threading.Event()

    def _write_sessions(self, views: list[JsonDict]) -> list[tuple[str, str]]:
        self.released.wait(10)
        return super()._write_sessions(views)


class BrokenCalls(SqliteStore):
    """Write-through calls and reads fail `failures` times, then go through; or stall until
    `released` when `stall` is set."""

    def __init__(self, path: Path, failures: int = 0, *, stall: bool = False, **options: Any):
        super().__init__(path, **options)
        self.failures = failures
        self.calls = 0
        self.stall = stall
        self.released = threading.Event()

    def _trip(self) -> None:
        self.calls += 1
        if self.stall:
            self.released.wait(10)
        if self.failures > 0:
            self.failures -= 1
            raise sqlite3.OperationalError("disk I/O error")

    def _execute(self, sql: str, params: tuple[Any, ...]) -> None:
        self._trip()
        super()._execute(sql, params)

    def _fetchall(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        self._trip()
        return super()._fetchall(sql, params)

    def _purge(self, sessions_before: str, keys_before: float) -> int:
        self._trip()
        return super()._purge(sessions_before, keys_before)


class DyingWriter(SqliteStore):
    """A writer with a bug that kills it when the test says so."""

    def __init__(self, path: Path, **options: Any) -> None:
        super().__init__(path, **options)
        self.die = asyncio.Event()
        self._views._write_loop = self._write_loop  # type: ignore[method-assign]

    async def _write_loop(self) -> None:
        await self.die.wait()
        raise RuntimeError("a bug in the writer")


# write-behind -------------------------------------------------------------------------------


async def test_a_view_that_cannot_be_serialised_is_dropped_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.db"
    store = SqliteStore(path)
    await store.open()
    store.save_session(view("before"))
    store.save_session(view("poison", metadata={"n": 2**70}))  # beyond 64 bits: orjson refuses
    store.save_session(view("beside"))
    await store.flush(timeout=10)
    store.save_session(view("after"))
    await store.flush(timeout=10)
    assert store.healthy
    await store.aclose()

    dropped = errors(caplog, "cannot be serialised")
    assert [getattr(r, "session_id", None) for r in dropped] == ["poison"]
    store = await reopened(path)
    try:
        for session_id in ("before", "beside", "after"):
            assert await store.get_session(session_id) is not None
        assert await store.get_session("poison") is None
    finally:
        await store.aclose()


async def test_a_failing_disk_is_retried_reported_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.db"
    board = RecordingBoard()
    store = FlakyDisk(path, failures=3, board=board, **FAST)
    await store.open()
    store.save_session(view("a"))
    store.save_session(view("b"))
    await store.flush(timeout=10)

    assert store.failed == 3
    failures = errors(caplog, "writing session views failed")
    assert len(failures) == 3
    assert sum(1 for r in failures if r.exc_info) == 1  # the traceback once per streak
    assert board.changes == [("down", STORE), ("up", STORE)]
    assert board.healthy and store.healthy
    await store.aclose()

    again = await reopened(path)
    try:
        assert await again.get_session("a") is not None
        assert await again.get_session("b") is not None
    finally:
        await again.aclose()


async def test_the_store_is_down_while_writes_fail(tmp_path: Path) -> None:
    board = HealthBoard()
    store = FlakyDisk(tmp_path / "s.db", failures=FOREVER, board=board, **FAST)
    await store.open()
    store.save_session(view("a"))
    await eventually(lambda: board.is_down(STORE))
    assert not store.healthy
    store.check_capacity()  # under the bound, new sessions are still taken

    store.failures = 0
    await store.flush(timeout=10)
    assert board.healthy and store.healthy
    await store.aclose()


async def test_views_waiting_on_a_failing_disk_are_read_and_listed(tmp_path: Path) -> None:
    store = FlakyDisk(tmp_path / "s.db", failures=0, **FAST)
    await store.open()
    store.save_session(view("a"))
    store.save_session(view("b"))
    await store.flush(timeout=10)

    store.failures = FOREVER
    store.save_session(view("a", status="Terminated"))
    await eventually(lambda: store.failed > 0)
    assert (await store.get_session("a") or {})["status"] == "Terminated"
    active = await store.list_sessions(status="Active", user_identity=None, limit=10, before=None)
    assert [v["session_id"] for v in active] == ["b"]
    ended = await store.list_sessions(
        status="Terminated", user_identity=None, limit=10, before=None
    )
    assert [v["session_id"] for v in ended] == ["a"]
    everything = await store.list_sessions(status=None, user_identity=None, limit=10, before=None)
    assert [v["session_id"] for v in everything] == ["b", "a"]

    store.failures = 0
    await store.flush(timeout=10)
    await store.aclose()


async def test_flush_gives_up_after_its_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = FlakyDisk(tmp_path / "s.db", failures=FOREVER, flush_timeout=0.2, **FAST)
    await store.open()
    store.save_session(view("a"))
    with pytest.raises(StoreUnavailable, match="not written within"):
        await store.flush(timeout=0.05)
    await store.aclose()  # bounded by flush_timeout: what is left is logged, not waited for
    assert errors(caplog, "left unwritten at close")


async def test_the_pending_bound_refuses_new_sessions_until_drained(tmp_path: Path) -> None:
    board = RecordingBoard()
    store = StuckDisk(tmp_path / "s.db", board=board, max_pending=3, flush_timeout=30)
    await store.open()
    try:
        store.save_session(view("s0"))
        store.save_session(view("s1"))
        store.check_capacity()
        assert store.healthy
        store.save_session(view("s2"))
        assert store.backlog == 3
        with pytest.raises(StoreUnavailable, match="waiting to be written"):
            store.check_capacity()
        assert not store.healthy
        problem = board.problem(STORE)
        assert problem is not None and "waiting to be written" in problem.reason
        store.save_session(view("s0", status="Terminated"))  # an existing session: still taken

        store.released.set()
        await store.flush(timeout=10)
        assert store.backlog == 0
        store.check_capacity()
        assert store.healthy and board.healthy
        assert board.changes == [("down", STORE), ("up", STORE)]
    finally:
        store.released.set()
        await store.aclose()


async def test_a_dead_writer_answers_flush_at_once_and_is_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    board = HealthBoard()
    fatal: list[str] = []
    store = DyingWriter(tmp_path / "s.db", board=board, on_fatal=fatal.append)
    await store.open()
    store.save_session(view("a"))
    waiter = asyncio.ensure_future(store.flush(timeout=60))
    await asyncio.sleep(0)  # one step: the waiter is now waiting on the writer
    assert not waiter.done()

    store.die.set()
    with pytest.raises(StoreUnavailable, match="writer has stopped"):
        await asyncio.wait_for(waiter, 10)  # far below the flush timeout: answered at once
    assert len(fatal) == 1
    assert board.is_down(STORE) and not store.healthy
    with pytest.raises(StoreUnavailable):
        store.check_capacity()
    with pytest.raises(StoreUnavailable):
        await store.flush(timeout=60)
    assert errors(caplog, "ended unexpectedly")
    await store.aclose()


async def test_a_closed_store_answers_rather_than_hangs(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db", **FAST)
    await store.open()
    store.save_session(view("a"))
    await store.aclose()  # writes what is pending first
    with pytest.raises(StoreUnavailable):
        await store.get_session("b")
    store = await reopened(tmp_path / "s.db")
    try:
        assert await store.get_session("a") is not None
    finally:
        await store.aclose()


# write-through and reads --------------------------------------------------------------------


async def test_write_through_failing_raises_after_bounded_retries(tmp_path: Path) -> None:
    store = BrokenCalls(tmp_path / "s.db", failures=FOREVER, attempts=3, **FAST)
    await store.open()
    try:
        with pytest.raises(StoreUnavailable) as raised:
            await store.save_service({"service_id": "a"})
        assert store.calls == 3
        message = raised.value.message
        assert message == "the store could not save a registration"
        with pytest.raises(StoreUnavailable):
            await store.get_idempotency("k")
        with pytest.raises(StoreUnavailable):
            await store.purge(sessions_created_before="2026", keys_created_before=0.0)

        store.failures = 2  # fewer failures than attempts: the caller never sees them
        await store.save_service({"service_id": "a"})
        store.failures = 0
        assert [s["service_id"] for s in await store.load_services()] == ["a"]
    finally:
        await store.aclose()


async def test_a_store_call_that_hangs_times_out(tmp_path: Path) -> None:
    store = BrokenCalls(tmp_path / "s.db", stall=True, call_timeout=0.1)
    await store.open()
    try:
        with pytest.raises(StoreUnavailable, match=r"did not save an idempotency key within"):
            await store.save_idempotency("k", {"created_at": 1.0})
    finally:
        store.released.set()
        await store.aclose()


async def test_an_entry_that_cannot_be_serialised_is_refused(tmp_path: Path) -> None:
    store = BrokenCalls(tmp_path / "s.db")
    await store.open()
    try:
        with pytest.raises(StoreUnavailable, match="cannot be serialised"):
            await store.save_idempotency("k", {"created_at": 1.0, "response": {"n": 2**70}})
        assert store.calls == 0  # not retried: it would never work
    finally:
        await store.aclose()


# start-up -----------------------------------------------------------------------------------


def assert_one_line_naming(message: str, path: Path, problem: str) -> None:
    assert "\n" not in message
    assert str(path) in message
    assert problem in message


async def test_a_garbage_database_stops_start_up_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    path.write_bytes(b"this is not a database at all\n" * 200)
    with pytest.raises(StartupFailed) as raised:
        await SqliteStore(path).open()
    assert_one_line_naming(str(raised.value), path, "is not a SQLite database")


async def test_a_data_dir_that_is_a_file_stops_start_up(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.write_text("a regular file")
    path = data_dir / "s.db"
    with pytest.raises(StartupFailed) as raised:
        await SqliteStore(path).open()
    assert_one_line_naming(str(raised.value), path, "is not a directory")


async def test_a_database_path_that_is_a_directory_stops_start_up(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    path.mkdir()
    with pytest.raises(StartupFailed) as raised:
        await SqliteStore(path).open()
    assert_one_line_naming(str(raised.value), path, "is a directory")
