"""What the Redis store adds to the promises every store keeps (test_stores): its indexes follow a
session from status to status, what it writes is in Redis (a second store on the same prefix
reads it), and an outage or a hung Redis is a bounded, reported, self-healing state rather than a
hang or a lost write. Everything runs on the test session's real redis-server, which the outage
tests stop, restart on the same port, or freeze."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from session_manager.errors import StartupFailed, StoreUnavailable
from session_manager.health_board import STORE, HealthBoard
from session_manager.store.base import JsonDict
from session_manager.store.redis_store import RedisStore
from tests.conftest import RedisUnderTest, free_port
from tests.polling import eventually

# Retries that do not slow the tests down; a call bound short enough to wait for in a test.
FAST: dict[str, Any] = {"retry_backoff": 0.01, "max_backoff": 0.05}
TIMEOUT = 0.5
SLACK = 0.5  # what a busy test machine may add to a bound before the caller is answered

StoreFactory = Callable[..., Awaitable[RedisStore]]


def view(session_id: str, created_at: str, status: str = "Active", **extra: Any) -> JsonDict:
    return {
        "session_id": session_id,
        "created_at": created_at,
        "status": status,
        "user_identity": "u",
        **extra,
    }


def ids(views: list[JsonDict]) -> list[str]:
    return [v["session_id"] for v in views]


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


@pytest.fixture
async def open_store(
    redis_server: RedisUnderTest, redis_prefix: str
) -> AsyncIterator[StoreFactory]:
    """Open stores on this test's prefix; each is closed at the end (bounded: an outage test
    may leave views it could not write)."""
    opened: list[RedisStore] = []

    async def make(**options: Any) -> RedisStore:
        store = RedisStore(redis_server.url, prefix=redis_prefix, **options)
        await store.open()
        opened.append(store)
        return store

    yield make
    redis_server.resume()
    redis_server.start()
    for store in opened:
        await store.aclose()


async def answered_within(bound: float, call: Awaitable[object]) -> StoreUnavailable:
    """The StoreUnavailable `call` raises, checking it came within `bound` (plus slack)."""
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as raised:
        await asyncio.wait_for(call, bound + 10)  # only so that a hang fails instead of stalls
    elapsed = time.monotonic() - started
    assert elapsed < bound + SLACK, f"answered after {elapsed:.2f} s, bound {bound} s"
    return raised.value


# indexes ------------------------------------------------------------------------------------


async def test_a_status_change_moves_the_session_between_listings(
    open_store: StoreFactory,
) -> None:
    writer = await open_store()
    writer.save_session(view("a", "2026-01-01T00:00:01.000Z", user_identity="张三", owner="k1"))
    writer.save_session(view("b", "2026-01-01T00:00:02.000Z", owner="k2"))
    await writer.flush()
    reader = await open_store()  # nothing pending: what it lists comes from Redis

    async def listed(**filters: Any) -> list[str]:
        query: dict[str, Any] = {"status": None, "user_identity": None, **filters}
        return ids(await reader.list_sessions(limit=10, before=None, **query))

    assert await listed(status="Active") == ["b", "a"]
    assert await listed(status="Terminated") == []

    writer.save_session(
        view("a", "2026-01-01T00:00:01.000Z", "Terminated", user_identity="张三", owner="k1")
    )
    await writer.flush()
    assert await listed(status="Active") == ["b"]
    assert await listed(status="Terminated") == ["a"]
    assert await listed() == ["b", "a"]  # in the listing of all sessions once, not twice
    assert await listed(user_identity="张三") == ["a"]
    assert await listed(user_identity="张三", status="Active") == []
    assert await listed(owner="k1") == ["a"]
    assert await listed(owner="k2", status="Terminated") == []
    assert (await reader.get_session("a") or {})["status"] == "Terminated"


async def test_filtered_listings_page_through_many_sessions(open_store: StoreFactory) -> None:
    writer = await open_store()
    # 300 sessions of one user, one in three still live: a filter the index does not cover
    # (status, within the user's index) must walk several pages of it to fill a listing.
    for n in range(300):
        status = "Active" if n % 3 == 0 else "Terminated"
        writer.save_session(
            view(f"s{n:03}", f"2026-01-01T00:{n // 60:02}:{n % 60:02}.000Z", status)
        )
    await writer.flush()
    reader = await open_store()

    pages: list[list[str]] = []
    cursor = None
    while True:
        page = await reader.list_sessions(
            status="Active", user_identity="u", limit=40, before=cursor
        )
        if not page:
            break
        pages.append(ids(page))
        cursor = (page[-1]["created_at"], page[-1]["session_id"])
    assert [len(p) for p in pages] == [40, 40, 20]
    assert [i for page in pages for i in page] == [f"s{n:03}" for n in range(297, -1, -3)]


async def test_what_one_store_writes_another_reads_and_prefixes_keep_them_apart(
    open_store: StoreFactory, redis_server: RedisUnderTest
) -> None:
    first = await open_store()
    first.save_session(view("a", "2026-01-01T00:00:00.000Z"))
    await first.save_service({"service_id": "asr-1", "endpoint": "http://a"})
    await first.save_idempotency("k", {"body_hash": "h", "created_at": 1.0, "response": {}})
    await first.flush()

    second = await open_store()
    assert (await second.get_session("a") or {})["session_id"] == "a"
    assert [s["service_id"] for s in await second.load_services()] == ["asr-1"]
    assert (await second.get_idempotency("k") or {})["body_hash"] == "h"

    other = RedisStore(redis_server.url, prefix="another-deployment:")
    await other.open()
    try:
        assert await other.get_session("a") is None
        assert await other.load_services() == []
        assert await other.get_idempotency("k") is None
    finally:
        await other.aclose()


async def test_a_view_that_cannot_be_written_is_dropped_alone(
    open_store: StoreFactory, caplog: pytest.LogCaptureFixture
) -> None:
    store = await open_store()
    store.save_session(view("before", "2026-01-01T00:00:01.000Z"))
    store.save_session(view("poison", "2026-01-01T00:00:02.000Z", metadata={"n": 2**70}))
    store.save_session(view("beside", "2026-01-01T00:00:03.000Z"))
    await store.flush(timeout=10)
    assert store.healthy

    dropped = [r for r in caplog.records if "cannot be serialised" in r.getMessage()]
    assert [getattr(r, "session_id", None) for r in dropped] == ["poison"]
    reader = await open_store()
    assert await reader.get_session("before") is not None
    assert await reader.get_session("beside") is not None
    assert await reader.get_session("poison") is None


async def test_a_purge_of_more_rows_than_one_round_trip_takes_them_all(
    open_store: StoreFactory,
) -> None:
    store = await open_store()
    for n in range(1200):  # more than one purge script removes per round trip
        created_at = f"2020-01-01T00:{n // 60:02}:{n % 60:02}Z"
        store.save_session(view(f"old{n:04}", created_at, "Terminated"))
    store.save_session(view("old-live", "2020-01-01T00:00:00Z"))
    store.save_session(view("new-ended", "2099-01-01T00:00:00Z", "Terminated"))
    for n in range(600):
        await store.save_idempotency(f"k{n}", {"body_hash": "h", "created_at": 1.0 + n})
    await store.save_idempotency("fresh", {"body_hash": "h", "created_at": 5000.0})
    await store.flush()

    removed = await store.purge(
        sessions_created_before="2026-01-01T00:00:00Z", keys_created_before=4000.0
    )
    assert removed == 1200 + 600
    left = await store.list_sessions(status=None, user_identity=None, limit=500, before=None)
    assert ids(left) == ["new-ended", "old-live"]
    assert await store.get_session("old0000") is None
    assert await store.get_idempotency("k599") is None
    assert await store.get_idempotency("fresh") is not None


# outages ------------------------------------------------------------------------------------


async def test_an_outage_queues_writes_reports_them_and_heals_by_itself(
    open_store: StoreFactory, redis_server: RedisUnderTest
) -> None:
    board = RecordingBoard()
    store = await open_store(board=board, max_pending=3, timeout=TIMEOUT, **FAST)
    store.save_session(view("old", "2026-01-01T00:00:00.000Z"))
    await store.flush()

    redis_server.stop()
    store.save_session(view("s1", "2026-01-01T00:00:01.000Z"))
    await eventually(lambda: board.is_down(STORE))
    assert not store.healthy
    problem = board.problem(STORE)
    assert problem is not None and "cannot be written" in problem.reason
    # Queued views are still read and listed; what only Redis has is refused in time.
    assert (await store.get_session("s1") or {})["session_id"] == "s1"
    await answered_within(TIMEOUT, store.get_session("old"))
    listing = store.list_sessions(status=None, user_identity=None, limit=10, before=None)
    await answered_within(TIMEOUT, listing)
    await answered_within(TIMEOUT, store.save_service({"service_id": "x"}))
    await answered_within(TIMEOUT, store.ping())
    await answered_within(0.2, store.flush(timeout=0.2))

    store.check_capacity()  # under the bound, new sessions are still taken
    store.save_session(view("s2", "2026-01-01T00:00:02.000Z"))
    store.save_session(view("old", "2026-01-01T00:00:00.000Z", "Terminated"))
    assert store.backlog == 3
    with pytest.raises(StoreUnavailable, match="waiting to be written"):
        store.check_capacity()
    store.save_session(view("s1", "2026-01-01T00:00:01.000Z", "Terminated"))  # running: taken
    assert store.backlog == 3

    redis_server.start()  # same port, same data: the store finds it again by itself
    await store.flush(timeout=10)
    await eventually(lambda: board.healthy)
    assert store.healthy and store.backlog == 0
    store.check_capacity()
    assert board.changes == [("down", STORE), ("up", STORE)]

    reader = await open_store()
    ended = await reader.list_sessions(
        status="Terminated", user_identity=None, limit=10, before=None
    )
    assert ids(ended) == ["s1", "old"]
    live = await reader.list_sessions(status="Active", user_identity=None, limit=10, before=None)
    assert ids(live) == ["s2"]


async def test_a_hung_redis_answers_every_caller_within_the_bound(
    open_store: StoreFactory, redis_server: RedisUnderTest
) -> None:
    board = HealthBoard()
    store = await open_store(board=board, timeout=TIMEOUT, **FAST)
    await store.save_service({"service_id": "asr-1"})

    redis_server.pause()  # connections are accepted; nothing is ever answered
    await answered_within(TIMEOUT, store.get_session("a"))
    await answered_within(TIMEOUT, store.load_services())
    await answered_within(TIMEOUT, store.save_idempotency("k", {"created_at": 1.0}))
    await answered_within(
        TIMEOUT, store.purge(sessions_created_before="2026", keys_created_before=0.0)
    )
    await answered_within(TIMEOUT, store.ping())
    store.save_session(view("a", "2026-01-01T00:00:00.000Z"))
    await eventually(lambda: board.is_down(STORE))

    redis_server.resume()
    await store.flush(timeout=10)
    await eventually(lambda: board.healthy)
    await store.ping()
    assert [s["service_id"] for s in await store.load_services()] == ["asr-1"]
    assert (await store.get_session("a") or {})["session_id"] == "a"


async def test_a_dead_writer_answers_flush_at_once_and_is_fatal(
    redis_server: RedisUnderTest, redis_prefix: str
) -> None:
    class DyingWriter(RedisStore):
        """A writer with a bug that kills it when the test says so."""

        die = asyncio.Event()

        def __init__(self, url: str, **options: Any) -> None:
            super().__init__(url, **options)
            self._views._write_loop = self._write_loop  # type: ignore[method-assign]

        async def _write_loop(self) -> None:
            await self.die.wait()
            raise RuntimeError("a bug in the writer")

    board = HealthBoard()
    fatal: list[str] = []
    store = DyingWriter(redis_server.url, prefix=redis_prefix, board=board, on_fatal=fatal.append)
    await store.open()
    try:
        store.save_session(view("a", "2026-01-01T00:00:00.000Z"))
        waiter = asyncio.ensure_future(store.flush(timeout=60))
        await asyncio.sleep(0)  # one step: the waiter is now waiting on the writer
        assert not waiter.done()

        store.die.set()
        with pytest.raises(StoreUnavailable, match="writer has stopped"):
            await asyncio.wait_for(waiter, 10)  # far below the flush timeout: answered at once
        assert fatal == ["the store's session writer has stopped"]
        assert board.is_down(STORE) and not store.healthy
        with pytest.raises(StoreUnavailable):
            store.check_capacity()
    finally:
        await store.aclose()


async def test_a_closed_store_answers_rather_than_hangs(open_store: StoreFactory) -> None:
    store = await open_store()
    store.save_session(view("a", "2026-01-01T00:00:00.000Z"))
    await store.aclose()  # writes what is pending first
    with pytest.raises(StoreUnavailable):
        await store.get_session("b")
    with pytest.raises(StoreUnavailable):
        await store.ping()
    reader = await open_store()
    assert await reader.get_session("a") is not None


# start-up -----------------------------------------------------------------------------------

SECRET = "s3cret-Pa55word"


def nothing_logged_holds(secret: str, caplog: pytest.LogCaptureFixture) -> bool:
    return all(secret not in str(record.__dict__) for record in caplog.records)


@pytest.mark.parametrize(
    "url",
    [
        f"redis://manager:{SECRET}@127.0.0.1:{{port}}/0",
        f"redis://127.0.0.1:{{port}}/0?password={SECRET}",
    ],
)
async def test_no_redis_listening_stops_start_up_quickly_with_one_line(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    port = free_port()  # nothing listens there
    store = RedisStore(url.format(port=port), timeout=TIMEOUT, flush_timeout=1.0, **FAST)
    started = time.monotonic()
    with pytest.raises(StartupFailed) as raised:
        await store.open()
    assert time.monotonic() - started < 1.0 + SLACK
    message = str(raised.value)
    assert message.startswith(f"cannot reach Redis at 127.0.0.1:{port}/0: no answer within 1 s")
    assert "\n" not in message
    assert SECRET not in message
    assert nothing_logged_holds(SECRET, caplog)


async def test_credentials_redis_refuses_stop_start_up_at_once(
    redis_server: RedisUnderTest, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"redis://manager:{SECRET}@127.0.0.1:{redis_server.port}/0"  # no such user there
    store = RedisStore(url, timeout=TIMEOUT, flush_timeout=30.0, **FAST)
    started = time.monotonic()
    with pytest.raises(StartupFailed) as raised:
        await store.open()
    assert time.monotonic() - started < TIMEOUT + SLACK  # not retried until flush_timeout
    message = str(raised.value)
    assert message.startswith(f"cannot reach Redis at 127.0.0.1:{redis_server.port}/0: ")
    assert "\n" not in message
    assert SECRET not in message
    assert nothing_logged_holds(SECRET, caplog)


async def test_a_url_that_is_no_redis_url_stops_start_up() -> None:
    with pytest.raises(StartupFailed, match="not a valid Redis URL"):
        await RedisStore(f"http://user:{SECRET}@127.0.0.1:1/").open()
