"""The HTTP side of events: Server-Sent Events streams and JSON polling. The only module of this
package that knows aiohttp's server.

`GET /api/v1/events`
    Every event, optionally filtered by `session_id` and `type` (comma-separated, repeatable).
    The answer is an SSE stream when the request's Accept header names `text/event-stream` and
    it has neither `since` nor `limit`; otherwise it is one JSON page:
    `{"events": [...], "next": <id to pass as since>, "gap": bool, "missed"?: {...}}`, with the
    events after `since` (default 0: the oldest kept; at most 2^63-1), at most `limit` (default
    100, 1 to 1000).
    A stream starts after `Last-Event-ID` (header, else the `last_event_id` parameter); without
    one it carries only new events.

`GET /api/v1/sessions/{session_id}/events`
    One session's events as SSE (`type` filters them too), from its first kept event (or after
    `Last-Event-ID`); the stream ends once the session's `SessionTerminated` has been sent, which
    every filter lets through. An unknown session is 404.

Frames are `id: <id>\\nevent: <type>\\ndata: <event JSON>\\n\\n`; a stream quiet for
`keepalive` seconds gets a `: keep-alive` comment (one shared timer serves every stream). A
client too slow to keep up only falls behind in the history; past it, it gets one
`EventsDropped` event naming the ids it missed. Past `max_streams` open streams, a new one is 429
`TooManyRequests` with `Retry-After` (polling is not counted).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

import orjson
from aiohttp import web

from session_manager.errors import InvalidRequest, NotFound, TooManyRequests
from session_manager.events.log import EventLog
from session_manager.events.model import EVENT_TYPE_NAMES, Event, EventType
from session_manager.events.subscription import Subscription

log = logging.getLogger(__name__)

EVENTS_PATH = "/api/v1/events"
SESSION_EVENTS_PATH = "/api/v1/sessions/{session_id}/events"
DEFAULT_KEEPALIVE = 15.0
DEFAULT_POLL_LIMIT = 100
MAX_POLL_LIMIT = 1000
MAX_EVENT_ID = 2**63 - 1  # ids are 64-bit counters: anything larger is a client's mistake
WRITE_BATCH = 256
STREAMS_RETRY_AFTER = 5  # seconds: Retry-After of a stream refused by max_streams

KEEPALIVE_FRAME = b": keep-alive\n\n"
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # ask reverse proxies not to buffer the stream
}


class SessionPresence(StrEnum):
    UNKNOWN = "unknown"  # no such session: 404
    LIVE = "live"  # its stream waits for more events
    ENDED = "ended"  # its stream sends what is kept and ends


EventLogGetter = Callable[[web.Request], EventLog]
SessionPresenceLookup = Callable[[web.Request, str], Awaitable[SessionPresence]]


def sse_frame(event: Event) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.id, event.type.encode(), event.to_json())


def _integer(name: str, value: str, *, low: int = 0, high: int = MAX_EVENT_ID) -> int:
    # The value is not echoed: it may be kilobytes of anything.
    problem = f"{name}: must be a whole number from {low} to {high}"
    try:
        number = int(value)
    except ValueError:  # also a number of more than 4300 digits
        raise InvalidRequest(problem) from None
    if not low <= number <= high:
        raise InvalidRequest(problem)
    return number


def _types(request: web.Request) -> frozenset[str] | None:
    names = {
        name.strip() for value in request.query.getall("type", []) for name in value.split(",")
    }
    names.discard("")
    if not names:
        return None
    unknown = sorted(names - EVENT_TYPE_NAMES)
    if unknown:
        known = ", ".join(sorted(EVENT_TYPE_NAMES))
        raise InvalidRequest(f"type: unknown event type {unknown[0]!r} (known: {known})")
    return frozenset(names)


def _last_event_id(request: web.Request) -> int | None:
    header = request.headers.get("Last-Event-ID", "").strip()
    if header:
        return _integer("Last-Event-ID", header)
    query = request.query.get("last_event_id", "").strip()
    if query:
        return _integer("last_event_id", query)
    return None


def _wants_stream(request: web.Request) -> bool:
    if "since" in request.query or "limit" in request.query:
        return False
    return "text/event-stream" in request.headers.get("Accept", "")


def _page_body(events: Iterable[Event], next_id: int, missed: bytes | None) -> bytes:
    parts = [b'{"events":[', b",".join(event.to_json() for event in events), b'],"next":']
    parts.append(b"%d" % next_id)
    if missed is None:
        parts.append(b',"gap":false}')
    else:
        parts.extend((b',"gap":true,"missed":', missed, b"}"))
    return b"".join(parts)


@dataclass(slots=True)
class _Beat:
    wrote: bool = True  # the stream sent something since the last tick
    due: bool = False  # it has been quiet for a whole tick: send a keep-alive


class Heartbeat:
    """One timer for every open stream, instead of one per stream and wait.

    It ticks every `interval / 2` seconds while a stream is open; a stream that sent nothing
    since the previous tick is woken to send a keep-alive, so no stream stays silent for much
    more than `interval` seconds.
    """

    def __init__(self, interval: float) -> None:
        self._period = interval / 2
        self._streams: dict[Subscription, _Beat] = {}
        self._timer: asyncio.TimerHandle | None = None

    def join(self, subscription: Subscription) -> _Beat:
        beat = self._streams[subscription] = _Beat()
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._period, self._tick)
        return beat

    def leave(self, subscription: Subscription) -> None:
        self._streams.pop(subscription, None)
        if not self._streams and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        for subscription, beat in self._streams.items():
            if beat.wrote:
                beat.wrote = False
            else:
                beat.due = True
                subscription.wake()
        self._timer = asyncio.get_running_loop().call_later(self._period, self._tick)


class EventRoutes:
    """The two handlers, with what they need from the rest of the manager."""

    def __init__(
        self,
        event_log: EventLogGetter,
        session_presence: SessionPresenceLookup,
        *,
        keepalive: float = DEFAULT_KEEPALIVE,
        max_streams: int | None = None,
    ) -> None:
        if keepalive <= 0:
            raise ValueError("keepalive must be positive")
        self._event_log = event_log
        self._session_presence = session_presence
        self._heartbeat = Heartbeat(keepalive)
        self._max_streams = max_streams
        self.open_streams = 0

    async def all_events(self, request: web.Request) -> web.StreamResponse:
        event_log = self._event_log(request)
        session_id = request.query.get("session_id") or None
        types = _types(request)
        if not _wants_stream(request):
            return self._page(request, event_log, session_id, types)
        last_event_id = _last_event_id(request)
        subscription = event_log.subscribe(
            session_id=session_id, types=types, last_event_id=last_event_id
        )
        return await self._stream(request, subscription, until_terminated=False, ended=False)

    async def session_events(self, request: web.Request) -> web.StreamResponse:
        session_id = request.match_info["session_id"]
        last_event_id = _last_event_id(request)
        types = _types(request)
        if types is not None:  # the stream ends with SessionTerminated, whatever the filter
            types = types | {EventType.SESSION_TERMINATED.value}
        presence = await self._session_presence(request, session_id)
        if presence is SessionPresence.UNKNOWN:
            raise NotFound(f"Session {session_id} not found")
        # No await between here and the subscription: nothing appended in between is missed.
        subscription = self._event_log(request).subscribe(
            session_id=session_id,
            types=types,
            last_event_id=0 if last_event_id is None else last_event_id,
        )
        return await self._stream(
            request,
            subscription,
            until_terminated=True,
            ended=presence is SessionPresence.ENDED,
        )

    def _page(
        self,
        request: web.Request,
        event_log: EventLog,
        session_id: str | None,
        types: frozenset[str] | None,
    ) -> web.Response:
        since = _integer("since", request.query.get("since", "0"))
        limit = _integer(
            "limit", request.query.get("limit", str(DEFAULT_POLL_LIMIT)), low=1, high=MAX_POLL_LIMIT
        )
        page = event_log.read(since, session_id=session_id, types=types, limit=limit)
        missed = None if page.missed is None else orjson.dumps(page.missed.to_data())
        body = _page_body(page.events, page.next_id, missed)
        return web.Response(body=body, content_type="application/json", charset="utf-8")

    async def _stream(
        self,
        request: web.Request,
        subscription: Subscription,
        *,
        until_terminated: bool,
        ended: bool,
    ) -> web.StreamResponse:
        if self._max_streams is not None and self.open_streams >= self._max_streams:
            subscription.close()
            raise TooManyRequests(
                f"Too many open event streams (at most {self._max_streams})",
                retry_after=STREAMS_RETRY_AFTER,
            )
        self.open_streams += 1
        response = web.StreamResponse(headers=SSE_HEADERS)
        beat = self._heartbeat.join(subscription)
        try:
            await response.prepare(request)
            while True:
                batch = subscription.take_ready(WRITE_BATCH)
                if batch:
                    batch, finished = _up_to_termination(batch, until_terminated)
                    beat.wrote, beat.due = True, False
                    await response.write(b"".join(sse_frame(event) for event in batch))
                    if finished:
                        break
                    continue
                if ended or subscription.closed:
                    break
                if beat.due:
                    beat.wrote, beat.due = True, False
                    await response.write(KEEPALIVE_FRAME)
                    continue
                await subscription.wait()
            await response.write_eof()
        except ConnectionError:
            log.debug(
                "event stream client went away",
                extra={"path": request.path, "cursor": subscription.cursor},
            )
        finally:
            self.open_streams -= 1
            self._heartbeat.leave(subscription)
            subscription.close()
        return response


def _up_to_termination(batch: list[Event], until_terminated: bool) -> tuple[list[Event], bool]:
    if not until_terminated:
        return batch, False
    for index, event in enumerate(batch):
        if event.type == EventType.SESSION_TERMINATED:
            return batch[: index + 1], True
    return batch, False


def add_event_routes(
    app: web.Application,
    *,
    event_log: EventLogGetter,
    session_presence: SessionPresenceLookup,
    keepalive: float = DEFAULT_KEEPALIVE,
    max_streams: int | None = None,
) -> EventRoutes:
    """Add `GET /api/v1/events` and `GET /api/v1/sessions/{session_id}/events` to `app`; past
    `max_streams` open streams a new one is 429 `TooManyRequests`."""
    routes = EventRoutes(event_log, session_presence, keepalive=keepalive, max_streams=max_streams)
    app.router.add_get(EVENTS_PATH, routes.all_events, allow_head=False)
    app.router.add_get(SESSION_EVENTS_PATH, routes.session_events, allow_head=False)
    return routes
