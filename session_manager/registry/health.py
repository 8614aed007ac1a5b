"""The health monitor: calls `GET {endpoint}/health` on every registered instance on that
instance's own schedule (`metadata.health_interval`, else the manager's `health_interval`) and
hands the results to the supervisor, which has the registry decide Healthy / Unhealthy.

Each instance has a due time in one heap; the loop sleeps until the earliest one (or until a
check ends), starts the checks that are due, and hands the results that came in to
`on_results` in one batch. A check of an instance never overlaps its previous one: the next
starts `interval` (±10%) after the previous one started, or when it ended if that is later.

Its client is its own (`health_session`: a pool apart from dispatch's, with connections kept
alive longer than any short interval, so a check every 0.5 s costs one request on an open
connection, not a TCP handshake), and at most `concurrency` checks run at once: many slow or dead
registrations make checks later, they never hold up a join-room call."""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver

from session_manager.dispatch import MicroserviceClient
from session_manager.registry.registry import Registry
from session_manager.supervision import cancel_and_wait, watch

log = logging.getLogger(__name__)

JITTER = 0.1  # each wait is within ±10% of the interval, so instances are not probed in step
SYNC_INTERVAL = 0.5  # seconds between two looks at the registry for new or changed registrations
RESTART_DELAY = 1.0  # seconds before the loop runs again after it failed
# Seconds an idle health connection is kept: longer than any interval worth keeping one for
# (the default 10 s among them), shorter than aiohttp servers' own keep-alive (3630 s), so the
# manager closes it first. (A check that meets a connection the service just closed is retried
# once on a new one by aiohttp itself: GET is idempotent.)
KEEPALIVE_TIMEOUT = 60.0
PER_HOST_LIMIT = 8  # connections to one host:port (several registrations may share one)

HealthResults = list[tuple[str, str | None]]  # (service id, error or None) per instance checked


