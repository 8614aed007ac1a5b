"""The event log: ids, the event shape, credential scrubbing, filters, the bounded history and
its gaps, and subscriptions (replay, live, slow readers, closing)."""

from __future__ import annotations

import asyncio
import re
import time

import orjson
import pytest

from session_manager.events import (
    Event,
    EventLog,
    EventType,
    MissedReason,
    Subscription,
)

T = EventType
RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def ids(events: list[Event]) -> list[int]:
    return [event.id for event in events]


async def next_event(subscription: Subscription, timeout: float = 2.0) -> Event:
    async with asyncio.timeout(timeout):
        return await anext(subscription)


# ids and shape -------------------------------------------------------------------------------


def test_ids_are_consecutive_and_increasing() -> None:
    log = EventLog(first_id=7)
    made = [log.append(T.SESSION_CREATED, session_id=f"s{n}") for n in range(5)]
    assert ids(made) == [7, 8, 9, 10, 11]
    assert log.first_id == 7
    assert log.last_id == 11


def test_a_later_log_starts_above_an_earlier_one_and_refuses_its_ids() -> None:
    before = EventLog()
    for _ in range(3):
        before.append(T.SESSION_CREATED, session_id="s")
    time.sleep(0.01)
    after = EventLog()
    assert after.first_id > before.last_id
    fresh = after.append(T.SESSION_CREATED, session_id="t")

    page = after.since(before.last_id)

    assert ids(page.events) == [fresh.id]
    assert page.missed is not None
    assert page.missed.reason is MissedReason.UNKNOWN_LAST_EVENT_ID
    assert page.missed.to_data()["count"] is None


def test_event_json_has_exactly_the_public_fields() -> None:
    log = EventLog(first_id=1)
    event = log.append(
        T.MICROSERVICE_JOINED, session_id="s1", service_id="asr-1", data={"identity": "asr-1"}
    )
    body = orjson.loads(event.to_json())
    assert body == {
        "id": 1,
        "type": "MicroserviceJoined",
        "timestamp": event.timestamp,
        "session_id": "s1",
        "service_id": "asr-1",
        "data": {"identity": "asr-1"},
    }
    assert RFC3339_MS.match(body["timestamp"])
    registry_event = log.append(T.MICROSERVICE_REGISTERED, service_id="asr-1")
    assert orjson.loads(registry_event.to_json())["session_id"] is None


def test_credentials_never_appear_in_an_event() -> None:
    log = EventLog(first_id=1)
    event = log.append(
        T.SESSION_CREATED,
        session_id="s1",
        data={
            "room_name": "room-s1",
            "access_token": "eyJ-client-token",
            "livekit": {"api_secret": "lk-secret", "url": "ws://lk"},
            "services": [{"service_id": "asr-1", "Token": "eyJ-service-token"}],
            "metadata": {"webhook_password": "pw", "purpose": "demo"},
        },
    )
    raw = event.to_json()
    for secret in (b"eyJ-client-token", b"lk-secret", b"eyJ-service-token", b'pw"'):
        assert secret not in raw
    assert event.data == {
        "room_name": "room-s1",
        "livekit": {"url": "ws://lk"},
        "services": [{"service_id": "asr-1"}],
        "metadata": {"purpose": "demo"},
    }


def test_data_that_json_cannot_express_does_not_break_append() -> None:
    log = EventLog(first_id=1)
    deep: dict[str, object] = {}
    node = deep
    for _ in range(300):  # deeper than orjson accepts
        child: dict[str, object] = {}
        node["next"] = child
        node = child
    event = log.append(T.SESSION_STATUS_CHANGED, session_id="s1", data=deep)
    assert orjson.loads(event.to_json())["data"] == {
        "data_error": "event data could not be serialized"
    }
    assert log.last_id == 1


# filters and paging --------------------------------------------------------------------------


def _mixed_log() -> EventLog:
    log = EventLog(first_id=1)
    log.append(T.SESSION_CREATED, session_id="a")  # 1
    log.append(T.SESSION_CREATED, session_id="b")  # 2
    log.append(T.MICROSERVICE_REGISTERED, service_id="asr-1")  # 3
    log.append(T.SESSION_READY, session_id="a")  # 4
    log.append(T.CLIENT_JOINED, session_id="b")  # 5
    log.append(T.SESSION_TERMINATED, session_id="a", data={"reason": "done"})  # 6
    return log


def test_since_filters_by_session_and_type() -> None:
    log = _mixed_log()
    assert ids(log.since(0).events) == [1, 2, 3, 4, 5, 6]
    assert ids(log.since(2).events) == [3, 4, 5, 6]
    assert ids(log.since(0, session_id="a").events) == [1, 4, 6]
    assert ids(log.since(1, session_id="a").events) == [4, 6]
    assert ids(log.since(0, types=["SessionCreated", "ClientJoined"]).events) == [1, 2, 5]
    assert ids(log.since(0, session_id="b", types={T.CLIENT_JOINED}).events) == [5]
    assert log.since(0, session_id="nobody").events == []
    assert not log.since(0).gap


