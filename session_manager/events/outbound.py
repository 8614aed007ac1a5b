"""Outbound webhooks: every event POSTed as JSON, signed, to each configured URL that wants it.

`offer(event)` is synchronous and O(number of targets): it only puts the event in each target's
bounded queue, so it can be called from `EventLog.append` (register it with
`EventLog.add_listener`) and never holds up a session actor.

Per target, events wait in lanes: one lane per session (events without a session: one lane per
service, and one for the rest). A lane delivers strictly in order: its next event is not sent
before the one ahead of it was delivered or given up. Different lanes proceed in parallel, up to
`concurrency` requests in flight per target. A failed attempt (no answer, a timeout, 408, 429,
5xx) is retried after an exponential, jittered, capped back-off (at least `Retry-After` seconds
when the receiver sends one) without holding a worker; after `max_attempts` the event is given up,
logged and counted. Any other answer (3xx, 4xx) is final at once.

The queue of a target holds at most `max_queue` events; when it is full, new events for that
target are dropped (the ones already queued keep their order) and counted. Delivery is at least
once: receivers should de-duplicate on `webhook-id` (the event's id; a retry keeps it). Signing:
Standard Webhooks, see `signing`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

import aiohttp

from session_manager import __version__
from session_manager.events.model import EVENT_TYPE_NAMES, Event
from session_manager.events.signing import ATTEMPT_HEADER, EVENT_TYPE_HEADER, Secret, Signer
from session_manager.supervision import cancel_and_wait, watch

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 429})

LaneKey = tuple[str, str]

AttemptObserver = Callable[[str, bool, float], None]
"""(target origin, delivered, seconds) of every delivery attempt: for metrics."""


@dataclass(frozen=True)
class WebhookTarget:
    """A receiver URL and, optionally, the only event types it gets."""

    url: str
    types: frozenset[str] | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("webhook url must be an absolute http(s) URL")
        if self.types is not None:
            types = frozenset(str(name) for name in self.types)
            if not types:
                raise ValueError("webhook types is empty; leave it out to receive every event")
            unknown = sorted(types - EVENT_TYPE_NAMES)
            if unknown:
                raise ValueError(f"unknown event type {unknown[0]!r}")
            object.__setattr__(self, "types", types)

    @classmethod
    def parse(cls, spec: str) -> WebhookTarget:
        """`"<url>"` or `"<url> <Type>,<Type>…"` (a URL cannot contain a space)."""
        url, _, types = spec.strip().partition(" ")
        names = [name.strip() for name in types.split(",") if name.strip()]
        return cls(url, frozenset(names) if names else None)

    def __repr__(self) -> str:  # never the whole URL: its path or query may be a secret
        types = None if self.types is None else sorted(self.types)
        return f"WebhookTarget(origin={self.origin!r}, types={types!r})"

    def wants(self, event_type: str) -> bool:
        return self.types is None or event_type in self.types

    @property
    def origin(self) -> str:
        """scheme://host[:port], for logs: a URL's path or query may itself be a secret."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}"


@dataclass(frozen=True)
class WebhookPolicy:
    timeout: float = 5.0  # seconds for one attempt
    max_attempts: int = 5
    base_backoff: float = 0.5  # seconds before the first retry; doubles each time
    max_backoff: float = 30.0
    max_queue: int = 10_000  # events waiting per target, the one in flight included
    concurrency: int = 4  # requests in flight per target

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.base_backoff < 0 or self.max_backoff < self.base_backoff:
            raise ValueError("webhook timeout must be positive and backoffs ordered")
        if self.max_attempts < 1 or self.max_queue < 1 or self.concurrency < 1:
            raise ValueError("webhook max_attempts, max_queue and concurrency must be >= 1")

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        ceiling = min(self.max_backoff, self.base_backoff * (2 ** (attempt - 1)))
        delay = random.uniform(ceiling / 2, ceiling)  # jitter: failures do not retry in step
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_backoff))
        return delay


@dataclass
class DeliveryStats:
    """Counters of one target, for logs and metrics."""

    delivered: int = 0
    failed: int = 0  # given up after max_attempts, or refused with a final status
    dropped: int = 0  # never attempted to the end: the queue was full, or shutdown came first
    retried: int = 0  # attempts after the first
    queued: int = 0  # waiting now, the ones in flight included


@dataclass(frozen=True, slots=True)
class _Attempt:
    ok: bool
    retry: bool = False
    error: str = ""
    retry_after: float | None = None


@dataclass(slots=True)
class _Lane:
    events: deque[Event] = field(default_factory=deque)
    attempts: int = 0  # attempts already made on the event at the head


