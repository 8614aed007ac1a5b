"""Several managers on one Redis: events go through one stream (`RedisEventFeed`), so every
process's log holds every event with the same id, SSE resumes on any process, and each event
goes to the outbound webhooks of one process only.

Each "process" here is an `EventLog` and its `RedisEventFeed`, in this test process, on the
session's real redis-server (each test under its own key prefix).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.client import ClientResponse
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from session_manager.api.routes import DAEMON
from session_manager.errors import StartupFailed
from session_manager.events import (
    Event,
    EventLog,
    EventType,
    MissedReason,
    Subscription,
    add_event_routes,
)
from session_manager.events.redis_feed import GROUP, RedisEventFeed, stream_event_id
from session_manager.events.sse import SessionPresence
from session_manager.health_board import STORE, HealthBoard
from session_manager.supervision import cancel_and_wait
from tests.conftest import ManagerFactory, RedisUnderTest, free_port
from tests.polling import eventually

pytestmark = pytest.mark.integration

T = EventType


@dataclass
class Process:
    """One manager's share of the events: its log, its feed, what its outbound listener got."""

    log: EventLog
    feed: RedisEventFeed
    sent: list[Event] = field(default_factory=list)
    fatal: list[str] = field(default_factory=list)

    def ids(self) -> list[int]:
        return [event.id for event in self.log.since(0).events]

    def tasks(self) -> list[asyncio.Task[Any]]:
        return [task for task in asyncio.all_tasks() if task.get_name().endswith(self.feed.node_id)]


class Cluster:
    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self.processes: list[Process] = []

    async def start(
        self,
        *,
        history: int = 100,
        outbound: Callable[[Process, Event], None] | None = None,
        **options: Any,
    ) -> Process:
        settings: dict[str, Any] = {
            "timeout": 1.0,
            "block": 0.2,
            "claim_idle": 0.5,
            "retry_backoff": 0.02,
            "max_backoff": 0.2,
            **options,
        }
        fatal: list[str] = []  # what the daemon's `fail` would hear
        feed = RedisEventFeed(
            self.url,
            node_id=uuid.uuid4().hex[:12],
            prefix=self.prefix,
            history=history,
            on_fatal=fatal.append,
            **settings,
        )
        process = Process(EventLog(history, sink=feed), feed, fatal=fatal)
        if outbound is not None:
            listener = outbound
            feed.outbound(lambda event: listener(process, event))
        await feed.start(process.log)
        self.processes.append(process)
        return process

    async def aclose(self) -> None:
        for process in self.processes:
            await process.feed.aclose(5.0)


@pytest.fixture
async def cluster(redis_server: RedisUnderTest, redis_prefix: str) -> AsyncIterator[Cluster]:
    cluster = Cluster(redis_server.url, redis_prefix)
    try:
        yield cluster
    finally:
        await cluster.aclose()


@pytest.fixture
async def raw_redis(redis_server: RedisUnderTest) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


def record(process: Process, event: Event) -> None:
    process.sent.append(event)


def append_from(process: Process, origin: str, n: int, session: str) -> None:
    process.log.append(
        T.SESSION_STATUS_CHANGED, session_id=session, data={"origin": origin, "n": n}
    )


async def take(subscription: Subscription, count: int) -> list[Event]:
    """The next `count` events of a subscription, as a stream reads them."""
    events: list[Event] = []
    async with asyncio.timeout(10):
        while len(events) < count:
            await subscription.wait()
            events += subscription.take_ready(count - len(events))
    return events


def numbers(events: list[Event], origin: str) -> list[int]:
    return [event.data["n"] for event in events if event.data.get("origin") == origin]


# ----------------------------------------------------------------------- one order everywhere


