"""Benchmark: one session's events fanned out over SSE to many concurrent subscribers.

One command, loopback only, nothing asserted (the numbers are reported):

    .venv/bin/python scripts/bench_sse.py --subscribers 1000 --events 200

1. the manager as users run it, a subprocess in a temp dir: `.venv/bin/session-manager --host
   127.0.0.1 --port <free> --store memory --log-level WARN --livekit-port <free>
   --livekit-rtc-tcp-port <free> --livekit-rtc-udp-port <free>` (it starts its own managed
   livekit-server), waited for on GET /health;
2. a fake microservice in this process (an aiohttp app on 127.0.0.1 answering /join-room,
   /leave-room and /health), registered with the manager, and one session with no services;
3. N subscribers to `GET /api/v1/sessions/{id}/events` (Accept: text/event-stream), one aiohttp
   ClientSession in this process, all connected and past the replayed history before anything
   is measured;
4. events at a steady rate through the public API: the service is added to the session and
   removed again, alternately (`POST .../services`, `DELETE .../services/{id}`), one call at a
   time; each add appends SessionStatusChanged + MicroserviceDispatched, each remove
   SessionStatusChanged + SessionReady, so `--events` events take `--events / 2` calls;
5. once every subscriber has the last event: the events are read back (JSON polling) and each
   is attributed to the call that caused it, the session is deleted (its streams end with
   SessionTerminated), and everything is stopped: subscribers closed, SIGTERM to the manager.

Latency of one delivery (event, subscriber), two measures:

- from call: when this subscriber's reader got the bytes (perf_counter, in its task) minus
  when the add/remove call that caused the event was sent. It covers the whole path: HTTP
  request, supervisor, session actor, event log, SSE handler, socket, and this process's own
  client loop. An event is attributed to the last call sent in or before the millisecond of
  its `timestamp` (calls are kept >= 2 ms apart, so this is unambiguous).
- from timestamp: the same receive time on the wall clock minus the event's own `timestamp`
  (RFC 3339, milliseconds, truncated: it reads 0-1 ms high). Same machine, same clock.

CPU and memory of the manager process (and, separately, of its livekit-server child and of this
client) come from /proc/<pid>/stat (utime + stime) and /proc/<pid>/status (VmRSS, VmHWM): at
idle (session created), once all subscribers are connected (just before the first call), and
once every subscriber has the last event. CPU % is of one core over the time between those two
(the "CPU window"); RSS peak is VmHWM, the most the process ever held.

The client (all N subscribers) shares the machine's cores with the manager; its own CPU use
is reported too, and its event loop is uvloop when installed. After the subscribers are
connected this process freezes its start-up objects out of the garbage collector's reach
(gc.freeze()), as the manager does.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import gc
import json
import math
import os
import platform
import re
import resource
import socket
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from bench_harness import (
    HOST,
    PROJECT_ROOT,
    child_pids,
    clean_env,
    client_loop_name,
    cpu_model,
    cpu_seconds,
    free_port,
    manager_revision,
    percentile,
    run_and_print,
    running_process,
    usable_cpus,
)

SERVICE_ID = "bench-echo-1"
SERVICE_TYPE = "BenchEcho"
USER_IDENTITY = "bench"
START_TIMEOUT = 60.0  # the manager starts livekit-server before it answers /health
STOP_TIMEOUT = 60.0
REQUEST_TIMEOUT = 30.0
CALL_GAP = 0.002  # least time between one call's answer and the next call
POLL_LIMIT = 1000
SSE_HEADERS = {"Accept": "text/event-stream"}
JSON_HEADERS = {"Content-Type": "application/json"}
# One SSE frame as the manager writes it: id, event, data lines, blank line.
FRAME = re.compile(rb"id: (\d+)\nevent: (\w+)\ndata: ([^\n]*)\n")
EVENTS_DROPPED = b"EventsDropped"
SESSION_TERMINATED = b"SessionTerminated"


# --- options ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    subscribers: int
    events: int
    rate: float
    connect_concurrency: int
    delivery_timeout: float
    as_json: bool
    manager_command: str


def default_manager_command() -> str:
    """`session-manager` beside the running interpreter (.venv/bin), else the project's venv."""
    beside = Path(sys.executable).with_name("session-manager")
    if beside.exists():
        return str(beside)
    return str(PROJECT_ROOT / ".venv" / "bin" / "session-manager")


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description=(
            "N concurrent SSE subscribers on one session of a manager started here: delivery "
            "latency, the manager's CPU and memory. Loopback only; reported, not asserted."
        )
    )
    parser.add_argument(
        "--subscribers", type=int, default=1000, help="concurrent SSE streams (default 1000)"
    )
    parser.add_argument(
        "--events",
        type=int,
        default=200,
        help="session events to generate, two per add/remove call (default 200)",
    )
    parser.add_argument("--rate", type=float, default=20.0, help="events per second (default 20)")
    parser.add_argument(
        "--connect-concurrency",
        type=int,
        default=100,
        help="subscribers connecting at the same time (default 100)",
    )
    parser.add_argument(
        "--delivery-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the last event to reach every subscriber (default 60)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument(
        "--manager-command",
        default=default_manager_command(),
        help="the session-manager executable (default: .venv/bin/session-manager)",
    )
    args = parser.parse_args(argv)
    for name in ("subscribers", "events", "connect_concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.rate <= 0 or args.delivery_timeout <= 0:
        parser.error("--rate and --delivery-timeout must be positive")
    return Options(
        subscribers=args.subscribers,
        events=args.events,
        rate=args.rate,
        connect_concurrency=args.connect_concurrency,
        delivery_timeout=args.delivery_timeout,
        as_json=args.json,
        manager_command=args.manager_command,
    )


# --- processes and /proc ----------------------------------------------------------------------


@dataclass(frozen=True)
class ProcSample:
    cpu_s: float  # utime + stime so far, all threads
    rss_kib: int
    hwm_kib: int  # peak RSS over the process's life


def proc_sample(pid: int) -> ProcSample | None:
    try:
        cpu = cpu_seconds(pid)
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    memory = {
        key: int(value.split()[0])
        for key, _, value in (line.partition(":") for line in status.splitlines())
        if key in ("VmRSS", "VmHWM")
    }
    return ProcSample(cpu, memory.get("VmRSS", 0), memory.get("VmHWM", 0))


def raise_open_file_limit(needed: int) -> int:
    """Raise our soft RLIMIT_NOFILE to `needed` if lower (the manager inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise RuntimeError(f"open-file limit {hard} is below the {needed} needed")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        soft = needed
    return int(soft)


def manager_argv(command: str, port: int) -> list[str]:
    return [
        command,
        "--host",
        HOST,
        "--port",
        str(port),
        "--store",
        "memory",
        "--log-level",
        "WARN",
        "--livekit-port",
        str(free_port()),
        "--livekit-rtc-tcp-port",
        str(free_port()),
        "--livekit-rtc-udp-port",
        str(free_port(socket.SOCK_DGRAM)),
    ]


@dataclass
class Manager:
    process: asyncio.subprocess.Process
    base_url: str
    argv: list[str]
    livekit_pids: list[int]


@asynccontextmanager
async def running_manager(command: str, workdir: Path) -> AsyncIterator[Manager]:
    """The manager, output in workdir, cwd workdir (no config/session-manager.toml of the
    caller's is read). On the way out SIGTERM (it deletes its rooms and stops its
    livekit-server), SIGKILL after STOP_TIMEOUT, then also the livekit-server it could not stop.
    """
    port = free_port()
    argv = manager_argv(command, port)
    base_url = f"http://{HOST}:{port}"
    async with running_process(
        "session-manager",
        argv,
        cwd=workdir,
        env=clean_env(),  # the manager runs its own LiveKit
        probe_url=base_url + "/health",
        start_timeout=START_TIMEOUT,
        stop_timeout=STOP_TIMEOUT,
        probe_interval=0.1,
        reap_children=True,
    ) as process:
        yield Manager(process, base_url, argv, child_pids(process.pid))


# --- the fake microservice --------------------------------------------------------------------


def fake_service_app() -> web.Application:
    async def join_room(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response(
            {
                "success": True,
                "message": "ok",
                "session_id": body.get("session_id"),
                "service_id": SERVICE_ID,
            }
        )

    async def leave_room(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"success": True, "message": "ok"})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "healthy"})

    app = web.Application()
    app.router.add_post("/join-room", join_room)
    app.router.add_post("/leave-room", leave_room)
    app.router.add_get("/health", health)
    return app


@asynccontextmanager
async def fake_service() -> AsyncIterator[str]:
    runner = web.AppRunner(fake_service_app(), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, HOST, 0)
        await site.start()
        port = runner.addresses[0][1]
        yield f"http://{HOST}:{port}"
    finally:
        await runner.cleanup()


# --- the manager's API ------------------------------------------------------------------------


async def call_json(
    http: aiohttp.ClientSession, method: str, url: str, body: Any = None
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body)
    async with http.request(method, url, data=data, headers=JSON_HEADERS) as response:
        raw = await response.read()
    return response.status, json.loads(raw) if raw else None


async def expect_ok(http: aiohttp.ClientSession, method: str, url: str, body: Any = None) -> Any:
    status, answer = await call_json(http, method, url, body)
    if status != 200:
        raise RuntimeError(f"{method} {url} answered HTTP {status}: {answer}")
    return answer


async def set_up_session(http: aiohttp.ClientSession, base: str, service_url: str) -> str:
    await expect_ok(
        http,
        "POST",
        f"{base}/api/v1/microservices/register",
        {"service_id": SERVICE_ID, "endpoint": service_url, "metadata": {"type": SERVICE_TYPE}},
    )
    answer = await expect_ok(
        http,
        "POST",
        f"{base}/api/v1/create-session",
        {"user_identity": USER_IDENTITY, "required_services": []},
    )
    return str(answer["session_id"])


@dataclass(frozen=True)
class LoggedEvent:
    id: int
    type: str
    wall: float  # its `timestamp`, seconds since the epoch (millisecond resolution)


async def read_events(
    http: aiohttp.ClientSession, base: str, session_id: str, since: int
) -> list[LoggedEvent]:
    """The session's events after `since`, by JSON polling."""
    events: list[LoggedEvent] = []
    while True:
        url = f"{base}/api/v1/events?session_id={session_id}&since={since}&limit={POLL_LIMIT}"
        page = await expect_ok(http, "GET", url)
        if page.get("gap"):
            raise RuntimeError(f"the event history no longer holds the run: {page.get('missed')}")
        for raw in page["events"]:
            stamp = datetime.fromisoformat(raw["timestamp"].replace("Z", "+00:00"))
            events.append(LoggedEvent(raw["id"], raw["type"], stamp.timestamp()))
        if not page["events"]:
            return events
        since = page["next"]


# --- subscribers ------------------------------------------------------------------------------


@dataclass
class Subscriber:
    index: int
    ids: array[int] = field(default_factory=lambda: array("q"))
    received: array[float] = field(default_factory=lambda: array("d"))  # perf_counter
    last_id: int = 0
    dropped: list[dict[str, Any]] = field(default_factory=list)  # EventsDropped data
    connected: float | None = None  # perf_counter when the response headers arrived
    terminated: bool = False
    error: str | None = None
    done: bool = False

    def take_frames(self, complete: bytes, now: float) -> None:
        for match in FRAME.finditer(complete):
            kind = match[2]
            if kind == EVENTS_DROPPED:
                self.dropped.append(json.loads(match[3])["data"])
                continue
            event_id = int(match[1])
            self.ids.append(event_id)
            self.received.append(now)
            self.last_id = event_id
            if kind == SESSION_TERMINATED:
                self.terminated = True


async def read_stream(subscriber: Subscriber, content: aiohttp.StreamReader) -> None:
    pending = b""
    while not subscriber.terminated:
        chunk = await content.readany()
        now = time.perf_counter()
        if not chunk:
            return
        pending += chunk
        end = pending.rfind(b"\n\n")
        if end >= 0:
            subscriber.take_frames(pending[: end + 2], now)
            pending = pending[end + 2 :]


async def follow(
    subscriber: Subscriber, http: aiohttp.ClientSession, url: str, gate: asyncio.Semaphore
) -> None:
    try:
        async with gate:
            response = await http.get(url, headers=SSE_HEADERS)
        async with response:
            subscriber.connected = time.perf_counter()
            if response.status != 200:
                subscriber.error = f"HTTP {response.status}"
                return
            await read_stream(subscriber, response.content)
            if not subscriber.terminated:
                subscriber.error = "stream ended before SessionTerminated"
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        subscriber.error = f"{type(exc).__name__}: {exc}"
    finally:
        subscriber.done = True


@dataclass(frozen=True)
class Fleet:
    subscribers: list[Subscriber]
    tasks: list[asyncio.Task[None]]

    async def wait_closed(self, timeout: float) -> None:
        """Until every stream has ended (after SessionTerminated), at most `timeout` s."""
        await asyncio.wait(self.tasks, timeout=timeout)


@asynccontextmanager
async def subscriber_fleet(
    http: aiohttp.ClientSession, url: str, count: int, connect_concurrency: int
) -> AsyncIterator[Fleet]:
    """`count` subscribers reading `url`; those still open are cancelled on the way out."""
    gate = asyncio.Semaphore(connect_concurrency)
    subscribers = [Subscriber(index) for index in range(count)]
    tasks = [asyncio.create_task(follow(sub, http, url, gate)) for sub in subscribers]
    try:
        yield Fleet(subscribers, tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def wait_until(
    subscribers: list[Subscriber], event_id: int, timeout: float
) -> tuple[bool, float]:
    """Until every subscriber still streaming has seen `event_id` (True) or `timeout`."""
    started = time.perf_counter()
    deadline = started + timeout
    while time.perf_counter() < deadline:
        if all(sub.last_id >= event_id or sub.done for sub in subscribers):
            return True, time.perf_counter() - started
        await asyncio.sleep(0.01)
    return False, time.perf_counter() - started


# --- the event source -------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    kind: str  # "add" or "remove"
    sent: float  # perf_counter
    answered: float


async def generate_events(
    http: aiohttp.ClientSession, base: str, session_id: str, calls: int, interval: float
) -> list[Call]:
    """`calls` add/remove calls, alternating, one at a time, one every `interval` seconds (or
    CALL_GAP after the previous answer when that is later)."""
    add_url = f"{base}/api/v1/sessions/{session_id}/services"
    remove_url = f"{add_url}/{SERVICE_ID}"
    done: list[Call] = []
    start = time.perf_counter()
    for number in range(calls):
        due = start + number * interval
        if done:
            due = max(due, done[-1].answered + CALL_GAP)
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        adding = number % 2 == 0
        sent = time.perf_counter()
        if adding:
            status, answer = await call_json(http, "POST", add_url, {"service": SERVICE_ID})
        else:
            status, answer = await call_json(http, "DELETE", remove_url)
        done.append(Call("add" if adding else "remove", sent, time.perf_counter()))
        if status != 200:
            raise RuntimeError(f"call {number} answered HTTP {status}: {answer}")
    return done


# --- analysis ---------------------------------------------------------------------------------


def distribution_ms(values: Iterable[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0}
    stats = {f"p{p}": percentile(ordered, p) for p in (50, 90, 99)}
    stats |= {"max": ordered[-1], "mean": sum(ordered) / len(ordered)}
    return {"n": len(ordered)} | {k: round(v * 1000, 2) for k, v in stats.items()}


@dataclass(frozen=True)
class Attribution:
    cause: dict[int, int]  # event id -> index of the call that caused it
    outside: int  # events stamped after their call was answered (appended asynchronously)
    unattributed: int


def attribute(events: list[LoggedEvent], calls: list[Call], wall_minus_perf: float) -> Attribution:
    """Each event to the last call sent in or before its timestamp's millisecond."""
    sent_ms = [math.floor((c.sent + wall_minus_perf) * 1000) for c in calls]
    answered_ms = [math.floor((c.answered + wall_minus_perf) * 1000) for c in calls]
    cause: dict[int, int] = {}
    outside = unattributed = 0
    for event in events:
        stamp_ms = round(event.wall * 1000)
        index = bisect.bisect_right(sent_ms, stamp_ms) - 1
        if index < 0:
            unattributed += 1
            continue
        cause[event.id] = index
        if stamp_ms > answered_ms[index] + 1:
            outside += 1
    return Attribution(cause, outside, unattributed)


@dataclass
class DeliveryStats:
    from_call: list[float] = field(default_factory=list)
    from_timestamp: list[float] = field(default_factory=list)
    first: dict[int, float] = field(default_factory=dict)  # event id -> first receive
    last: dict[int, float] = field(default_factory=dict)  # event id -> last receive
    duplicates: int = 0


def collect_deliveries(
    subscribers: list[Subscriber],
    events: list[LoggedEvent],
    calls: list[Call],
    attribution: Attribution,
    wall_minus_perf: float,
) -> DeliveryStats:
    by_id = {event.id: event for event in events}
    stats = DeliveryStats()
    for sub in subscribers:
        seen: set[int] = set()
        for event_id, received in zip(sub.ids, sub.received, strict=True):
            event = by_id.get(event_id)
            if event is None:
                continue  # history before the run, or the final teardown
            if event_id in seen:
                stats.duplicates += 1
                continue
            seen.add(event_id)
            stats.from_timestamp.append(received + wall_minus_perf - event.wall)
            cause = attribution.cause.get(event_id)
            if cause is not None:
                stats.from_call.append(received - calls[cause].sent)
            stats.first[event_id] = min(received, stats.first.get(event_id, math.inf))
            stats.last[event_id] = max(received, stats.last.get(event_id, -math.inf))
    return stats


def process_report(
    idle: ProcSample | None,
    connected: ProcSample | None,
    after: ProcSample | None,
    run_seconds: float,
) -> dict[str, Any] | None:
    if idle is None or connected is None or after is None:
        return None
    cpu = after.cpu_s - connected.cpu_s
    return {
        "cpu_s_connect": round(connected.cpu_s - idle.cpu_s, 2),
        "cpu_s_run": round(cpu, 2),
        "cpu_pct_run": round(100 * cpu / run_seconds, 1) if run_seconds > 0 else math.nan,
        "rss_mib_idle": round(idle.rss_kib / 1024, 1),
        "rss_mib_connected": round(connected.rss_kib / 1024, 1),
        "rss_mib_after": round(after.rss_kib / 1024, 1),
        "rss_peak_mib": round(after.hwm_kib / 1024, 1),
    }


# --- the run ----------------------------------------------------------------------------------


def snapshot(pids: dict[str, list[int]]) -> dict[str, ProcSample | None]:
    """One sample per role; several pids of a role (there should be one) are summed."""
    result: dict[str, ProcSample | None] = {}
    for role, role_pids in pids.items():
        samples = [s for s in (proc_sample(pid) for pid in role_pids) if s is not None]
        result[role] = (
            ProcSample(
                sum(s.cpu_s for s in samples),
                sum(s.rss_kib for s in samples),
                sum(s.hwm_kib for s in samples),
            )
            if samples
            else None
        )
    return result


def machine_info(load_start: tuple[float, float, float]) -> dict[str, Any]:
    return {
        "nproc": usable_cpus(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "client_loop": client_loop_name(),
        "manager_revision": manager_revision(),
        "loadavg_start": [round(x, 2) for x in load_start],
    }


@dataclass
class Run:
    """What the benchmark gathers while everything is up."""

    manager_argv: list[str] = field(default_factory=list)
    session_id: str = ""
    connect_s: float = 0.0
    connect_errors: list[str] = field(default_factory=list)
    history_id: int = 0
    calls: list[Call] = field(default_factory=list)
    events: list[LoggedEvent] = field(default_factory=list)
    generate_s: float = 0.0  # first call sent to last call answered
    window_s: float = 0.0  # between the "connected" and "after" samples: CPU % is over this
    all_delivered: bool = False
    samples: dict[str, dict[str, ProcSample | None]] = field(default_factory=dict)
    subscribers: list[Subscriber] = field(default_factory=list)


async def connect_all(run: Run, subscribers: list[Subscriber], timeout: float) -> None:
    started = time.perf_counter()
    ready, _ = await wait_until(subscribers, run.history_id, timeout)
    run.connect_s = time.perf_counter() - started
    run.connect_errors = [s.error for s in subscribers if s.error]
    if not ready or len(run.connect_errors) == len(subscribers):
        first = run.connect_errors[0] if run.connect_errors else "timeout"
        raise RuntimeError(f"subscribers did not all connect: {first}")


async def measure(options: Options, run: Run, workdir: Path) -> None:
    async with AsyncExitStack() as stack:
        service_url = await stack.enter_async_context(fake_service())
        manager = await stack.enter_async_context(running_manager(options.manager_command, workdir))
        run.manager_argv = manager.argv
        base = manager.base_url
        pids = {
            "manager": [manager.process.pid],
            "livekit": manager.livekit_pids,
            "client": [os.getpid()],
        }
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        control = await stack.enter_async_context(aiohttp.ClientSession(timeout=timeout))
        streams = await stack.enter_async_context(
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=options.subscribers + 10, limit_per_host=0),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=REQUEST_TIMEOUT),
            )
        )
        run.session_id = await set_up_session(control, base, service_url)
        history = await read_events(control, base, run.session_id, 0)
        run.history_id = history[-1].id
        await asyncio.sleep(0.5)
        run.samples["idle"] = snapshot(pids)

        url = f"{base}/api/v1/sessions/{run.session_id}/events"
        fleet = await stack.enter_async_context(
            subscriber_fleet(streams, url, options.subscribers, options.connect_concurrency)
        )
        subscribers = fleet.subscribers
        await connect_all(run, subscribers, options.delivery_timeout)
        run.subscribers = subscribers
        gc.collect()
        gc.freeze()
        await asyncio.sleep(0.5)
        run.samples["connected"] = snapshot(pids)
        window_start = time.perf_counter()

        calls = max(2, 2 * math.ceil(options.events / 4))  # even: the session ends Ready
        run.calls = await generate_events(
            control, base, run.session_id, calls, interval=2 / options.rate
        )
        run.generate_s = run.calls[-1].answered - run.calls[0].sent
        run.events = await read_events(control, base, run.session_id, run.history_id)
        if run.events:
            run.all_delivered, _ = await wait_until(
                subscribers, run.events[-1].id, options.delivery_timeout
            )
        run.samples["after"] = snapshot(pids)
        run.window_s = time.perf_counter() - window_start

        await expect_ok(control, "DELETE", f"{base}/api/v1/sessions/{run.session_id}")
        await fleet.wait_closed(REQUEST_TIMEOUT)


def build_report(
    options: Options, run: Run, machine: dict[str, Any], wall_minus_perf: float
) -> dict[str, Any]:
    subscribers = run.subscribers
    attribution = attribute(run.events, run.calls, wall_minus_perf)
    deliveries = collect_deliveries(
        subscribers, run.events, run.calls, attribution, wall_minus_perf
    )
    expected = len(run.events) * len(subscribers)
    got = len(deliveries.from_timestamp)
    first_from_call = [
        deliveries.first[e.id] - run.calls[attribution.cause[e.id]].sent
        for e in run.events
        if e.id in deliveries.first and e.id in attribution.cause
    ]
    spread = [deliveries.last[i] - deliveries.first[i] for i in deliveries.first]
    gaps = [d for s in subscribers for d in s.dropped]
    samples = run.samples
    processes = {
        role: process_report(
            samples["idle"][role], samples["connected"][role], samples["after"][role], run.window_s
        )
        for role in ("manager", "livekit", "client")
    }
    return {
        "machine": machine | {"loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "command": " ".join([".venv/bin/python", "scripts/bench_sse.py", *sys.argv[1:]]),
        "manager_argv": run.manager_argv,
        "subscribers": options.subscribers,
        "connect_s": round(run.connect_s, 2),
        "subscriber_errors": len([s for s in subscribers if s.error]),
        "first_subscriber_error": next((s.error for s in subscribers if s.error), None),
        "calls": len(run.calls),
        "call_rtt_ms": distribution_ms(c.answered - c.sent for c in run.calls),
        "events": len(run.events),
        "event_types": dict(Counter(e.type for e in run.events)),
        "events_per_s": (
            round(len(run.events) / run.generate_s, 1) if run.generate_s > 0 else math.nan
        ),
        "generate_s": round(run.generate_s, 2),
        "cpu_window_s": round(run.window_s, 2),
        "deliveries": got,
        "deliveries_expected": expected,
        "deliveries_missing": expected - got,
        "duplicates": deliveries.duplicates,
        "all_delivered_in_time": run.all_delivered,
        "events_dropped_notices": len(gaps),
        "events_missed_in_gaps": sum(int(d.get("count", 0)) for d in gaps),
        "events_not_attributed": attribution.unattributed,
        "events_after_their_call": attribution.outside,
        "latency_from_call_ms": distribution_ms(deliveries.from_call),
        "latency_from_timestamp_ms": distribution_ms(deliveries.from_timestamp),
        "first_delivery_from_call_ms": distribution_ms(first_from_call),
        "fanout_spread_ms": distribution_ms(spread),
        "streams_ended_with_terminated": sum(s.terminated for s in subscribers),
        "processes": processes,
        "target": {"p99_ms_max": 100.0},
    }


async def benchmark(options: Options) -> dict[str, Any]:
    load_start = os.getloadavg()
    raise_open_file_limit(options.subscribers + 256)
    wall_minus_perf = time.time() - time.perf_counter()
    run = Run()
    with tempfile.TemporaryDirectory(prefix="bench-sse-") as tmp:
        await measure(options, run, Path(tmp))
    return build_report(options, run, machine_info(load_start), wall_minus_perf)


# --- output -----------------------------------------------------------------------------------


def latency_row(name: str, stats: dict[str, float]) -> str:
    if not stats.get("n"):
        return f"{name:<30} {'-':>9}"
    values = " ".join(f"{stats[k]:>8.1f}" for k in ("p50", "p90", "p99", "max", "mean"))
    return f"{name:<30} {int(stats['n']):>9} {values}"


def process_row(name: str, stats: dict[str, Any] | None) -> str:
    if stats is None:
        return f"{name:<9} (not sampled)"
    return (
        f"{name:<9} {stats['cpu_s_connect']:>10.2f} {stats['cpu_s_run']:>8.2f} "
        f"{stats['cpu_pct_run']:>7.1f} {stats['rss_mib_idle']:>9.1f} "
        f"{stats['rss_mib_connected']:>10.1f} {stats['rss_mib_after']:>9.1f} "
        f"{stats['rss_peak_mib']:>9.1f}"
    )


def render_table(report: dict[str, Any]) -> str:
    m = report["machine"]
    p99 = report["latency_from_call_ms"].get("p99", math.nan)
    target = report["target"]["p99_ms_max"]
    lines = [
        f"machine: nproc={m['nproc']} cpu={m['cpu']!r} python={m['python']} "
        f"aiohttp={m['aiohttp']} client loop={m['client_loop']} manager={m['manager_revision']}",
        f"         loadavg at start {m['loadavg_start']}, at end {m['loadavg_end']}",
        f"command: {report['command']}",
        f"run:     {report['subscribers']} subscribers connected in {report['connect_s']} s "
        f"({report['subscriber_errors']} errors); {report['calls']} add/remove calls -> "
        f"{report['events']} events in {report['generate_s']} s = {report['events_per_s']} "
        f"events/s; CPU window {report['cpu_window_s']} s",
        f"         deliveries {report['deliveries']} of {report['deliveries_expected']} "
        f"(missing {report['deliveries_missing']}, duplicates {report['duplicates']}); "
        f"EventsDropped notices {report['events_dropped_notices']} "
        f"(events missed {report['events_missed_in_gaps']}); streams ended by "
        f"SessionTerminated {report['streams_ended_with_terminated']}",
        "",
        f"{'latency (ms)':<30} {'n':>9} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8} {'mean':>8}",
        latency_row("delivery, from call sent", report["latency_from_call_ms"]),
        latency_row("delivery, from event timestamp", report["latency_from_timestamp_ms"]),
        latency_row("first subscriber, from call", report["first_delivery_from_call_ms"]),
        latency_row("fan-out spread first->last", report["fanout_spread_ms"]),
        latency_row("add/remove call round trip", report["call_rtt_ms"]),
        "",
        f"{'process':<9} {'CPU s conn':>10} {'CPU s run':>8} {'CPU %':>7} {'RSS idle':>9} "
        f"{'RSS w/subs':>10} {'RSS after':>9} {'RSS peak':>9}   (MiB; % of one core)",
        process_row("manager", report["processes"]["manager"]),
        process_row("livekit", report["processes"]["livekit"]),
        process_row("client", report["processes"]["client"]),
        "",
        f"p99 delivery latency (from call) {p99:.1f} ms; target < {target:g} ms: "
        + ("met" if p99 < target else "NOT met"),
    ]
    if report["first_subscriber_error"]:
        lines.append(f"first subscriber error: {report['first_subscriber_error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    return run_and_print(
        lambda: benchmark(options),
        render_table,
        as_json=options.as_json,
        program="bench_sse",
        errors=(RuntimeError, OSError, aiohttp.ClientError),
    )


if __name__ == "__main__":
    sys.exit(main())