def test_paging_with_a_limit_returns_every_event_once() -> None:
    log = _mixed_log()
    seen: list[int] = []
    after = 0
    for _ in range(10):
        page = log.since(after, limit=4)
        seen.extend(ids(page.events))
        after = page.next_id
        if not page.events:
            break
    assert seen == [1, 2, 3, 4, 5, 6]
    assert after == 6


def test_next_id_skips_events_that_do_not_match() -> None:
    log = _mixed_log()
    page = log.since(0, types={T.MICROSERVICE_REGISTERED})
    assert ids(page.events) == [3]
    assert page.next_id == 6  # nothing to look at again below 6
    limited = log.since(0, session_id="a", limit=2)
    assert ids(limited.events) == [1, 4]
    assert limited.next_id == 4


# the bounded history -------------------------------------------------------------------------


def test_history_keeps_the_last_n_events_and_reports_the_gap() -> None:
    log = EventLog(history=5, first_id=1)
    for n in range(12):
        log.append(T.SESSION_STATUS_CHANGED, session_id="s", data={"n": n})

    page = log.since(0)

    assert ids(page.events) == [8, 9, 10, 11, 12]
    assert log.oldest_id == 8
    assert page.missed is not None
    assert page.missed.to_data() == {
        "first_missed_id": 1,
        "last_missed_id": 7,
        "count": 7,
        "reason": "history_exceeded",
    }
    assert log.since(3).missed is not None
    assert log.since(3).missed.first_id == 4  # type: ignore[union-attr]
    inside = log.since(7)
    assert inside.missed is None
    assert ids(inside.events) == [8, 9, 10, 11, 12]


def test_a_session_gap_is_reported_only_when_that_session_lost_events() -> None:
    log = EventLog(history=3, first_id=1)
    log.append(T.SESSION_CREATED, session_id="b")  # 1, will be evicted
    for _ in range(3):
        log.append(T.SESSION_STATUS_CHANGED, session_id="a")  # 2, 3, 4

    assert log.since(0).gap
    kept_a = log.since(0, session_id="a")
    assert ids(kept_a.events) == [2, 3, 4]
    assert not kept_a.gap
    lost_b = log.since(0, session_id="b")
    assert lost_b.events == []
    assert lost_b.missed is not None
    assert (lost_b.missed.first_id, lost_b.missed.last_id) == (1, 1)
    assert not log.since(1, session_id="b").gap


def test_a_session_that_comes_back_after_losing_everything_keeps_its_gap() -> None:
    log = EventLog(history=2, first_id=1)
    log.append(T.SESSION_CREATED, session_id="a")  # 1
    log.append(T.SESSION_CREATED, session_id="b")  # 2
    log.append(T.SESSION_CREATED, session_id="c")  # 3: evicts 1, "a" has nothing kept
    log.append(T.SESSION_READY, session_id="a")  # 4

    page = log.since(0, session_id="a")

    assert ids(page.events) == [4]
    assert page.missed is not None
    assert page.missed.last_id == 1


def test_history_must_hold_something() -> None:
    with pytest.raises(ValueError):
        EventLog(history=0)


# subscriptions -------------------------------------------------------------------------------


async def test_subscription_replays_after_the_last_event_id_then_goes_live() -> None:
    log = _mixed_log()
    async with log.subscribe(last_event_id=4) as subscription:
        assert [(await next_event(subscription)).id for _ in range(2)] == [5, 6]
        log.append(T.CLIENT_LEFT, session_id="b")
        assert (await next_event(subscription)).id == 7


async def test_subscription_without_a_last_event_id_gets_only_new_events() -> None:
    log = _mixed_log()
    async with log.subscribe() as subscription:
        assert subscription.take_ready() == []
        log.append(T.CLIENT_LEFT, session_id="b")
        assert ids(subscription.take_ready()) == [7]


async def test_subscription_filters_and_only_wakes_for_what_it_wants() -> None:
    log = EventLog(first_id=1)
    async with log.subscribe(session_id="a", types={T.SESSION_READY}) as subscription:
        log.append(T.SESSION_READY, session_id="b")
        log.append(T.SESSION_STATUS_CHANGED, session_id="a")
        assert subscription.take_ready() == []
        assert not await subscription.wait(timeout=0.05)
        log.append(T.SESSION_READY, session_id="a")
        assert await subscription.wait(timeout=1.0)
        assert ids(subscription.take_ready()) == [3]