async def test_events_of_two_processes_reach_both_with_the_same_ids_in_one_order(
    cluster: Cluster,
) -> None:
    a = await cluster.start()
    b = await cluster.start()
    for n in range(40):
        if n % 2:
            append_from(a, "a", n, f"a{n % 3}")
        else:
            append_from(b, "b", n, f"b{n % 3}")

    await eventually(lambda: len(a.ids()) == 40 and len(b.ids()) == 40)
    on_a, on_b = a.log.since(0).events, b.log.since(0).events
    assert [e.to_json() for e in on_a] == [e.to_json() for e in on_b]  # ids, times, data
    ids = [event.id for event in on_a]
    assert ids == sorted(set(ids))  # increasing, no repeat
    assert sorted(e.data["n"] for e in on_a) == list(range(40))
    for origin in ("a", "b"):  # each process's events in the order it appended them
        assert numbers(on_a, origin) == sorted(numbers(on_a, origin))
    for session in ("a0", "a1", "a2", "b0", "b1", "b2"):
        mine = [e.data["n"] for e in a.log.since(0, session_id=session).events]
        assert mine and mine == sorted(mine)
        assert mine == [e.data["n"] for e in b.log.since(0, session_id=session).events]
    assert a.feed.stats().written == 20 and b.feed.stats().written == 20
    assert a.feed.stats().dropped == 0


async def test_append_returns_at_once_and_the_event_comes_back_with_its_id(
    cluster: Cluster,
) -> None:
    a = await cluster.start()
    made = a.log.append(T.SESSION_CREATED, session_id="s", data={"access_token": "x", "k": 1})
    assert made.id == 0  # not in the history yet: the stream gives it its id
    await eventually(lambda: a.log.recorded == 1)
    (event,) = a.log.since(0).events
    assert event.id > 0 and event.type == T.SESSION_CREATED and event.session_id == "s"
    assert event.data == {"k": 1}  # the credential never went to Redis
    assert event.timestamp == made.timestamp


# --------------------------------------------------------------------------- SSE, resumed


async def read_frames(response: ClientResponse, count: int) -> list[tuple[int, str, bytes]]:
    """`count` SSE frames as (id, event type, data)."""
    frames: list[tuple[int, str, bytes]] = []
    fields: dict[str, bytes] = {}
    async with asyncio.timeout(10):
        while len(frames) < count:
            line = await response.content.readline()
            if line == b"\n":
                if b"id" in fields:
                    frames.append((int(fields[b"id"]), fields[b"event"].decode(), fields[b"data"]))
                fields = {}
            elif line and not line.startswith(b":"):
                key, _, value = line.rstrip(b"\n").partition(b": ")
                fields[key] = value
    return frames


async def events_app(
    aiohttp_client: Any, event_log: EventLog
) -> TestClient[web.Request, web.Application]:
    async def presence(request: web.Request, session_id: str) -> SessionPresence:
        return SessionPresence.LIVE

    app = web.Application()
    add_event_routes(app, event_log=lambda _: event_log, session_presence=presence)
    client: TestClient[web.Request, web.Application] = await aiohttp_client(app)
    return client


async def test_an_sse_stream_resumed_on_another_process_has_no_gap_and_no_repeat(
    cluster: Cluster, aiohttp_client: Any
) -> None:
    a = await cluster.start()
    b = await cluster.start()
    http_a = await events_app(aiohttp_client, a.log)
    http_b = await events_app(aiohttp_client, b.log)
    for n in range(6):
        append_from(a if n % 2 else b, "ab"[n % 2], n, "s")
    await eventually(lambda: len(a.ids()) == 6 and len(b.ids()) == 6)

    accept = {"Accept": "text/event-stream"}
    first = await http_a.get("/api/v1/events?last_event_id=0", headers=accept)
    got = await read_frames(first, 4)
    first.close()  # the client goes away...
    for n in range(6, 10):
        append_from(a if n % 2 else b, "ab"[n % 2], n, "s")
    # ...and comes back to the other process
    headers = {**accept, "Last-Event-ID": str(got[-1][0])}
    second = await http_b.get("/api/v1/events", headers=headers)
    got += await read_frames(second, 6)
    second.close()

    assert T.EVENTS_DROPPED not in {kind for _, kind, _ in got}
    await eventually(lambda: len(a.ids()) == 10)
    assert [frame_id for frame_id, _, _ in got] == a.ids() == b.ids()
    sent = [orjson.loads(data)["data"]["n"] for _, _, data in got]
    assert sent == [event.data["n"] for event in a.log.since(0).events]
    assert sorted(sent) == list(range(10))


