"""The events over HTTP, as a client sees them: SSE streams (resume with Last-Event-ID, keep-alive,
per-session streams that end, slow clients) and JSON polling. A real aiohttp app with the routes
and the project's error middleware, through the aiohttp test client."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from session_manager.api.errors import error_middleware
from session_manager.events import EventLog, EventType, SessionPresence, add_event_routes
from tests.polling import eventually

T = EventType
Client = TestClient[web.Request, web.Application]
SSE = {"Accept": "text/event-stream"}


@dataclass
class Frame:
    id: int | None = None
    event: str | None = None
    data: dict[str, Any] | None = None
    comment: str | None = None


def parse_frame(raw: bytes) -> Frame:
    frame = Frame()
    for line in raw.decode().strip("\n").split("\n"):
        field, _, value = line.partition(": ")
        if field == "":
            frame.comment = value
        elif field == "id":
            frame.id = int(value)
        elif field == "event":
            frame.event = value
        elif field == "data":
            frame.data = orjson.loads(value)
    return frame


async def read_frame(response: Any, timeout: float = 5.0) -> Frame | None:
    """The next frame, or None at the end of the stream."""
    async with asyncio.timeout(timeout):
        raw = await response.content.readuntil(b"\n\n")
    return parse_frame(raw) if raw.endswith(b"\n\n") else None


async def read_events(response: Any, count: int) -> list[Frame]:
    frames: list[Frame] = []
    while len(frames) < count:
        frame = await read_frame(response)
        assert frame is not None, f"stream ended after {len(frames)} of {count} events"
        if frame.comment is None:
            frames.append(frame)
    return frames


async def read_to_end(response: Any) -> list[Frame]:
    frames: list[Frame] = []
    while (frame := await read_frame(response)) is not None:
        if frame.comment is None:
            frames.append(frame)
    return frames


MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture
def sessions() -> dict[str, SessionPresence]:
    return {}


@pytest.fixture
def make_client(aiohttp_client: Any, sessions: dict[str, SessionPresence]) -> MakeClient:
    async def make(event_log: EventLog, keepalive: float = 30.0) -> Client:
        async def presence(request: web.Request, session_id: str) -> SessionPresence:
            return sessions.get(session_id, SessionPresence.UNKNOWN)

        app = web.Application(middlewares=[error_middleware])
        add_event_routes(
            app,
            event_log=lambda request: event_log,
            session_presence=presence,
            keepalive=keepalive,
        )
        client: Client = await aiohttp_client(app)
        return client

    return make


@pytest.fixture
def event_log() -> EventLog:
    return EventLog(history=1000, first_id=1)


# JSON polling --------------------------------------------------------------------------------


async def test_polling_pages_through_every_event_once(
    make_client: MakeClient, event_log: EventLog
) -> None:
    for n in range(7):
        event_log.append(T.SESSION_STATUS_CHANGED, session_id="s", data={"n": n})
    client = await make_client(event_log)

    seen: list[int] = []
    since = 0
    for _ in range(10):
        response = await client.get("/api/v1/events", params={"since": since, "limit": 3})
        assert response.status == 200
        assert response.content_type == "application/json"
        body = await response.json()
        assert body["gap"] is False
        seen.extend(event["id"] for event in body["events"])
        since = body["next"]
        if not body["events"]:
            break

    assert seen == [1, 2, 3, 4, 5, 6, 7]
    first = event_log.since(0).events[0]
    response = await client.get("/api/v1/events", params={"since": 0, "limit": 1})
    assert (await response.json())["events"] == [orjson.loads(first.to_json())]


async def test_polling_filters_by_session_and_types(
    make_client: MakeClient, event_log: EventLog
) -> None:
    event_log.append(T.SESSION_CREATED, session_id="a")  # 1
    event_log.append(T.SESSION_CREATED, session_id="b")  # 2
    event_log.append(T.CLIENT_JOINED, session_id="a")  # 3
    event_log.append(T.SESSION_READY, session_id="a")  # 4
    event_log.append(T.MICROSERVICE_REGISTERED, service_id="asr-1")  # 5
    client = await make_client(event_log)

    async def polled(query: str) -> list[int]:
        response = await client.get(f"/api/v1/events?{query}")
        assert response.status == 200, await response.text()
        return [event["id"] for event in (await response.json())["events"]]

    assert await polled("") == [1, 2, 3, 4, 5]  # no Accept: text/event-stream, so JSON
    assert await polled("session_id=a") == [1, 3, 4]
    assert await polled("type=SessionCreated,MicroserviceRegistered") == [1, 2, 5]
    assert await polled("type=SessionCreated&type=SessionReady") == [1, 2, 4]
    assert await polled("session_id=a&type=SessionReady, ClientJoined") == [3, 4]
    assert await polled("since=2&limit=1") == [3]


async def test_polling_reports_a_gap_past_the_history(make_client: MakeClient) -> None:
    small = EventLog(history=3, first_id=1)
    for _ in range(5):
        small.append(T.CLIENT_JOINED, session_id="s")
    client = await make_client(small)

    body = await (await client.get("/api/v1/events", params={"since": 1})).json()

    assert [event["id"] for event in body["events"]] == [3, 4, 5]
    assert body["gap"] is True
    assert body["missed"] == {
        "first_missed_id": 2,
        "last_missed_id": 2,
        "count": 1,
        "reason": "history_exceeded",
    }
    assert body["next"] == 5


@pytest.mark.parametrize(
    ("query", "mentions"),
    [
        ("type=SessionCreatd", "SessionCreatd"),
        ("since=yesterday", "since"),
        ("limit=0", "limit"),
        ("limit=100000", "limit"),
    ],
)
async def test_bad_parameters_are_refused_with_the_error_envelope(
    make_client: MakeClient, event_log: EventLog, query: str, mentions: str
) -> None:
    client = await make_client(event_log)
    response = await client.get(f"/api/v1/events?{query}")
    assert response.status == 400
    body = await response.json()
    assert set(body) == {"error", "message", "timestamp"}
    assert body["error"] == "InvalidRequest"
    assert mentions in body["message"]


# SSE: the whole stream -----------------------------------------------------------------------


async def test_a_stream_carries_new_events_as_sse_frames(
    make_client: MakeClient, event_log: EventLog
) -> None:
    event_log.append(T.SESSION_CREATED, session_id="old")
    client = await make_client(event_log)
    async with client.get("/api/v1/events", headers=SSE) as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        assert response.headers["Cache-Control"] == "no-cache"
        created = event_log.append(T.SESSION_CREATED, session_id="s", data={"room_name": "r"})
        frame = (await read_events(response, 1))[0]
    assert frame.id == created.id == 2
    assert frame.event == "SessionCreated"
    assert frame.data == orjson.loads(created.to_json())


async def test_resuming_with_last_event_id_loses_and_repeats_nothing(
    make_client: MakeClient, event_log: EventLog
) -> None:
    client = await make_client(event_log)
    for n in range(3):
        event_log.append(T.SESSION_STATUS_CHANGED, session_id=f"s{n % 2}")
    received: list[int] = []

    first = await client.get("/api/v1/events", headers={**SSE, "Last-Event-ID": "0"})
    received += [frame.id or 0 for frame in await read_events(first, 3)]
    event_log.append(T.CLIENT_JOINED, session_id="s0")
    event_log.append(T.CLIENT_JOINED, session_id="s1")
    received += [frame.id or 0 for frame in await read_events(first, 1)]
    first.close()  # the client goes away in the middle, one event unread
    for _ in range(3):
        event_log.append(T.CLIENT_LEFT, session_id="s0")

    second = await client.get("/api/v1/events", headers={**SSE, "Last-Event-ID": str(received[-1])})
    received += [frame.id or 0 for frame in await read_events(second, 4)]
    event_log.append(T.SESSION_TERMINATED, session_id="s0")
    received += [frame.id or 0 for frame in await read_events(second, 1)]
    second.close()

    assert received == list(range(1, 10))
    # The server noticed the first client leaving and dropped its subscription.
    await eventually(lambda: event_log.subscriber_count <= 1)


async def test_the_last_event_id_parameter_is_a_fallback_for_the_header(
    make_client: MakeClient, event_log: EventLog
) -> None:
    for _ in range(4):
        event_log.append(T.CLIENT_JOINED, session_id="s")
    client = await make_client(event_log)
    async with client.get("/api/v1/events?last_event_id=2", headers=SSE) as response:
        assert [frame.id for frame in await read_events(response, 2)] == [3, 4]


async def test_a_stream_can_be_filtered(make_client: MakeClient, event_log: EventLog) -> None:
    client = await make_client(event_log)
    query = "session_id=a&type=SessionReady&type=SessionTerminated"
    async with client.get(f"/api/v1/events?{query}", headers=SSE) as response:
        event_log.append(T.SESSION_READY, session_id="b")
        event_log.append(T.CLIENT_JOINED, session_id="a")
        ready = event_log.append(T.SESSION_READY, session_id="a")
        ended = event_log.append(T.SESSION_TERMINATED, session_id="a", data={"reason": "done"})
        frames = await read_events(response, 2)
    assert [(frame.id, frame.event) for frame in frames] == [
        (ready.id, "SessionReady"),
        (ended.id, "SessionTerminated"),
    ]
    assert frames[1].data is not None
    assert frames[1].data["data"] == {"reason": "done"}


async def test_keep_alive_comments_flow_while_idle(
    make_client: MakeClient, event_log: EventLog
) -> None:
    client = await make_client(event_log, keepalive=0.05)
    async with client.get("/api/v1/events", headers=SSE) as response:
        frames = [await read_frame(response, timeout=2.0) for _ in range(3)]
        event = event_log.append(T.SESSION_CREATED, session_id="s")
        after = await read_events(response, 1)
    assert [frame.comment if frame else None for frame in frames] == ["keep-alive"] * 3
    assert after[0].id == event.id


async def test_a_client_that_stops_reading_does_not_hold_up_another(
    make_client: MakeClient,
) -> None:
    event_log = EventLog(history=300, first_id=1)
    client = await make_client(event_log)
    padding = "x" * 16_000  # enough to fill the socket buffers of the stalled client
    total = 1500
    stalled = await client.get("/api/v1/events", headers={**SSE, "Last-Event-ID": "0"})
    brisk = await client.get("/api/v1/events", headers={**SSE, "Last-Event-ID": "0"})
    brisk_ids: list[int] = []

    async def read_briskly() -> None:
        while not brisk_ids or brisk_ids[-1] < total:
            brisk_ids.extend(frame.id or 0 for frame in await read_events(brisk, 1))

    def brisk_caught_up() -> bool:
        return len(brisk_ids) >= event_log.last_id

    reader = asyncio.create_task(read_briskly())
    for _ in range(total // 10):
        for _ in range(10):
            event_log.append(T.SESSION_STATUS_CHANGED, session_id="s", data={"pad": padding})
        # The brisk client keeps up, whatever the stalled one does.
        await eventually(brisk_caught_up)
    await reader
    assert brisk_ids == list(range(1, total + 1))

    # The stalled client now reads: what was in flight, one notice of the gap, then the rest.
    late = await read_events(stalled, 1)
    while late[-1].id != total:
        late += await read_events(stalled, 1)
    notices = [frame for frame in late if frame.event == "EventsDropped"]
    assert len(notices) == 1
    gap = notices[0].data
    assert gap is not None
    missed = gap["data"]
    assert missed["reason"] == "history_exceeded"
    assert missed["last_missed_id"] <= total - 300  # only the history is kept
    before = [frame.id for frame in late[: late.index(notices[0])]]
    after = [frame.id for frame in late[late.index(notices[0]) + 1 :]]
    assert before == list(range(1, missed["first_missed_id"]))
    assert notices[0].id == missed["last_missed_id"]
    assert after == list(range(missed["last_missed_id"] + 1, total + 1))
    assert missed["count"] == missed["last_missed_id"] - missed["first_missed_id"] + 1
    stalled.close()
    brisk.close()


# SSE: one session ----------------------------------------------------------------------------


async def test_an_unknown_session_is_404_with_the_error_envelope(
    make_client: MakeClient, event_log: EventLog
) -> None:
    client = await make_client(event_log)
    response = await client.get("/api/v1/sessions/nope/events", headers=SSE)
    assert response.status == 404
    body = await response.json()
    assert body["error"] == "NotFound"
    assert "nope" in body["message"]
    assert set(body) == {"error", "message", "timestamp"}


async def test_a_session_stream_replays_its_history_and_ends_after_termination(
    make_client: MakeClient, event_log: EventLog, sessions: dict[str, SessionPresence]
) -> None:
    sessions["s"] = SessionPresence.LIVE
    created = event_log.append(T.SESSION_CREATED, session_id="s")
    event_log.append(T.SESSION_CREATED, session_id="other")
    client = await make_client(event_log, keepalive=0.05)
    async with client.get("/api/v1/sessions/s/events", headers=SSE) as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        first = await read_events(response, 1)
        ready = event_log.append(T.SESSION_READY, session_id="s")
        event_log.append(T.SESSION_READY, session_id="other")
        ended = event_log.append(T.SESSION_TERMINATED, session_id="s", data={"reason": "bye"})
        rest = await read_to_end(response)
    assert [frame.id for frame in first + rest] == [created.id, ready.id, ended.id]
    assert rest[-1].event == "SessionTerminated"
    assert rest[-1].data is not None
    assert rest[-1].data["data"] == {"reason": "bye"}
    await eventually(lambda: event_log.subscriber_count == 0)


async def test_a_filtered_session_stream_still_ends_with_the_termination(
    make_client: MakeClient, event_log: EventLog, sessions: dict[str, SessionPresence]
) -> None:
    sessions["s"] = SessionPresence.LIVE
    client = await make_client(event_log)
    async with client.get("/api/v1/sessions/s/events?type=ClientJoined", headers=SSE) as response:
        event_log.append(T.SESSION_READY, session_id="s")
        joined = event_log.append(T.CLIENT_JOINED, session_id="s")
        ended = event_log.append(T.SESSION_TERMINATED, session_id="s")
        frames = await read_to_end(response)
    assert [frame.id for frame in frames] == [joined.id, ended.id]


async def test_an_ended_session_replays_what_is_kept_and_ends(
    make_client: MakeClient, event_log: EventLog, sessions: dict[str, SessionPresence]
) -> None:
    sessions["s"] = SessionPresence.ENDED
    created = event_log.append(T.SESSION_CREATED, session_id="s")
    ended = event_log.append(T.SESSION_TERMINATED, session_id="s", data={"reason": "done"})
    client = await make_client(event_log)

    async with client.get("/api/v1/sessions/s/events", headers=SSE) as response:
        frames = await read_to_end(response)
    assert [frame.id for frame in frames] == [created.id, ended.id]

    resumed = {**SSE, "Last-Event-ID": str(ended.id)}
    async with client.get("/api/v1/sessions/s/events", headers=resumed) as response:
        assert await read_to_end(response) == []


async def test_closing_the_log_ends_open_streams(
    make_client: MakeClient, event_log: EventLog, sessions: dict[str, SessionPresence]
) -> None:
    sessions["s"] = SessionPresence.LIVE
    client = await make_client(event_log)
    everything = await client.get("/api/v1/events", headers=SSE)
    one_session = await client.get("/api/v1/sessions/s/events", headers=SSE)
    await eventually(lambda: event_log.subscriber_count == 2)

    event_log.close()

    assert await read_to_end(everything) == []
    assert await read_to_end(one_session) == []