async def test_fan_out_to_many_subscribers_of_one_session() -> None:
    log = EventLog(first_id=1)
    subscriptions = [log.subscribe(session_id="s") for _ in range(1000)]
    received: list[list[int]] = [[] for _ in subscriptions]

    async def read(index: int, subscription: Subscription) -> None:
        async for event in subscription:
            received[index].append(event.id)
            if event.type == T.SESSION_TERMINATED:
                return

    readers = [asyncio.create_task(read(n, sub)) for n, sub in enumerate(subscriptions)]
    log.append(T.SESSION_CREATED, session_id="s")
    log.append(T.SESSION_CREATED, session_id="other")
    await asyncio.sleep(0)
    log.append(T.SESSION_READY, session_id="s")
    log.append(T.SESSION_TERMINATED, session_id="s")
    async with asyncio.timeout(5):
        await asyncio.gather(*readers)
    assert all(got == [1, 3, 4] for got in received)
    for subscription in subscriptions:
        subscription.close()
    assert log.subscriber_count == 0


async def test_a_reader_that_never_reads_slows_neither_the_writer_nor_other_readers() -> None:
    log = EventLog(history=100, first_id=1)
    stalled = log.subscribe(session_id="s", last_event_id=0)
    brisk = log.subscribe(session_id="s", last_event_id=0)
    brisk_ids: list[int] = []

    async def read_briskly() -> None:
        async for event in brisk:
            brisk_ids.append(event.id)
            if event.id == 1000:
                return

    reader = asyncio.create_task(read_briskly())
    for n in range(1000):
        event = log.append(T.SESSION_STATUS_CHANGED, session_id="s", data={"n": n})
        assert event.id == n + 1  # append returned at once: it never waits on a reader
        if n % 10 == 9:
            await asyncio.sleep(0)  # the loop runs other tasks, as the daemon's would
    async with asyncio.timeout(5):
        await reader
    assert brisk_ids == list(range(1, 1001))

    late = stalled.take_ready(1000)

    notice = late[0]
    assert notice.type == T.EVENTS_DROPPED
    assert notice.session_id == "s"
    assert notice.data == {
        "first_missed_id": 1,
        "last_missed_id": 900,
        "count": 900,
        "reason": "history_exceeded",
    }
    assert notice.id == 900  # resuming from it continues right after the gap
    assert ids(late[1:]) == list(range(901, 1001))
    assert stalled.take_ready() == []
    stalled.close()
    brisk.close()


async def test_a_reader_that_falls_behind_while_reading_is_told_once_and_continues() -> None:
    log = EventLog(history=10, first_id=1)
    subscription = log.subscribe(last_event_id=0)
    for _ in range(3):
        log.append(T.CLIENT_JOINED, session_id="s")
    assert ids(subscription.take_ready()) == [1, 2, 3]
    for _ in range(20):
        log.append(T.CLIENT_JOINED, session_id="s")

    batch = subscription.take_ready(5)

    assert batch[0].type == T.EVENTS_DROPPED
    assert batch[0].data["first_missed_id"] == 4
    assert batch[0].data["last_missed_id"] == 13
    assert ids(batch[1:]) == [14, 15, 16, 17]
    assert ids(subscription.take_ready()) == list(range(18, 24))


async def test_closing_a_subscription_ends_its_iteration_and_forgets_it() -> None:
    log = EventLog(first_id=1)
    subscription = log.subscribe(session_id="s")
    assert log.subscriber_count == 1
    received: list[Event] = []

    async def read() -> None:
        async for event in subscription:
            received.append(event)

    reader = asyncio.create_task(read())
    await asyncio.sleep(0.01)
    await subscription.aclose()
    async with asyncio.timeout(1):
        await reader
    assert received == []
    assert log.subscriber_count == 0
    log.append(T.SESSION_CREATED, session_id="s")
    assert subscription.take_ready() == []


async def test_closing_the_log_ends_every_subscription_but_still_records() -> None:
    log = EventLog(first_id=1)
    subscriptions = [log.subscribe(), log.subscribe(session_id="s")]
    waiters = [asyncio.create_task(sub.wait(timeout=5)) for sub in subscriptions]
    await asyncio.sleep(0.01)

    log.close()

    async with asyncio.timeout(1):
        assert await asyncio.gather(*waiters) == [True, True]
    assert all(sub.closed for sub in subscriptions)
    assert log.subscriber_count == 0
    assert log.subscribe().closed
    assert log.append(T.SESSION_TERMINATED, session_id="s").id == 1


def test_a_failing_listener_does_not_stop_append_or_the_other_listeners() -> None:
    log = EventLog(first_id=1)
    seen: list[int] = []

    def broken(event: Event) -> None:
        raise RuntimeError("listener bug")

    log.add_listener(broken)
    log.add_listener(lambda event: seen.append(event.id))
    assert log.append(T.SESSION_CREATED, session_id="s").id == 1
    log.remove_listener(broken)
    log.append(T.SESSION_READY, session_id="s")
    assert seen == [1, 2]