async def test_a_resume_from_an_id_this_process_has_not_read_yet_waits_for_what_follows(
    cluster: Cluster,
) -> None:
    a = await cluster.start()
    append_from(a, "a", 0, "s")
    await eventually(lambda: a.log.recorded == 1)
    ahead = a.log.last_id + 5  # as if another process had read an event this one has not yet
    page = a.log.since(ahead)
    assert page.missed is None and page.events == [] and page.next_id == ahead
    async with a.log.subscribe(last_event_id=ahead) as subscription:
        append_from(a, "a", 1, "s")
        (event,) = await take(subscription, 1)
    assert event.data["n"] == 1 and event.id > ahead
    # An id far past anything the stream can have given is unknown, as on a single process.
    nonsense = a.log.since(2**62)
    assert nonsense.missed is not None
    assert nonsense.missed.reason is MissedReason.UNKNOWN_LAST_EVENT_ID


async def test_a_process_started_later_loads_the_history_and_serves_resumes(
    cluster: Cluster,
) -> None:
    a = await cluster.start()
    b = await cluster.start()
    for n in range(10):
        append_from(a if n % 2 else b, "ab"[n % 2], n, f"s{n % 2}")
    await eventually(lambda: len(a.ids()) == 10 and len(b.ids()) == 10)
    events = a.log.since(0).events
    given = [event.id for event in events]

    c = await cluster.start()  # loaded before start() returns
    assert c.ids() == given
    page = c.log.since(given[4])
    assert page.missed is None and [e.id for e in page.events] == given[5:]
    session = c.log.since(given[4], session_id="s1")
    assert session.missed is None
    assert [e.id for e in session.events] == [e.id for e in events[5:] if e.session_id == "s1"]
    async with c.log.subscribe(last_event_id=given[-1]) as subscription:
        append_from(a, "a", 10, "s0")
        (new,) = await take(subscription, 1)
    assert new.data["n"] == 10
    await eventually(lambda: len(a.ids()) == 11)

    # A process keeping less history loads less, and says so to a resume from before it.
    d = await cluster.start(history=4)
    assert d.ids() == a.ids()[-4:]
    assert d.log.since(a.ids()[-5]).missed is None  # the entry just before: nothing missed
    too_old = d.log.since(given[2])
    assert too_old.missed is not None
    assert [e.id for e in too_old.events] == a.ids()[-4:]


async def test_a_reader_that_fell_behind_what_the_stream_keeps_tells_its_readers(
    cluster: Cluster, raw_redis: Redis
) -> None:
    c = await cluster.start(history=5)
    append_from(c, "c", 0, "s")
    await eventually(lambda: c.log.recorded == 1)
    subscription = c.log.subscribe(last_event_id=c.log.last_id)
    # Another writer adds 30 events at once and trims the stream to 5: 25 are gone before
    # this process could read them.
    body = orjson.dumps(
        {"type": "SessionCreated", "timestamp": "2026-01-01T00:00:00.000Z", "data": {}}
    )
    async with raw_redis.pipeline(transaction=True) as pipe:
        for _ in range(30):
            pipe.xadd(f"{cluster.prefix}events", {"event": body}, maxlen=5, approximate=False)
        await pipe.execute()

    notice, *after = await take(subscription, 6)
    subscription.close()
    assert notice.type == T.EVENTS_DROPPED
    assert notice.data["reason"] == MissedReason.HISTORY_EXCEEDED.value
    assert len(after) == 5 and notice.id < after[0].id