def lane_key(event: Event) -> LaneKey:
    if event.session_id is not None:
        return ("session", event.session_id)
    if event.service_id is not None:
        return ("service", event.service_id)
    return ("", "")


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: fall back to our own back-off
    return seconds if seconds >= 0 else None


class _TargetQueue:
    """One target's lanes. A lane is in `lanes` while it has events, and then is exactly one
    of: in `ready`, being attempted by a worker, or waiting for its retry timer."""

    def __init__(self, target: WebhookTarget, policy: WebhookPolicy) -> None:
        self.target = target
        self.policy = policy
        self.stats = DeliveryStats()
        self.lanes: dict[LaneKey, _Lane] = {}
        self.ready: asyncio.Queue[LaneKey] = asyncio.Queue()
        self.idle = asyncio.Event()
        self.idle.set()
        self._dropped_in_a_row = 0

    def offer(self, event: Event) -> None:
        if not self.target.wants(event.type):
            return
        if self.stats.queued >= self.policy.max_queue:
            self.drop(1)
            return
        if self._dropped_in_a_row:
            log.info(
                "webhook queue accepting events again",
                extra={"target": self.target.origin, "dropped": self._dropped_in_a_row},
            )
            self._dropped_in_a_row = 0
        key = lane_key(event)
        lane = self.lanes.get(key)
        if lane is None:
            lane = self.lanes[key] = _Lane()
            self.ready.put_nowait(key)
        lane.events.append(event)
        self.stats.queued += 1
        self.idle.clear()

    def drop(self, count: int) -> None:
        """The queue is full: `count` new events are not taken."""
        if not self._dropped_in_a_row:
            log.warning(
                "webhook queue full, dropping new events",
                extra={"target": self.target.origin, "max_queue": self.policy.max_queue},
            )
        self._dropped_in_a_row += count
        self.stats.dropped += count

    def finish_head(self, key: LaneKey) -> None:
        lane = self.lanes[key]
        lane.events.popleft()
        lane.attempts = 0
        self.stats.queued -= 1
        if lane.events:
            self.ready.put_nowait(key)
        else:
            del self.lanes[key]
        if not self.stats.queued:
            self.idle.set()

    def abandon(self) -> int:
        """Forget every queued event (shutdown); how many there were."""
        left = self.stats.queued
        self.stats.dropped += left
        self.stats.queued = 0
        self.lanes.clear()
        self.idle.set()
        return left


