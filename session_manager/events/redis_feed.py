"""Events through one Redis stream, for managers that share a Redis (store = "redis").

`RedisEventFeed` owns its loops: a writer, a reader and, when this process sends outbound
webhooks, an outbound consumer; `start` starts them and `aclose` stops them (cancel and await).

- Writing: the process's `EventLog` is given the feed as its sink, so `append` only puts the
  event in the feed's bounded queue (synchronous, never blocks nor raises). The writer adds the
  queued events to the stream `<prefix>events` in batches, one script per batch that also
  trims the stream to about `history` entries (MAXLEN ~). The script keeps this process's last
  written sequence number (`<prefix>events:writer:<node_id>`), so a batch retried after an
  answer that was lost is not added twice. While Redis is down the queue holds up to
  `max_queue` events; past that, new events are dropped, counted and logged (at most every
  `DROP_LOG_INTERVAL` seconds), and the health board says so.
- Reading: the reader follows the stream (XREAD, blocking at most `block` seconds a call) and
  ingests every entry, every process's, into the local `EventLog`, with the id the stream gave
  it: `milliseconds * 2**20 + sequence` of the entry id. Every process's history thus holds the
  same events, with the same ids, in the same order: an SSE stream on any process sees them
  all, and `Last-Event-ID` resumes on any process. At start the reader loads the stream's last
  `history` entries, so a new process can serve a resume at once. If the stream lost entries
  this process had not read yet (trimmed while it was cut off), its readers are told they
  missed them (`EventLog.skip_to`). Per session, events are in the order the process that owns
  the session appended them.
- Outbound webhooks, once across the processes: the consumer group `outbound` on the stream,
  one consumer per process (its node id). Each entry goes to one consumer, which offers it to
  its `OutboundWebhooks` (`outbound(listener)`) and acknowledges it. Entries left pending by a
  consumer that stopped (its process died between reading and acknowledging) are claimed by
  another after `claim_idle` seconds (XAUTOCLAIM) and offered there: at least once, with the
  same ids (`webhook-id`), so receivers can de-duplicate. Consumers with nothing pending and
  idle for `FORGET_CONSUMER_AFTER` seconds are removed from the group.

Every call to Redis has a timeout (`timeout`; a blocking read `block + timeout`); a failing
call is retried with capped backoff and reported on the health board (as the store: the same
Redis) until it works again. A loop that dies of anything else is a bug: it is logged and
`on_fatal` is called. The URL may carry a password: it is never logged nor part of an error.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from session_manager.errors import StartupFailed
from session_manager.events.log import DEFAULT_HISTORY, EventListener, EventLog
from session_manager.events.model import Event
from session_manager.health_board import STORE, HealthBoard
from session_manager.logs import describe
from session_manager.redis_connection import RedisUrl
from session_manager.supervision import cancel_and_wait, watch

log = logging.getLogger(__name__)

T = TypeVar("T")

STREAM = "events"
GROUP = "outbound"
FIELD = b"event"
SEQUENCE_BITS = 20  # an event id is `ms << 20 | sequence`: up to 2**20 entries per millisecond
MAX_SEQUENCE = (1 << SEQUENCE_BITS) - 1
DEFAULT_MAX_QUEUE = 10_000
WRITE_CHUNK = 500  # events per script call: one round trip, well inside the call timeout
READ_COUNT = 500  # entries per read
BLOCK = 1.0  # seconds a blocking read waits at most before it is made again
CLAIM_IDLE = 5.0  # seconds an entry stays pending on a consumer before another claims it
FORGET_CONSUMER_AFTER = 3600.0  # seconds idle, nothing pending: the consumer is removed
HORIZON_SLACK_MS = 60_000  # how far ahead of the clock a resumed id may be (clocks differ)
WRITER_MARK_TTL = 86_400  # seconds the last sequence number written by a process is kept
DROP_LOG_INTERVAL = 10.0  # seconds between two warnings about dropped events

WRITES_FAILING = "events cannot be written to Redis"
READS_FAILING = "events cannot be read from Redis"
DROPPING = "events are being dropped: the queue to Redis is full"
STOPPED = "the event feed has stopped"

# Adds ARGV[4..] to the stream KEYS[1] (MAXLEN ~ ARGV[1]), ARGV[3] being the sequence number of
# ARGV[4]; those at or below the mark KEYS[2] (the last sequence number this writer added) were
# added by an attempt whose answer was lost, and are skipped. Returns how many were added.
WRITE_EVENTS = """
local done = tonumber(redis.call('GET', KEYS[2]) or '0')
local first = tonumber(ARGV[3])
local added = 0
for i = 4, #ARGV do
  if first + i - 4 > done then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'event', ARGV[i])
    added = added + 1
  end