def health_session(
    *, concurrency: int, resolver: AbstractResolver | None = None
) -> aiohttp.ClientSession:
    """The health monitor's HTTP client: at most `concurrency` connections in all and
    PER_HOST_LIMIT to one host:port, each kept alive KEEPALIVE_TIMEOUT seconds between checks."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=concurrency,
            limit_per_host=PER_HOST_LIMIT,
            keepalive_timeout=KEEPALIVE_TIMEOUT,
            resolver=resolver,
        )
    )


@dataclass
class _Schedule:
    """When one instance is checked next, and with which interval."""

    due: float
    interval: float
    started: float | None = None  # loop time the last check started
    running: asyncio.Task[None] | None = None


class HealthMonitor:
    """Owns the loop that checks every registered instance on its own interval (the first
    check of an instance at once, so instances restored at start-up leave `Unknown` quickly),
    and the check tasks it starts. It only reads the registry: the results go to `on_results`
    (the supervisor), the registry's one writer."""

    def __init__(
        self,
        registry: Registry,
        client: MicroserviceClient,
        *,
        interval: float,
        timeout: float,
        on_results: Callable[[HealthResults], None],
        concurrency: int = 64,
        should_check: Callable[[], bool] = lambda: True,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._registry = registry
        self._client = client
        self._interval = interval
        self._timeout = timeout
        self._slots = asyncio.Semaphore(concurrency)
        self._on_results = on_results
        # Several managers on one Redis: only the one that leads the checks makes them, and
        # shares the results (each instance is checked once per interval across the cluster).
        self._should_check = should_check
        self._schedules: dict[str, _Schedule] = {}
        self._due: list[tuple[float, int, str]] = []  # (due, tie-breaker, service id)
        self._pushed = 0
        self._finished: HealthResults = []
        self._wake = asyncio.Event()
        self._next_sync = 0.0
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        self._start_loop(delay=0.0)

    async def aclose(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        await cancel_and_wait((task,))
        checks = [schedule.running for schedule in self._schedules.values()]
        await cancel_and_wait(checks)

    # the loop ---------------------------------------------------------------------------------

    def _start_loop(self, delay: float) -> None:
        self._task = asyncio.create_task(self._run(delay), name="health-monitor")
        watch(self._task, self._loop_died)

    def _loop_died(self, error: BaseException | None) -> None:
        # `watch` has logged it with its traceback; the loop's state is only a schedule, so a
        # new loop (after a pause, in case it dies at once again) carries on.
        if not self._closing:
            self._start_loop(delay=RESTART_DELAY)

    async def _run(self, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        while True:
            try:
                await self._step()
            except Exception:
                log.exception("health monitor step failed; it runs again")
                await asyncio.sleep(RESTART_DELAY)

    async def _step(self) -> None:
        loop = asyncio.get_running_loop()
        self._wake.clear()
        now = loop.time()
        if now >= self._next_sync:
            self._sync(now)
            self._next_sync = now + SYNC_INTERVAL
        if self._finished:
            results, self._finished = self._finished, []
            self._on_results(results)
        self._start_due(now)
        wake_at = min(self._next_sync, self._due[0][0]) if self._due else self._next_sync
        try:
            async with asyncio.timeout(max(0.0, wake_at - loop.time())):
                await self._wake.wait()
        except TimeoutError:
            pass

    def _sync(self, now: float) -> None:
        """Schedule new registrations (at once), follow changed intervals, forget the gone."""
        seen = set()
        for record in self._registry.all():
            seen.add(record.service_id)
            interval = record.health_interval or self._interval
            schedule = self._schedules.get(record.service_id)
            if schedule is None:
                self._schedules[record.service_id] = schedule = _Schedule(now, interval)
                self._push(record.service_id, now)
            elif interval != schedule.interval:
                schedule.interval = interval
                if schedule.running is None:  # a shorter interval takes effect now
                    due = (schedule.started or now) + interval
                    if due < schedule.due:
                        schedule.due = due
                        self._push(record.service_id, due)
        for service_id in set(self._schedules) - seen:
            if self._schedules[service_id].running is None:
                del self._schedules[service_id]  # a running check removes it when it ends

    def _push(self, service_id: str, due: float) -> None:
        self._pushed += 1
        heapq.heappush(self._due, (due, self._pushed, service_id))

    def _start_due(self, now: float) -> None:
        while self._due and self._due[0][0] <= now:
            due, _, service_id = heapq.heappop(self._due)
            schedule = self._schedules.get(service_id)
            if schedule is None or schedule.running is not None or schedule.due != due:
                continue  # gone, being checked, or moved: a stale heap entry
            record = self._registry.find(service_id)
            if record is None:
                del self._schedules[service_id]
                continue
            schedule.interval = record.health_interval or self._interval
            schedule.started = now
            if not self._should_check():  # another manager leads the checks
                self._next(service_id, schedule, now)
                continue
            timeout = record.health_timeout or self._timeout
            schedule.running = asyncio.create_task(
                self._check(service_id, record.endpoint, timeout),
                name=f"health-check-{service_id}",
            )

    def _next(self, service_id: str, schedule: _Schedule, now: float) -> None:
        spread = random.uniform(1 - JITTER, 1 + JITTER)
        schedule.due = max(now, (schedule.started or now) + schedule.interval * spread)
        self._push(service_id, schedule.due)

    async def _check(self, service_id: str, endpoint: str, timeout: float) -> None:
        try:
            async with self._slots:
                error = await self._client.check_health(endpoint, timeout, service_id=service_id)
        except Exception:
            # A fault of ours, not an answer of the service's: nothing is reported for it.
            log.exception("health check failed to run", extra={"service_id": service_id})
        else:
            self._finished.append((service_id, error))
        schedule = self._schedules.get(service_id)
        if schedule is not None:
            schedule.running = None
            if self._registry.find(service_id) is None:
                del self._schedules[service_id]
            else:
                self._next(service_id, schedule, asyncio.get_running_loop().time())
        self._wake.set()