# ------------------------------------------------------------------ outbound webhooks, once


class Killed(BaseException):
    """The process dies here: between reading entries of the group and acknowledging them."""


async def test_each_event_goes_to_one_process_and_a_dead_ones_pending_are_claimed(
    cluster: Cluster, raw_redis: Redis
) -> None:
    dying = False

    def a_listener(process: Process, event: Event) -> None:
        process.sent.append(event)
        if dying:
            raise Killed  # no acknowledgement: the entries read stay pending on A

    a = await cluster.start(outbound=a_listener)
    b = await cluster.start(outbound=record, claim_idle=1.0)
    for n in range(30):
        append_from(a if n % 2 else b, "ab"[n % 2], n, f"s{n % 3}")
    await eventually(lambda: len(a.sent) + len(b.sent) >= 30 and len(a.ids()) == 30)
    all_ids = a.ids()
    to_a, to_b = {e.id for e in a.sent}, {e.id for e in b.sent}
    assert len(a.sent) + len(b.sent) == 30
    assert not to_a & to_b and to_a | to_b == set(all_ids)

    dying = True
    n = 30
    while not a.fatal:  # whichever event A's consumer reads next kills it
        append_from(b, "b", n, "s0")
        n += 1
        await eventually(lambda sent=n: len(a.sent) + len(b.sent) >= sent or bool(a.fatal))
        assert n < 100
    await cancel_and_wait(a.tasks())  # the rest of process A dies with it
    stream = f"{cluster.prefix}events"
    pending = await raw_redis.xpending_range(
        stream, GROUP, min="-", max="+", count=100, consumername=a.feed.node_id
    )
    left_on_a = {stream_event_id(entry["message_id"]) for entry in pending}
    assert left_on_a  # read by A, never acknowledged

    for extra in range(n, n + 5):  # A is gone: the next events go to B
        append_from(b, "b", extra, "s1")
    await eventually(lambda: left_on_a <= {e.id for e in b.sent})
    await eventually(lambda: len(b.ids()) == n + 5 and set(b.ids()[30:]) <= {e.id for e in b.sent})
    summary = await raw_redis.xpending(stream, GROUP)
    assert summary["pending"] == 0
    # Every event after A died reached B once; before, each reached one of them.
    assert len(b.sent) == len({e.id for e in b.sent})
    assert set(b.ids()[30:]) <= {e.id for e in b.sent}
    assert b.feed.stats().claimed >= len(left_on_a)
    assert a.fatal and "outbound" in a.fatal[0]


async def test_closing_offers_what_the_group_still_holds(cluster: Cluster) -> None:
    b = await cluster.start(outbound=record)
    for n in range(5):
        append_from(b, "b", n, "s")
    await b.feed.aclose(5.0)  # written, then offered, before the loops stop
    assert sorted(e.data["n"] for e in b.sent) == list(range(5))
    b.log.append(T.SESSION_CREATED, session_id="late")
    assert b.feed.stats().dropped == 1


# ----------------------------------------------------------------------------- Redis outage