end
if first + #ARGV - 4 > done then
  redis.call('SET', KEYS[2], first + #ARGV - 4, 'EX', ARGV[2])
end
return added
"""

Entry = tuple[bytes, dict[bytes, bytes] | None]  # a stream entry: id, fields (None: deleted)


def stream_event_id(entry_id: bytes | str) -> int:
    """The event id of a stream entry id `<ms>-<seq>`: `ms * 2**20 + seq`, increasing as the
    entry ids do. ValueError for a sequence number of 2**20 or more (never seen: Redis would
    have to add a million entries in one millisecond)."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, sequence = text.partition("-")
    number = int(sequence)
    if not 0 <= number <= MAX_SEQUENCE:
        raise ValueError(f"stream entry {text} has a sequence number too large for an event id")
    return (int(ms) << SEQUENCE_BITS) + number


@dataclass
class FeedStats:
    """Counters of the feed, for logs, metrics and tests."""

    queued: int = 0  # waiting to be written now
    written: int = 0  # added to the stream by this process
    dropped: int = 0  # never written: the queue was full, or the feed was closing or closed
    ingested: int = 0  # stream entries put in the local log (every process's)
    unreadable: int = 0  # stream entries that were not an event of ours, skipped
    offered: int = 0  # entries of the group offered to the outbound listener
    claimed: int = 0  # of those, entries claimed from a consumer that stopped


class RedisEventFeed:
    """Carries events between the manager processes sharing one Redis; owns its loops (the
    writer, the reader and, with `outbound`, the outbound consumer), started by `start` and
    stopped by `aclose`.

    `url` may carry a password: it is never logged nor part of an error. `timeout` bounds each
    call to Redis; `block` how long a blocking read waits. `board` (optional) hears when events
    cannot be written or read, and when they are dropped; `on_fatal(reason)` (optional) is
    called once if a loop dies (a bug)."""

    def __init__(
        self,
        url: str,
        *,
        node_id: str,
        prefix: str = "session-manager:",
        history: int = DEFAULT_HISTORY,
        timeout: float = 2.0,
        board: HealthBoard | None = None,
        on_fatal: Callable[[str], None] | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
        block: float = BLOCK,
        claim_idle: float = CLAIM_IDLE,
        start_timeout: float = 10.0,
        retry_backoff: float = 0.1,
        max_backoff: float = 5.0,
    ) -> None:
        if history < 1 or max_queue < 1:
            raise ValueError("history and max_queue must be at least 1")
        self._url = RedisUrl(url)
        self.node_id = node_id
        self._stream = f"{prefix}{STREAM}"
        self._mark = f"{prefix}{STREAM}:writer:{node_id}"
        self._history = history
        # At most `history` a read: past a gap, the stream keeps at least that many after it.
        self._read_count = min(READ_COUNT, history)
        self._timeout = timeout
        self._board = board
        self._on_fatal = on_fatal
        self._max_queue = max_queue
        self._block = block
        self._claim_idle = claim_idle
        self._start_timeout = start_timeout
        self._retry_backoff = retry_backoff
        self._max_backoff = max_backoff
        self._stats = FeedStats()
        self._queue: deque[tuple[int, bytes]] = deque()  # (sequence number, event JSON)
        self._next_sequence = 1
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._log: EventLog | None = None
        self._listener: EventListener | None = None
        self._redis: Redis | None = None  # short calls
        self._blocking: Redis | None = None  # blocking reads: a longer socket timeout
        self._last_read = b"0-0"
        # How many entries the stream had ever been given up to the last one read (Redis 7
        # counts them: XINFO STREAM entries-added), to tell whether any after it were lost.
        self._read_index = 0
        self._unacked: list[bytes] = []  # offered, their acknowledgement not yet answered
        self._clock_offset_ms = 0  # Redis's clock minus ours
        self._last_problem = "no answer"  # at start, why Redis did not answer
        self._writer: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._accepting = True
        self._closed = False
        self._close_lock = asyncio.Lock()
        # What is wrong now, what the board was last told by us, and the drop warnings.
        self._writes_failing = False
        self._reads_failing = False
        self._dropping = False
        self._stopped = False
        self._reported: str | None = None
        self._drops_unlogged = 0
        self._drop_logged_at = -DROP_LOG_INTERVAL

    # what the daemon and the log use -----------------------------------------------------

    def stats(self) -> FeedStats:
        """A snapshot of the counters."""
        return replace(self._stats, queued=len(self._queue))

    def outbound(self, listener: EventListener) -> None:
        """Offer `listener` (`OutboundWebhooks.offer`) this process's share of the events, each
        event to one process of those that called this. Before `start`."""
        if self._log is not None:
            raise RuntimeError("outbound() must be called before start()")
        self._listener = listener

    def publish(self, event: Event) -> None:
        """Queue `event` to be added to the stream (the `EventLog` sink). Synchronous; never
        blocks nor raises: past `max_queue` waiting, or once closing, it is dropped and
        counted."""
        if not self._accepting or len(self._queue) >= self._max_queue:
            self._drop(event)
            return
        self._queue.append((self._next_sequence, event.to_json()))
        self._next_sequence += 1
        self._drained.clear()
        self._wakeup.set()

    def id_horizon(self) -> int:
        """The highest id the stream may have given by now (see `EventSink.id_horizon`)."""
        now_ms = time.time_ns() // 1_000_000 + self._clock_offset_ms
        return (now_ms + HORIZON_SLACK_MS) << SEQUENCE_BITS

    # lifecycle ---------------------------------------------------------------------------

    async def start(self, event_log: EventLog) -> None:
        """Connect, load the stream's last `history` entries into `event_log` (which must have
        this feed as its sink), and start the loops. `StartupFailed` if Redis does not answer
        within `start_timeout` seconds; it names the host, never the URL."""
        if self._log is not None or self._closed:
            raise RuntimeError("the event feed can be started once")
        self._log = event_log
        try:
            self._redis = self._url.connect(timeout=self._timeout)
            self._blocking = self._url.connect(
                timeout=self._timeout, socket_timeout=self._block + self._timeout
            )
        except ValueError:  # redis-py's message may quote parts of the URL
            await self._close_clients()
            raise StartupFailed("redis_url is not a valid Redis URL") from None
        redis = self._redis
        try:
            async with asyncio.timeout(self._start_timeout):
                if self._listener is not None:
                    await self._retrying(lambda: self._create_group(redis, "$"))
                await self._retrying(lambda: self._backfill(redis, event_log))
        except TimeoutError:
            await self._close_clients()
            problem = f"no answer within {self._start_timeout:g} s ({self._last_problem})"
            raise StartupFailed(
                f"cannot read events from Redis at {self._url.where}: {problem}"
            ) from None
        self._writer = self._spawn(self._write_loop(), "writer")
        self._reader = self._spawn(self._read_loop(), "reader")
        if self._listener is not None:
            self._consumer = self._spawn(self._consume_loop(), "outbound")

    async def aclose(self, timeout: float = 10.0) -> None:
        """Take no more events, give the queued ones `timeout` seconds to be written, offer the
        outbound listener what the group still holds, then stop the loops (cancel and await)
        and close the connections. What is left unwritten is counted as dropped and logged.
        Safe to call twice."""
        async with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._accepting = False
            try:
                # What follows the drain (cancel, disconnect) gets the rest of `timeout`.
                async with asyncio.timeout(max(timeout - self._timeout, timeout / 2)):
                    if _running(self._writer):
                        await self._drained.wait()
                    if _running(self._consumer):
                        await cancel_and_wait([self._consumer], timeout)
                        await self._take_the_rest()
            except TimeoutError:
                pass
            except (RedisError, OSError) as exc:
                log.warning(
                    "outbound events left in Redis at close",
                    extra={"error": self._url.describe(exc)},
                )
            await cancel_and_wait([self._writer, self._reader, self._consumer], self._timeout)
            left = len(self._queue)
            if left:
                self._queue.clear()
                self._stats.dropped += left
                log.error(
                    "events left unwritten at close",
                    extra={"dropped": left, "timeout": timeout},
                )
            await self._close_clients()

    async def _close_clients(self) -> None:
        for client in (self._redis, self._blocking):
            if client is None:
                continue
            try:
                async with asyncio.timeout(self._timeout):
                    await client.aclose()
            except Exception as exc:
                log.error("closing the Redis connections failed", extra=self._error(exc))
        self._redis = self._blocking = None

    def _spawn(self, loop: Coroutine[Any, Any, None], role: str) -> asyncio.Task[None]:
        task = asyncio.create_task(loop, name=f"redis-events-{role}-{self.node_id}")
        watch(task, lambda _: self._loop_died(role))
        return task

    def _loop_died(self, role: str) -> None:
        self._stopped = True
        self._report()
        if self._on_fatal is not None:
            self._on_fatal(f"{STOPPED} (its {role})")

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call` until it works, with capped backoff (the caller bounds the whole)."""
        delay = self._retry_backoff
        while True:
            try:
                async with asyncio.timeout(self._timeout):
                    return await call()
            except (RedisError, OSError, TimeoutError) as exc:
                self._last_problem = self._url.describe(exc)
                log.warning("Redis not answering yet; retrying", extra=self._error(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_backoff)

    # writing -----------------------------------------------------------------------------

    def _drop(self, event: Event) -> None:
        self._stats.dropped += 1
        self._drops_unlogged += 1
        now = time.monotonic()
        if now - self._drop_logged_at >= DROP_LOG_INTERVAL:
            log.warning(
                "events dropped: the queue to Redis is full"
                if self._accepting
                else "events dropped: the event feed is closing",
                extra={
                    "dropped": self._drops_unlogged,
                    "dropped_total": self._stats.dropped,
                    "max_queue": self._max_queue,
                    "event_type": event.type,
                },
            )
            self._drop_logged_at = now
            self._drops_unlogged = 0
        if self._accepting and not self._dropping:
            self._dropping = True
            self._report()

    async def _write_loop(self) -> None:
        redis = self._redis
        assert redis is not None
        script = redis.register_script(WRITE_EVENTS)
        delay = self._retry_backoff
        while True:
            if not self._queue:
                self._drained.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = list(itertools.islice(self._queue, WRITE_CHUNK))
            try:
                async with asyncio.timeout(self._timeout):
                    await script(
                        keys=[self._stream, self._mark],
                        args=[self._history, WRITER_MARK_TTL, batch[0][0]]
                        + [body for _, body in batch],
                    )
            except (RedisError, OSError, TimeoutError) as exc:
                self._failed("writing events to Redis failed; will retry", exc, len(batch), delay)
                if not self._writes_failing:
                    self._writes_failing = True
                    self._report()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff)
                continue
            for _ in batch:
                self._queue.popleft()
            self._stats.written += len(batch)
            delay = self._retry_backoff
            if self._writes_failing:
                self._writes_failing = False
                log.warning("events are written to Redis again", extra={"count": len(batch)})
            if self._dropping and not self._queue:
                self._dropping = False
                log.warning(
                    "events accepted again",
                    extra={"dropped_total": self._stats.dropped},
                )
            self._report()

    # reading -----------------------------------------------------------------------------

    async def _backfill(self, redis: Redis, event_log: EventLog) -> None:
        """Load the stream's last `history` entries into the log, and set where it starts:
        after the entry before them, after the first of them less one when that is all there
        is (one older may have been lost), or at Redis's present when the stream is empty."""
        async with redis.pipeline(transaction=True) as pipe:
            pipe.time()
            pipe.xrevrange(self._stream, "+", "-", count=self._history + 1)
            pipe.xinfo_stream(self._stream)
            (seconds, micros), newest_first, info = await pipe.execute(raise_on_error=False)
        if isinstance(newest_first, Exception):
            raise newest_first
        added = info.get("entries-added") if isinstance(info, dict) else None
        redis_ms = int(seconds) * 1000 + int(micros) // 1000
        self._clock_offset_ms = redis_ms - time.time_ns() // 1_000_000
        entries: list[Entry] = list(reversed(newest_first))
        if len(entries) > self._history:
            start = stream_event_id(entries[0][0])
            entries = entries[1:]
        elif entries:
            start = stream_event_id(entries[0][0]) - 1
        else:
            start = (redis_ms << SEQUENCE_BITS) - 1
        event_log.skip_to(start)
        # `_ingest` counts the entries it reads from the one before the first.
        self._read_index = (added if isinstance(added, int) else 0) - len(entries)
        self._ingest(entries)
        log.info(
            "event history loaded from Redis",
            extra={"events": len(entries), "stream_position": self._last_read.decode()},
        )

    async def _read_loop(self) -> None:
        """Follow the stream. A blocking read that comes back full means this reader may be
        behind by more than the stream keeps: that batch is read again together with what the
        stream lost (one transaction), so a gap is told before the events after it. (Trimming
        keeps at least `history` entries: if any entry after ours was trimmed, a read of at
        most `history` after ours comes back full.) After a failure, likewise."""
        delay = self._retry_backoff
        behind = False
        while True:
            try:
                if behind:
                    lost, entries = await self._read_behind()
                else:
                    lost, entries = None, await self._read_waiting()
            except (RedisError, OSError, TimeoutError) as exc:
                self._failed("reading events from Redis failed; will retry", exc, 0, delay)
                if not self._reads_failing:
                    self._reads_failing = True
                    self._report()
                behind = True  # entries may have been trimmed while we could not read
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff)
                continue
            delay = self._retry_backoff
            if self._reads_failing:
                self._reads_failing = False
                log.warning("events are read from Redis again")
                self._report()
            full = len(entries) >= self._read_count
            if full and not behind:
                behind = True  # read again, with what the stream lost
                continue
            if lost is not None:
                self._lost(lost)
            self._ingest(entries)
            behind = full

    async def _read_waiting(self) -> list[Entry]:
        redis = self._blocking
        assert redis is not None
        async with asyncio.timeout(self._block + self._timeout):
            found = await redis.xread(
                {self._stream: self._last_read},
                count=self._read_count,
                block=int(self._block * 1000),
            )
        return _entries_of(found)

    async def _read_behind(self) -> tuple[int | None, list[Entry]]:
        """The entries after the last one read and, if the stream lost some between, the id
        up to which events were lost (else None); in one transaction."""
        redis = self._redis
        assert redis is not None
        async with asyncio.timeout(self._timeout):
            async with redis.pipeline(transaction=True) as pipe:
                pipe.xinfo_stream(self._stream)
                pipe.xread({self._stream: self._last_read}, count=self._read_count)
                info, found = await pipe.execute(raise_on_error=False)
        if isinstance(found, Exception):
            raise found
        return self._gap_before(info), _entries_of(found)

    def _gap_before(self, info: object) -> int | None:
        """Whether entries after the last one read are gone from the stream (`info`: its
        XINFO STREAM): then the id up to which events were lost. Trimming removes the oldest
        entries: while one up to ours is left, all after it are. Else the stream's count of
        entries ever added (Redis 7) tells how many came between ours and its first; without
        it, some are assumed lost."""
        if not isinstance(info, dict):  # no stream: Redis lost its data, nothing to tell
            return None
        first = info.get("first-entry")
        if not first or _entry_key(first[0]) <= _entry_key(self._last_read):
            return None
        added, length = info.get("entries-added"), info.get("length")
        if isinstance(added, int) and isinstance(length, int):
            first_index = added - length + 1
            missing = first_index - (self._read_index + 1)
            self._read_index = first_index - 1  # the entries read next follow from here
            if missing <= 0:
                return None
        elif self._last_read == b"0-0":  # never read one: the log starts after all of them
            return None
        return stream_event_id(first[0]) - 1

    def _lost(self, through: int) -> None:
        """The stream lost entries up to the event id `through` before they were read."""
        assert self._log is not None
        if self._log.last_id < through:
            log.warning(
                "events lost: the stream trimmed them before they were read",
                extra={"after_event_id": self._log.last_id, "through_event_id": through},
            )
        self._log.skip_to(through)

    def _ingest(self, entries: Iterable[Entry]) -> None:
        event_log = self._log
        assert event_log is not None
        for entry_id, fields in entries:
            self._last_read = entry_id
            self._read_index += 1
            event = self._event_of(entry_id, fields)
            if event is not None and event_log.ingest(event):
                self._stats.ingested += 1

    def _event_of(self, entry_id: bytes, fields: dict[bytes, bytes] | None) -> Event | None:
        """The event an entry carries, or None (logged) when it is not one of ours."""
        try:
            if fields is None:
                raise ValueError("the entry was deleted")
            body = orjson.loads(fields[FIELD])
            session_id, service_id = body.get("session_id"), body.get("service_id")
            data = body.get("data")
            if not (
                isinstance(body.get("type"), str)
                and isinstance(body.get("timestamp"), str)
                and isinstance(session_id, str | None)
                and isinstance(service_id, str | None)
                and isinstance(data, dict)
            ):
                raise ValueError("not an event")
            return Event(
                id=stream_event_id(entry_id),
                type=body["type"],
                timestamp=body["timestamp"],
                session_id=session_id,
                service_id=service_id,
                data=data,
            )
        except (KeyError, AttributeError, TypeError, ValueError) as exc:  # JSON: ValueError
            self._stats.unreadable += 1
            log.error(
                "unreadable entry in the event stream; skipped",
                extra={"entry_id": entry_id.decode(errors="replace"), "error": describe(exc)},
            )
            return None

    # the outbound consumer ---------------------------------------------------------------

    async def _create_group(self, redis: Redis, start: str) -> None:
        try:
            await redis.xgroup_create(self._stream, GROUP, id=start, mkstream=True)
        except ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise

    async def _consume_loop(self) -> None:
        blocking = self._blocking
        assert blocking is not None and self._redis is not None
        loop = asyncio.get_running_loop()
        block = min(self._block, self._claim_idle / 2)
        delay = self._retry_backoff
        claim_at = forget_at = 0.0
        while True:
            try:
                await self._ack()
                if loop.time() >= claim_at:
                    await self._claim_stale()
                    claim_at = loop.time() + self._claim_idle / 2
                if loop.time() >= forget_at:
                    await self._forget_consumers()
                    forget_at = loop.time() + FORGET_CONSUMER_AFTER / 10
                async with asyncio.timeout(block + self._timeout):
                    found = await blocking.xreadgroup(
                        GROUP,
                        self.node_id,
                        {self._stream: ">"},
                        count=self._read_count,
                        block=int(block * 1000),
                    )
                await self._offer(_entries_of(found))
                delay = self._retry_backoff
            except ResponseError as exc:
                if not str(exc).startswith("NOGROUP"):
                    self._failed("reading outbound events failed; will retry", exc, 0, delay)
                else:
                    # Redis lost its data: every entry in the stream now is undelivered.
                    log.warning("outbound consumer group gone; made again")
                    try:
                        async with asyncio.timeout(self._timeout):
                            await self._create_group(self._redis, "0")
                        continue
                    except (RedisError, OSError, TimeoutError) as again:
                        self._failed("making the outbound group failed", again, 0, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff)
            except (RedisError, OSError, TimeoutError) as exc:
                self._failed("reading outbound events failed; will retry", exc, 0, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff)

    async def _claim_stale(self) -> None:
        """Take and offer the entries pending for `claim_idle` seconds on another consumer."""
        redis = self._redis
        assert redis is not None
        start: bytes | str = "0-0"
        while True:
            async with asyncio.timeout(self._timeout):
                reply = await redis.xautoclaim(
                    self._stream,
                    GROUP,
                    self.node_id,
                    min_idle_time=int(self._claim_idle * 1000),
                    start_id=start,
                    count=READ_COUNT,
                )
            start, claimed = reply[0], [(i, f) for i, f in reply[1] if i is not None]
            if claimed:
                log.warning(
                    "outbound events claimed from a consumer that stopped",
                    extra={"count": len(claimed)},
                )
                self._stats.claimed += len(claimed)
                await self._offer(claimed)
            if start in (b"0-0", "0-0"):
                return

    async def _forget_consumers(self) -> None:
        redis = self._redis
        assert redis is not None
        async with asyncio.timeout(self._timeout):
            consumers: list[dict[str, Any]] = await redis.xinfo_consumers(self._stream, GROUP)
        for consumer in consumers:
            name = consumer.get("name")
            idle = consumer.get("idle", 0) / 1000
            if consumer.get("pending") or idle < FORGET_CONSUMER_AFTER or name is None:
                continue
            async with asyncio.timeout(self._timeout):
                await redis.xgroup_delconsumer(self._stream, GROUP, name)

    async def _offer(self, entries: Sequence[Entry]) -> None:
        """Offer each entry to the listener, then acknowledge them all."""
        if not entries:
            return
        listener = self._listener
        assert listener is not None
        for entry_id, fields in entries:
            event = self._event_of(entry_id, fields)
            if event is None:
                continue
            try:
                listener(event)
            except Exception:
                log.exception("outbound listener failed", extra={"event_id": event.id})
            self._stats.offered += 1
        self._unacked.extend(entry_id for entry_id, _ in entries)
        await self._ack()

    async def _ack(self) -> None:
        """Acknowledge what was offered (again, after a failure: never offered twice here)."""
        if not self._unacked:
            return
        redis = self._redis
        assert redis is not None
        async with asyncio.timeout(self._timeout):
            await redis.xack(self._stream, GROUP, *self._unacked)
        self._unacked.clear()

    async def _take_the_rest(self) -> None:
        """At close, without waiting: offer what was given to this consumer and not yet
        acknowledged (its loop was stopped between the two), then what the group has not
        given any consumer yet."""
        redis = self._redis
        assert redis is not None
        await self._ack()
        for position in ("0", ">"):
            while True:
                async with asyncio.timeout(self._timeout):
                    found = await redis.xreadgroup(
                        GROUP, self.node_id, {self._stream: position}, count=self._read_count
                    )
                entries = _entries_of(found)
                if not entries:
                    break
                await self._offer(entries)

    # health ------------------------------------------------------------------------------

    def _trouble(self) -> str | None:
        if self._stopped:
            return STOPPED
        if self._writes_failing:
            return WRITES_FAILING
        if self._reads_failing:
            return READS_FAILING
        if self._dropping:
            return DROPPING
        return None

    def _report(self) -> None:
        """Tell the board what is wrong, under the store's name (the same Redis). A problem the
        store reported is neither overwritten nor cleared here."""
        trouble = self._trouble()
        if trouble == self._reported:
            return
        board = self._board
        if board is not None:
            current = board.problem(STORE)
            ours = current is not None and current.reason == self._reported
            if trouble is not None and (current is None or ours):
                board.down(STORE, trouble)
            elif trouble is None and ours:
                board.up(STORE)
        self._reported = trouble

    def _failed(self, message: str, exc: BaseException, count: int, retry_in: float) -> None:
        extra = self._error(exc)
        extra.update(count=count, retry_in=retry_in)
        log.warning(message, extra=extra)

    def _error(self, exc: BaseException) -> dict[str, object]:
        return {"error": self._url.describe(exc), "redis": self._url.where}


def _running(task: asyncio.Task[None] | None) -> bool:
    return task is not None and not task.done()


def _entries_of(found: Any) -> list[Entry]:
    """The entries of an XREAD/XREADGROUP answer on one stream (RESP2 list or RESP3 dict)."""
    if not found:
        return []
    streams = found.values() if isinstance(found, dict) else (entries for _, entries in found)
    entries: list[Entry] = []
    for stream_entries in streams:
        if stream_entries and isinstance(stream_entries[0], list):  # RESP3: [[entries]]
            stream_entries = stream_entries[0]
        entries.extend((entry_id, fields) for entry_id, fields in stream_entries or ())
    return entries


def _entry_key(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, sequence = text.partition("-")
    return int(ms), int(sequence or 0)