class OutboundWebhooks:
    """Delivers events to webhook targets; owns its HTTP client, workers and retry timers."""

    def __init__(
        self,
        targets: Iterable[WebhookTarget],
        secret: Secret,
        policy: WebhookPolicy | None = None,
        *,
        on_attempt: AttemptObserver | None = None,
    ) -> None:
        self._policy = policy or WebhookPolicy()
        self._on_attempt = on_attempt
        self._queues = [_TargetQueue(target, self._policy) for target in targets]
        if self._queues and not secret:
            raise ValueError("webhook secret is required when webhook targets are configured")
        # `whsec_…` or a plain string (its UTF-8 bytes are the key): see `signing`.
        self._signer = Signer(secret) if secret else None
        self._http: aiohttp.ClientSession | None = None
        self._workers: set[asyncio.Task[None]] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._accepting = True
        self._close_lock = asyncio.Lock()
        self._closed = False

    @property
    def targets(self) -> list[WebhookTarget]:
        return [queue.target for queue in self._queues]

    def stats(self) -> dict[WebhookTarget, DeliveryStats]:
        """A snapshot of each target's counters."""
        return {queue.target: replace(queue.stats) for queue in self._queues}

    async def start(self) -> None:
        if self._http is not None or self._closed or not self._queues:
            return
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._policy.timeout),
            connector=aiohttp.TCPConnector(limit=self._policy.concurrency * len(self._queues)),
            headers={"User-Agent": f"session-manager/{__version__}"},
        )
        for index, queue in enumerate(self._queues):
            for worker in range(self._policy.concurrency):
                self._start_worker(queue, f"webhook-{index}-worker-{worker}")

    def _start_worker(self, queue: _TargetQueue, name: str) -> None:
        """A worker is watched: one that dies (a bug) is logged and replaced at once, so a
        target never silently loses its delivery."""
        task = asyncio.create_task(self._work(queue), name=name)
        self._workers.add(task)
        task.add_done_callback(self._workers.discard)

        def replace_worker(_: BaseException | None) -> None:
            if not self._closed and self._accepting:
                self._start_worker(queue, name)

        watch(task, replace_worker)

    def offer(self, event: Event) -> None:
        """Queue `event` for every target that wants it. Synchronous; never waits."""
        if not self._accepting:  # closing: counted, not queued
            for queue in self._queues:
                if queue.target.wants(event.type):
                    queue.stats.dropped += 1
            return
        for queue in self._queues:
            queue.offer(event)

    async def aclose(self, timeout: float = 10.0) -> None:
        """Stop taking events, give queued ones `timeout` seconds to be delivered, then cancel
        what is left (counted as dropped) and close the HTTP client. Safe to call twice."""
        async with self._close_lock:
            if self._closed:
                return
            self._accepting = False
            if self._http is not None:
                await self._drain(timeout)
            for queue in self._queues:
                left = queue.abandon()
                if left:
                    log.warning(
                        "webhook events left undelivered at shutdown",
                        extra={"target": queue.target.origin, "dropped": left},
                    )
            for handle in self._timers:
                handle.cancel()
            self._timers.clear()
            await cancel_and_wait(list(self._workers), timeout)
            if self._http is not None:
                await self._http.close()
            self._closed = True

    async def _drain(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                for queue in self._queues:
                    await queue.idle.wait()
        except TimeoutError:
            pass

    # delivery ------------------------------------------------------------------------------

    async def _work(self, queue: _TargetQueue) -> None:
        while True:
            key = await queue.ready.get()
            lane = queue.lanes.get(key)
            if lane is None:  # abandoned at shutdown
                continue
            try:
                await self._deliver_head(queue, key, lane)
            except Exception:
                # A bug in the bookkeeping: the lane goes back to be tried again, the worker on.
                log.exception("webhook worker failed", extra={"target": queue.target.origin})
                self._requeue(queue, key, lane)
            except BaseException:
                self._requeue(queue, key, lane)  # not lost with this worker: its successor has it
                raise

    @staticmethod
    def _requeue(queue: _TargetQueue, key: LaneKey, lane: _Lane) -> None:
        if queue.lanes.get(key) is lane:
            queue.ready.put_nowait(key)

    async def _deliver_head(self, queue: _TargetQueue, key: LaneKey, lane: _Lane) -> None:
        """One attempt at the lane's first event, then what follows from its result."""
        event = lane.events[0]
        lane.attempts += 1
        started = time.monotonic()
        result = await self._attempt(queue.target, event, lane.attempts)
        if self._on_attempt is not None:
            self._on_attempt(queue.target.origin, result.ok, time.monotonic() - started)
        if queue.lanes.get(key) is not lane:  # abandoned while in flight
            return
        if result.ok:
            queue.stats.delivered += 1
        elif result.retry and lane.attempts < self._policy.max_attempts:
            queue.stats.retried += 1
            delay = self._policy.backoff(lane.attempts, result.retry_after)
            log.debug(
                "webhook attempt failed, retrying",
                extra=_extra(queue, event, attempts=lane.attempts, error=result.error),
            )
            self._retry_later(queue, key, delay)
            return
        else:
            queue.stats.failed += 1
            log.warning(
                "webhook delivery failed",
                extra=_extra(queue, event, attempts=lane.attempts, error=result.error),
            )
        queue.finish_head(key)

    def _retry_later(self, queue: _TargetQueue, key: LaneKey, delay: float) -> None:
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle

        def due() -> None:
            self._timers.discard(handle)
            queue.ready.put_nowait(key)

        handle = loop.call_later(delay, due)
        self._timers.add(handle)

    async def _attempt(self, target: WebhookTarget, event: Event, attempt: int) -> _Attempt:
        assert self._http is not None and self._signer is not None
        body = event.to_json()
        headers = {
            "Content-Type": "application/json",
            EVENT_TYPE_HEADER: event.type,
            ATTEMPT_HEADER: str(attempt),
            # Signed again at each attempt (its own timestamp), under the event's id.
            **self._signer.headers(body, msg_id=str(event.id)),
        }
        try:
            async with self._http.post(
                target.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                retry_after = _retry_after(response.headers.get("Retry-After"))
        except TimeoutError:
            return _Attempt(ok=False, retry=True, error=f"timed out after {self._policy.timeout}s")
        except (aiohttp.ClientError, OSError) as exc:
            return _Attempt(ok=False, retry=True, error=f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a bug here must not kill the worker
            log.exception("webhook attempt crashed", extra={"target": target.origin})
            return _Attempt(ok=False, error=f"{type(exc).__name__}: {exc}")
        if 200 <= status < 300:
            return _Attempt(ok=True)
        retry = status >= 500 or status in RETRY_STATUSES
        return _Attempt(ok=False, retry=retry, error=f"HTTP {status}", retry_after=retry_after)


def _extra(queue: _TargetQueue, event: Event, **values: object) -> dict[str, object]:
    return {
        "target": queue.target.origin,
        "event_id": event.id,
        "event_type": event.type,
        "session_id": event.session_id,
        **values,
    }