async def test_a_redis_outage_drops_past_the_bound_and_nothing_else(
    cluster: Cluster, redis_server: RedisUnderTest
) -> None:
    board = HealthBoard()
    a = await cluster.start(max_queue=20, board=board)
    b = await cluster.start()
    for n in range(3):
        append_from(a, "a", n, "s")
    await eventually(lambda: len(a.ids()) == 3 and len(b.ids()) == 3)

    redis_server.stop()
    started = time.perf_counter()
    for n in range(3, 53):
        append_from(a, "a", n, "s")  # never raises, never waits
    assert time.perf_counter() - started < 0.5
    for n in range(100, 103):
        append_from(b, "b", n, "t")
    stats = a.feed.stats()
    assert (stats.queued, stats.dropped) == (20, 30)
    await eventually(lambda: board.is_down(STORE))
    problem = board.problem(STORE)
    assert problem is not None and "events" in problem.reason

    redis_server.start()
    # No await since the outage: the writer has not run, its queue is still full.
    append_from(a, "a", 53, "s")
    await eventually(lambda: a.feed.stats().queued == 0)
    for n in range(54, 56):
        append_from(a, "a", n, "s")
    append_from(b, "b", 103, "t")
    await eventually(lambda: len(a.ids()) == 3 + 20 + 2 + 4 and b.ids() == a.ids())
    events = a.log.since(0).events
    assert numbers(events, "a") == [*range(23), 54, 55]
    assert numbers(events, "b") == [100, 101, 102, 103]
    assert a.feed.stats().dropped == 31
    await eventually(lambda: not board.is_down(STORE))
    assert not a.fatal and not b.fatal


async def test_a_batch_whose_answer_was_lost_is_not_written_twice(
    cluster: Cluster, redis_server: RedisUnderTest
) -> None:
    board = HealthBoard()
    a = await cluster.start(timeout=0.3, board=board)
    append_from(a, "a", 0, "s")  # the writer's script is known to Redis from now on
    await eventually(lambda: a.feed.stats().written == 1)
    redis_server.pause()  # takes the script, answers nothing: the writer times out and retries
    try:
        for n in range(1, 5):
            append_from(a, "a", n, "s")
        await eventually(lambda: board.is_down(STORE))  # an attempt timed out
        assert a.feed.stats().written == 1
    finally:
        redis_server.resume()  # every attempt sent meanwhile now runs
    await eventually(lambda: a.feed.stats().queued == 0)
    append_from(a, "a", 5, "s")  # written after the batch: any repeat of it comes before
    await eventually(lambda: 5 in numbers(a.log.since(0).events, "a"))
    assert numbers(a.log.since(0).events, "a") == list(range(6))


async def test_the_password_of_the_url_is_never_told(caplog: pytest.LogCaptureFixture) -> None:
    feed = RedisEventFeed(
        f"redis://user:hunter2-secret@127.0.0.1:{free_port()}/0",
        node_id="n",
        start_timeout=0.5,
        retry_backoff=0.05,
    )
    with pytest.raises(StartupFailed) as failed:
        await feed.start(EventLog(sink=feed))
    assert "127.0.0.1" in str(failed.value)
    assert "hunter2" not in str(failed.value)
    assert caplog.records and not [r for r in caplog.records if "hunter2" in str(vars(r))]
    await feed.aclose(1.0)


# ------------------------------------------------------------------------------ in a manager


async def test_a_manager_on_redis_records_its_events_through_the_stream(
    start_manager: ManagerFactory,
    redis_server: RedisUnderTest,
    redis_prefix: str,
    raw_redis: Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager: Any = await start_manager(
        store="redis", redis_url=redis_server.url, redis_prefix=redis_prefix, redis_timeout=1.0
    )
    registered = await manager.post(
        "/api/v1/microservices/register",
        json={"service_id": "asr-1", "endpoint": "http://127.0.0.1:9", "metadata": {}},
    )
    assert registered.status == 200, await registered.text()

    event_log: EventLog = manager.app[DAEMON].events
    await eventually(lambda: bool(event_log.since(0, types=["MicroserviceRegistered"]).events))
    page = await (await manager.get("/api/v1/events?since=0&type=MicroserviceRegistered")).json()
    (event,) = page["events"]
    assert event["service_id"] == "asr-1"
    entries = await raw_redis.xrange(f"{redis_prefix}events", "-", "+")
    assert event["id"] in {stream_event_id(entry_id) for entry_id, _ in entries}

    await manager.close()  # the manager's shutdown, every stage
    assert "shutdown stage" not in caplog.text
