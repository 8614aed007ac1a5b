"""Soak: many concurrent creators of sessions whose SDK services really join and leave the room,
on a real livekit-server, for a while; then count what went wrong and what was left behind.

Run it through scripts/soak.sh, which runs it inside the private network namespace of
scripts/netns-run.sh (WebRTC between the realtime SDK and livekit-server needs the veth pair
there; loopback alone does not carry media). Everything binds and talks to 127.0.0.1 only.

    scripts/soak.sh                                  # 200 creators, 60 s, 4 pong services
    scripts/soak.sh --creators 50 --duration 20

1. one livekit-server (the project's binary, a config from `new_config` with its webhooks
   pointed at the manager), on free ports;
2. the manager as a separate process (`python -m session_manager`, SQLite store in a temp dir,
   log level WARN, LIVEKIT_URL/KEY/SECRET of that livekit-server), waited for on /health;
3. `--services` pong microservices (examples/pong, the SDK, `--type PONG`), each on its own
   port, waited for until the manager lists them all Healthy;
4. for `--duration` seconds, `--creators` closed loops, each one session at a time:
   POST /api/v1/create-session {"user_identity": "soak-<n>", "required_services": ["type:PONG"],
   "wait_until_ready": true, "timeout_secs": ...} (the pong joins the room through the SDK), then
   DELETE /api/v1/sessions/{id} (the manager sends the pong a leave-room and deletes the room).
   Every answer is counted by status and error code; a creator pauses 0.2 s after an answer
   other than 200 so that a failing manager is not hammered in a tight loop;
5. every `--sample-interval` seconds (10): the RSS (VmRSS) of the manager, livekit-server and the
   services, the CPU each (and this client) used since the previous sample, the services still
   up, live sessions (GET /metrics), LiveKit's room count and the load average, printed on
   stderr as it goes;
6. at the end: wait (bounded) until the manager reports no live session, then compare LiveKit's
   ListRooms with the rooms of the manager's live sessions (GET /api/v1/sessions?status=...):
   a room that no live session owns is leaked. Checked again after `--settle` seconds, so a room
   LiveKit is still closing is told apart from one that stays.

Every child is stopped on the way out, also on Ctrl-C, SIGTERM or an error: the services first
(they drain themselves at the manager and leave their rooms), then the manager, then LiveKit.
Results are reported, never asserted. Target (issue 8): 0 5xx, 0 leaked rooms, manager RSS flat
after the first 20 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import AbstractAsyncContextManager, AsyncExitStack, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from bench_harness import (
    HOST,
    PROJECT_ROOT,
    child_env,
    client_loop_name,
    cpu_model,
    cpu_seconds,
    free_port,
    manager_revision,
    package_version,
    percentile,
    run_and_print,
    running_process,
    usable_cpus,
)
from bench_harness import (
    require_netns as shared_require_netns,
)
from bench_harness import running_livekit as shared_running_livekit
from livekit import api

sys.path.insert(0, str(PROJECT_ROOT))

from session_manager.livekit.server import (
    LiveKitServerError,
    ManagedLiveKitConfig,
    find_binary,
    new_config,
)

CREATE_PATH = "/api/v1/create-session"
SESSIONS_PATH = "/api/v1/sessions"
SERVICES_PATH = "/api/v1/microservices"
HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"
WEBHOOK_PATH = "/livekit/webhook"
PONG_SCRIPT = PROJECT_ROOT / "examples" / "pong" / "pong.py"
SERVICE_TYPE = "PONG"
# Statuses in which a session still owns its room (Terminating: the room is being deleted).
OWNING_STATUSES = ("Creating", "WaitingForServices", "Ready", "Active", "Terminating")

START_TIMEOUT = 30.0
REGISTRATION_TIMEOUT = 30.0
MANAGER_STOP_TIMEOUT = 90.0  # it ends every live session (leave-room, DeleteRoom) first
SERVICE_STOP_TIMEOUT = 30.0  # a pong leaves every room it is in first
LIVEKIT_STOP_TIMEOUT = 15.0
CREATE_MARGIN = 15.0  # client timeout of a create = its timeout_secs + this
DELETE_TIMEOUT = 30.0
SMALL_TIMEOUT = 10.0  # /metrics, listings, ListRooms while sampling
END_TIMEOUT = 30.0  # the final listings: LiveKit may still be busy
END_ATTEMPTS = 3
PAUSE_AFTER_FAILURE = 0.2
PAUSE_AFTER_CLIENT_ERROR = 0.5
MAX_ITERATIONS = 1_000_000  # per creator; the deadline ends the loop long before
MAX_PAGES = 200  # per status when listing sessions (500 each)
PAGE_SIZE = 500
LEAKED_SHOWN = 10
LOG_MESSAGES_SHOWN = 8
RSS_WARMUP = 20.0  # "RSS flat after the first 20 s"
RSS_TAIL = 60.0  # the growth over the last minute of samples is reported too
CPU_GROUPS = ("manager", "livekit", "services", "client")


# --- options ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    creators: int
    duration: float
    services: int
    timeout_secs: int
    hold: float
    sample_interval: float
    drain_timeout: float
    settle: float
    as_json: bool
    log_dir: Path | None
    livekit_binary: str | None
    manager_args: tuple[str, ...] = ()


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description=(
            "Soak the session manager: concurrent create-session + delete loops on sessions "
            "whose SDK services (examples/pong) join and leave real LiveKit rooms. Reports 5xx, "
            "leaked rooms and the manager's RSS. Run it through scripts/soak.sh."
        )
    )
    parser.add_argument(
        "--creators", type=int, default=200, help="concurrent creator loops (default 200)"
    )
    parser.add_argument(
        "--duration", type=float, default=60.0, help="seconds creators start sessions (60)"
    )
    parser.add_argument(
        "--services", type=int, default=4, help="pong services of type PONG (default 4)"
    )
    parser.add_argument(
        "--timeout-secs",
        type=int,
        default=30,
        help="timeout_secs of each create-session with wait_until_ready (default 30)",
    )
    parser.add_argument(
        "--hold",
        type=float,
        default=0.0,
        help="seconds a Ready session is kept before it is deleted (default 0)",
    )
    parser.add_argument(
        "--sample-interval",
        type=float,
        default=10.0,
        help="seconds between RSS / live-session samples (default 10)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="longest wait, after the last creator stops, for no live session (default 60)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=10.0,
        help="seconds before LiveKit's rooms are compared a second time (default 10)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument(
        "--log-dir",
        type=Path,
        metavar="DIR",
        help="keep the children's logs in this new folder (default: a temp folder, removed)",
    )
    parser.add_argument(
        "--livekit-binary", help="livekit-server to run (default: .cache/bin or PATH)"
    )
    parser.add_argument(
        "--manager-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra argument for the manager, e.g. --manager-arg=--event-history=1000 "
        "(repeatable)",
    )
    args = parser.parse_args(argv)
    for name in ("creators", "services", "timeout_secs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("duration", "sample_interval"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("hold", "drain_timeout", "settle"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative")
    if args.log_dir is not None and args.log_dir.exists():
        parser.error(f"--log-dir {args.log_dir} already exists")
    return Options(
        creators=args.creators,
        duration=args.duration,
        services=args.services,
        timeout_secs=args.timeout_secs,
        hold=args.hold,
        sample_interval=args.sample_interval,
        drain_timeout=args.drain_timeout,
        settle=args.settle,
        as_json=args.json,
        log_dir=args.log_dir.resolve() if args.log_dir else None,
        livekit_binary=args.livekit_binary,
        manager_args=tuple(args.manager_arg),
    )


def require_netns() -> None:
    shared_require_netns("soak", "scripts/soak.sh")


# --- counting ---------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the creators saw: answers by call and outcome, latencies (s) of good answers."""

    outcomes: Counter[str] = field(default_factory=Counter)  # "create 200", "delete 503 X", ...
    create_ok: list[float] = field(default_factory=list)
    create_failed: list[float] = field(default_factory=list)
    delete_ok: list[float] = field(default_factory=list)
    create_statuses: Counter[str] = field(default_factory=Counter)  # the answer's "status"
    delete_statuses: Counter[str] = field(default_factory=Counter)
    server_errors: int = 0  # 5xx answers, to any call
    client_errors: int = 0  # timeouts and connection errors on our side
    completed: int = 0  # created Ready and deleted
    first_5xx: str | None = None

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())

    def answered(self, call: str, status: int, payload: bytes, latency: float) -> str:
        """Count an HTTP answer; its `error` code (from the error envelope) or ""."""
        code = error_code(status, payload)
        self.outcomes[f"{call} {status}{' ' + code if code else ''}"] += 1
        if status >= 500:
            self.server_errors += 1
            if self.first_5xx is None:
                self.first_5xx = f"{call} {status}: {payload[:300].decode(errors='replace')}"
        if call == "create":
            (self.create_ok if status == 200 else self.create_failed).append(latency)
        elif call == "delete" and status == 200:
            self.delete_ok.append(latency)
        return code

    def failed(self, call: str, what: str) -> None:
        self.outcomes[f"{call} {what}"] += 1
        self.client_errors += 1


def error_code(status: int, payload: bytes) -> str:
    if status < 400:
        return ""
    try:
        body = json.loads(payload)
    except ValueError:
        return "(not JSON)"
    return str(body.get("error", "?")) if isinstance(body, dict) else "?"


def answer_status(payload: bytes) -> str:
    try:
        body = json.loads(payload)
    except ValueError:
        return "(not JSON)"
    return str(body.get("status", "?")) if isinstance(body, dict) else "?"


# --- the creators -----------------------------------------------------------------------------


@dataclass
class Run:
    """What the creators and the sampler share."""

    http: aiohttp.ClientSession
    base_url: str
    options: Options
    tally: Tally
    deadline: float
    stop: asyncio.Event  # set when a child died: no point going on


async def call(
    run: Run, name: str, method: str, url: str, timeout: aiohttp.ClientTimeout, **kwargs: Any
) -> bytes | None:
    """One timed request, tallied under `name`; its body when it answered 200, else None
    (after a pause, so a failing manager is not hammered)."""
    started = time.perf_counter()
    try:
        async with run.http.request(method, url, timeout=timeout, **kwargs) as response:
            status, payload = response.status, await response.read()
    except TimeoutError:
        run.tally.failed(name, "client timeout")
        return None
    except aiohttp.ClientError as exc:
        run.tally.failed(name, f"client error {type(exc).__name__}")
        await asyncio.sleep(PAUSE_AFTER_CLIENT_ERROR)
        return None
    run.tally.answered(name, status, payload, time.perf_counter() - started)
    if status != 200:
        await asyncio.sleep(PAUSE_AFTER_FAILURE)
        return None
    return payload


async def one_session(run: Run, body: bytes) -> None:
    tally, options = run.tally, run.options
    create_timeout = aiohttp.ClientTimeout(total=options.timeout_secs + CREATE_MARGIN)
    payload = await call(
        run,
        "create",
        "POST",
        run.base_url + CREATE_PATH,
        create_timeout,
        data=body,
        headers={"Content-Type": "application/json"},
    )
    if payload is None:
        return
    ready = answer_status(payload)
    tally.create_statuses[ready] += 1
    session_id = json.loads(payload)["session_id"]
    if options.hold:
        await asyncio.sleep(options.hold)
    payload = await call(
        run,
        "delete",
        "DELETE",
        f"{run.base_url}{SESSIONS_PATH}/{session_id}",
        aiohttp.ClientTimeout(total=DELETE_TIMEOUT),
    )
    if payload is None:
        return
    tally.delete_statuses[answer_status(payload)] += 1
    if ready == "Ready":
        tally.completed += 1


async def creator(run: Run, number: int) -> None:
    body = json.dumps(
        {
            "user_identity": f"soak-{number}",
            "required_services": [f"type:{SERVICE_TYPE}"],
            "wait_until_ready": True,
            "timeout_secs": run.options.timeout_secs,
        }
    ).encode()
    for _ in range(MAX_ITERATIONS):
        if run.stop.is_set() or time.monotonic() >= run.deadline:
            return
        await one_session(run, body)


# --- readings ---------------------------------------------------------------------------------


def rss_mib(pid: int) -> float | None:
    """VmRSS of a process, MiB; None once it is gone."""
    with suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


async def metric_sums(http: aiohttp.ClientSession, base_url: str) -> dict[str, float] | None:
    """GET /metrics: each metric family's samples summed over their labels; None if no answer."""
    try:
        async with http.get(
            base_url + METRICS_PATH, timeout=aiohttp.ClientTimeout(total=SMALL_TIMEOUT)
        ) as response:
            if response.status != 200:
                return None
            text = await response.text()
    except (aiohttp.ClientError, TimeoutError):
        return None
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            with suppress(ValueError, IndexError):
                sums[name] = sums.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return sums


async def live_sessions(http: aiohttp.ClientSession, base_url: str) -> int | None:
    """The manager's live sessions (all statuses of the `session_manager_sessions` gauge)."""
    sums = await metric_sums(http, base_url)
    if sums is None:
        return None
    return int(sums.get("session_manager_sessions", 0))


async def room_names(lk: api.LiveKitAPI, timeout: float = SMALL_TIMEOUT) -> list[str]:
    response = await asyncio.wait_for(lk.room.list_rooms(api.ListRoomsRequest()), timeout)
    return [room.name for room in response.rooms]


async def room_count(lk: api.LiveKitAPI) -> int | None:
    try:
        return len(await room_names(lk))
    except Exception:  # a reading, not the run: LiveKit busy or gone shows as "-"
        return None


@dataclass
class Sample:
    t: float  # seconds since the creators started
    phase: str  # "start", "load", "drain", "end"
    manager_rss_mib: float | None
    livekit_rss_mib: float | None
    services_rss_mib: float | None
    services_alive: int
    # CPU since the previous sample, % of one core: manager, livekit, services, this client
    cpu_pct: dict[str, float | None]
    live_sessions: int | None
    rooms: int | None
    requests: int
    server_errors: int
    completed: int
    load_1min: float


@dataclass
class Processes:
    manager: int
    livekit: int
    services: list[int]

    def groups(self) -> dict[str, list[int]]:
        return {
            "manager": [self.manager],
            "livekit": [self.livekit],
            "services": self.services,
            "client": [os.getpid()],
        }


def group_cpu(pids: list[int]) -> float | None:
    """CPU seconds used so far by these processes together; None once one is gone."""
    try:
        return sum(cpu_seconds(pid) for pid in pids)
    except (OSError, IndexError, ValueError):
        return None


class Sampler:
    def __init__(
        self, run: Run, lk: api.LiveKitAPI, pids: Processes, started: float, verbose: bool
    ) -> None:
        self.samples: list[Sample] = []
        self._run, self._lk, self._pids = run, lk, pids
        self._started = started
        self._verbose = verbose
        self._last_cpu: tuple[float, dict[str, float | None]] | None = None

    def phase(self) -> str:
        return "load" if time.monotonic() < self._run.deadline else "drain"

    def _cpu_pct(self, now: float) -> dict[str, float | None]:
        cpu = {name: group_cpu(pids) for name, pids in self._pids.groups().items()}
        pct: dict[str, float | None] = dict.fromkeys(cpu)
        if self._last_cpu is not None and now > self._last_cpu[0]:
            then, before = self._last_cpu
            for name, used in cpu.items():
                old = before.get(name)
                if used is not None and old is not None:
                    pct[name] = round((used - old) / (now - then) * 100, 1)
        self._last_cpu = (now, cpu)
        return pct

    async def take(self, phase: str | None = None) -> Sample:
        now = time.monotonic()
        cpu_pct = self._cpu_pct(now)
        services = [rss_mib(pid) for pid in self._pids.services]
        live, rooms = await asyncio.gather(
            live_sessions(self._run.http, self._run.base_url), room_count(self._lk)
        )
        tally = self._run.tally
        sample = Sample(
            t=round(now - self._started, 1),
            phase=phase or self.phase(),
            manager_rss_mib=rss_mib(self._pids.manager),
            livekit_rss_mib=rss_mib(self._pids.livekit),
            services_rss_mib=round(sum(s for s in services if s is not None), 1),
            services_alive=sum(1 for s in services if s is not None),
            cpu_pct=cpu_pct,
            live_sessions=live,
            rooms=rooms,
            requests=tally.requests,
            server_errors=tally.server_errors,
            completed=tally.completed,
            load_1min=round(os.getloadavg()[0], 2),
        )
        self.samples.append(sample)
        if sample.manager_rss_mib is None or sample.livekit_rss_mib is None:
            self._run.stop.set()  # the manager or LiveKit died: the creators stop
        if self._verbose:
            print(render_sample(sample), file=sys.stderr, flush=True)
        return sample

    async def every(self, interval: float) -> None:
        """A sample every `interval` s (the first one after `interval`) until cancelled."""
        next_at = self._started
        while True:
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            await self.take()


def progress(line: str) -> None:
    print(f"soak: {line}", file=sys.stderr, flush=True)


def render_sample(s: Sample) -> str:
    def num(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    cpu = "/".join(num(s.cpu_pct.get(name), ".0f") for name in CPU_GROUPS)
    return (
        f"t={s.t:6.1f}s {s.phase:<5} RSS MiB manager {num(s.manager_rss_mib, '.1f')} "
        f"livekit {num(s.livekit_rss_mib, '.0f')} services {num(s.services_rss_mib, '.0f')} "
        f"({s.services_alive} up) | "
        f"CPU% {cpu} | live {num(s.live_sessions, 'd')} rooms {num(s.rooms, 'd')} | "
        f"requests {s.requests} 5xx {s.server_errors} completed {s.completed} | "
        f"load {s.load_1min}"
    )


# --- the end: drain and leaked rooms ----------------------------------------------------------


async def wait_for_no_live_session(run: Run, timeout: float) -> tuple[int | None, float]:
    """Poll /metrics until no session is live or `timeout` passes: (live left, seconds)."""
    started = time.monotonic()
    live = await live_sessions(run.http, run.base_url)
    while live != 0 and time.monotonic() - started < timeout:
        await asyncio.sleep(0.5)
        live = await live_sessions(run.http, run.base_url)
    return live, round(time.monotonic() - started, 1)


async def owned_rooms(run: Run) -> dict[str, str]:
    """room name -> status of every session that still owns its room, from the listing pages."""
    owned: dict[str, str] = {}
    timeout = aiohttp.ClientTimeout(total=END_TIMEOUT)
    for status in OWNING_STATUSES:
        cursor: str | None = None
        for _ in range(MAX_PAGES):
            params = {"status": status, "limit": str(PAGE_SIZE)}
            if cursor:
                params["cursor"] = cursor
            async with run.http.get(
                run.base_url + SESSIONS_PATH, params=params, timeout=timeout
            ) as response:
                payload = await response.read()
                if response.status != 200:
                    raise RuntimeError(
                        f"GET {SESSIONS_PATH}?status={status}: HTTP {response.status} "
                        f"{payload[:200]!r}"
                    )
            page = json.loads(payload)
            for view in page["sessions"]:
                owned[view["room_name"]] = view["status"]
            cursor = page.get("next_cursor")
            if not cursor:
                break
    return owned


@dataclass
class RoomCheck:
    at: float  # seconds since the creators started
    rooms: int | None
    owned_by_live_sessions: int | None
    leaked: int | None  # None: LiveKit or the manager could not be listed
    leaked_examples: list[dict[str, Any]]
    error: str | None = None


async def list_rooms_patiently(lk: api.LiveKitAPI) -> list[Any]:
    """ListRooms, retried: a LiveKit still working off the load may take a while to answer."""
    for attempt in range(1, END_ATTEMPTS + 1):
        try:
            response = await asyncio.wait_for(
                lk.room.list_rooms(api.ListRoomsRequest()), END_TIMEOUT
            )
            return list(response.rooms)
        except Exception as exc:
            if attempt == END_ATTEMPTS:
                raise RuntimeError(
                    f"ListRooms failed {END_ATTEMPTS} times ({END_TIMEOUT:g}s each): {exc!r}"
                ) from exc
            await asyncio.sleep(1.0)
    raise AssertionError("unreachable")


async def check_rooms(run: Run, lk: api.LiveKitAPI, started: float) -> RoomCheck:
    """LiveKit's rooms against the rooms of the manager's live sessions. The manager is listed
    first: a session created in between could only make a room look leaked, and none is (every
    creator has stopped)."""
    try:
        owned = await owned_rooms(run)
        rooms = await list_rooms_patiently(lk)
    except Exception as exc:
        return RoomCheck(
            at=round(time.monotonic() - started, 1),
            rooms=None,
            owned_by_live_sessions=None,
            leaked=None,
            leaked_examples=[],
            error=f"{type(exc).__name__}: {exc}",
        )
    leaked = [room for room in rooms if room.name not in owned]
    examples: list[dict[str, Any]] = []
    for room in leaked[:LEAKED_SHOWN]:
        example: dict[str, Any] = {
            "room": room.name,
            "participants": room.num_participants,
            "age_s": round(time.time() - room.creation_time, 1) if room.creation_time else None,
        }
        with suppress(Exception):  # a detail: the room may be gone meanwhile
            people = await asyncio.wait_for(
                lk.room.list_participants(api.ListParticipantsRequest(room=room.name)),
                SMALL_TIMEOUT,
            )
            example["identities"] = [p.identity for p in people.participants]
        examples.append(example)
    return RoomCheck(
        at=round(time.monotonic() - started, 1),
        rooms=len(rooms),
        owned_by_live_sessions=sum(1 for room in rooms if room.name in owned),
        leaked=len(leaked),
        leaked_examples=examples,
    )


# --- logs -------------------------------------------------------------------------------------


# Ours: "<time> LEVEL logger: message key=value ..."; livekit-server's: tab-separated
# "<time>\tLEVEL\tlogger\tfile:line\tmessage\t{json}".
LOG_LINE = re.compile(r"\b(CRITICAL|ERROR|WARN|WARNING)\s+([\w.]+): (.*)")
LIVEKIT_LOG_LINE = re.compile(r"\t(ERROR|WARN)\t([\w.]+)\t\S+\t([^\t]*)")


def log_summary(path: Path) -> dict[str, Any]:
    """Lines at WARN and above in a child's log, by level and by message (key=value cut off)."""
    levels: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    tracebacks = 0
    with suppress(OSError):
        with path.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if line.startswith("Traceback"):
                    tracebacks += 1
                match = LOG_LINE.search(line) or LIVEKIT_LOG_LINE.search(line)
                if match is None:
                    continue
                level = "WARN" if match[1] == "WARNING" else match[1]
                levels[level] += 1
                message = re.split(r" \w+=", match[3], maxsplit=1)[0].strip()
                messages[f"{level} {match[2]}: {message[:120]}"] += 1
    return {
        "levels": dict(levels),
        "tracebacks": tracebacks,
        "top": messages.most_common(LOG_MESSAGES_SHOWN),
    }


# --- processes --------------------------------------------------------------------------------


def running_livekit(
    config: ManagedLiveKitConfig, workdir: Path
) -> AbstractAsyncContextManager[asyncio.subprocess.Process]:
    return shared_running_livekit(
        config, workdir, start_timeout=START_TIMEOUT, stop_timeout=LIVEKIT_STOP_TIMEOUT
    )


def running_manager(
    config: ManagedLiveKitConfig, port: int, workdir: Path, extra: tuple[str, ...]
) -> AbstractAsyncContextManager[asyncio.subprocess.Process]:
    workdir.mkdir()
    command = [
        sys.executable,
        "-m",
        "session_manager",
        "--host",
        HOST,
        "--port",
        str(port),
        "--store",
        "sqlite",
        "--data-dir",
        str(workdir / "data"),
        "--log-level",
        "WARN",
        *extra,
    ]
    return running_process(
        "session-manager",
        command,
        cwd=workdir,  # so no config/session-manager.toml of the caller's is picked up
        env=child_env(config),
        probe_url=f"http://{HOST}:{port}{HEALTH_PATH}",
        start_timeout=START_TIMEOUT,
        stop_timeout=MANAGER_STOP_TIMEOUT,
    )


def running_pong(
    service_id: str, port: int, manager_url: str, workdir: Path
) -> AbstractAsyncContextManager[asyncio.subprocess.Process]:
    workdir.mkdir()
    command = [
        sys.executable,
        str(PONG_SCRIPT),
        "--service-id",
        service_id,
        "--host",
        HOST,
        "--port",
        str(port),
        "--manager-url",
        manager_url,
        "--type",
        SERVICE_TYPE,
        "--log-level",
        "WARNING",
    ]
    return running_process(
        service_id,
        command,
        cwd=workdir,
        env=child_env(),
        probe_url=f"http://{HOST}:{port}{HEALTH_PATH}",
        start_timeout=START_TIMEOUT,
        stop_timeout=SERVICE_STOP_TIMEOUT,
    )


async def wait_for_services(
    http: aiohttp.ClientSession, base_url: str, service_ids: set[str]
) -> None:
    """Until the manager lists every one of `service_ids` as Healthy."""
    deadline = time.monotonic() + REGISTRATION_TIMEOUT
    healthy: set[str] = set()
    while time.monotonic() < deadline:
        with suppress(aiohttp.ClientError, TimeoutError, ValueError, KeyError):
            async with http.get(
                base_url + SERVICES_PATH,
                params={"type": SERVICE_TYPE},
                timeout=aiohttp.ClientTimeout(total=SMALL_TIMEOUT),
            ) as response:
                listed = json.loads(await response.read())["microservices"]
            healthy = {s["service_id"] for s in listed if s.get("status") == "Healthy"}
            if service_ids <= healthy:
                return
        await asyncio.sleep(0.2)
    raise RuntimeError(
        f"services not registered Healthy within {REGISTRATION_TIMEOUT}s: "
        f"{sorted(service_ids - healthy)}"
    )


# --- the run ----------------------------------------------------------------------------------


def machine_info(livekit_binary: str, load_before: float) -> dict[str, Any]:
    livekit_version = subprocess.run(
        [livekit_binary, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "nproc": usable_cpus(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "client_loop": client_loop_name(),
        "livekit_server": livekit_version,
        "livekit_api": package_version("livekit-api"),
        "livekit_rtc": package_version("livekit"),
        "aiohttp": aiohttp.__version__,
        "manager_revision": manager_revision(),
        "load_avg_1min_before": round(load_before, 2),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def latency_ms(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None}
    return {
        "n": len(ordered),
        "p50": round(percentile(ordered, 50) * 1000, 1),
        "p90": round(percentile(ordered, 90) * 1000, 1),
        "p99": round(percentile(ordered, 99) * 1000, 1),
        "max": round(ordered[-1] * 1000, 1),
    }


def rss_verdict(samples: list[Sample], warmup: float) -> dict[str, Any]:
    """Manager RSS at the first sample at or after `warmup` s, the most it reached later, and
    its growth over the last minute of samples (to tell a plateau from a slope)."""
    series = [s for s in samples if s.manager_rss_mib is not None]
    after = [s for s in series if s.t >= warmup]
    if len(after) < 2:
        return {"from_t": None, "rss_at_from_mib": None, "max_after_mib": None, "growth_mib": None}
    base, last = after[0].manager_rss_mib, after[-1].manager_rss_mib
    top = max(s.manager_rss_mib for s in after if s.manager_rss_mib is not None)
    minute_ago = min(series, key=lambda s: abs(s.t - (series[-1].t - RSS_TAIL)))
    assert base is not None and last is not None and minute_ago.manager_rss_mib is not None
    return {
        "first_mib": series[0].manager_rss_mib,
        "from_t": after[0].t,
        "rss_at_from_mib": base,
        "max_after_mib": top,
        "last_mib": last,
        "growth_mib": round(top - base, 1),
        "tail_from_t": minute_ago.t,
        "tail_growth_mib": round(last - minute_ago.manager_rss_mib, 1),
    }


async def soak(options: Options) -> dict[str, Any]:
    binary = find_binary(options.livekit_binary)
    load_before = os.getloadavg()[0]
    manager_port = free_port()
    config = new_config(
        binary,
        host=HOST,
        port=free_port(),
        rtc_tcp_port=free_port(),
        rtc_udp_port=free_port(socket.SOCK_DGRAM),
        webhook_urls=(f"http://{HOST}:{manager_port}{WEBHOOK_PATH}",),
    )
    base_url = f"http://{HOST}:{manager_port}"
    if options.log_dir is not None:
        options.log_dir.mkdir(parents=True)
        workdir = options.log_dir
    else:
        workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    report: dict[str, Any] = {"machine": machine_info(binary, load_before)}
    processes: dict[str, asyncio.subprocess.Process] = {}
    tally = Tally()
    try:
        async with AsyncExitStack() as stack:
            processes["livekit"] = await stack.enter_async_context(
                running_livekit(config, workdir / "livekit")
            )
            processes["manager"] = await stack.enter_async_context(
                running_manager(config, manager_port, workdir / "manager", options.manager_args)
            )
            service_ids = [f"soak-pong-{i + 1}" for i in range(options.services)]
            for service_id in service_ids:
                processes[service_id] = await stack.enter_async_context(
                    running_pong(service_id, free_port(), base_url, workdir / service_id)
                )
            # Entered last, so closed first: before the services and the manager stop.
            http = await stack.enter_async_context(
                aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=options.creators + 16),
                    timeout=aiohttp.ClientTimeout(total=SMALL_TIMEOUT),
                )
            )
            lk_http = await stack.enter_async_context(
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SMALL_TIMEOUT))
            )
            lk = api.LiveKitAPI(
                config.url, config.api_key, config.api_secret, session=lk_http, failover=False
            )
            await wait_for_services(http, base_url, set(service_ids))
            pids = Processes(
                manager=processes["manager"].pid,
                livekit=processes["livekit"].pid,
                services=[processes[s].pid for s in service_ids],
            )
            await run_load(report, options, http, base_url, lk, pids, tally)
            await lk.aclose()
    finally:
        report["logs"] = {
            "manager": log_summary(workdir / "manager" / "session-manager.log"),
            "livekit": log_summary(workdir / "livekit" / "livekit-server.log"),
            "services": log_summary_many(
                [workdir / name / f"{name}.log" for name in processes if name.startswith("soak-")]
            ),
            "kept_in": str(workdir) if options.log_dir else None,
        }
        report["exit_codes"] = {name: p.returncode for name, p in processes.items()}
        if options.log_dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return report


def log_summary_many(paths: list[Path]) -> dict[str, Any]:
    levels: Counter[str] = Counter()
    top: Counter[str] = Counter()
    tracebacks = 0
    for path in paths:
        summary = log_summary(path)
        levels.update(summary["levels"])
        top.update(dict(summary["top"]))
        tracebacks += summary["tracebacks"]
    return {
        "levels": dict(levels),
        "tracebacks": tracebacks,
        "top": top.most_common(LOG_MESSAGES_SHOWN),
    }


async def run_load(
    report: dict[str, Any],
    options: Options,
    http: aiohttp.ClientSession,
    base_url: str,
    lk: api.LiveKitAPI,
    pids: Processes,
    tally: Tally,
) -> None:
    started = time.monotonic()
    run = Run(
        http=http,
        base_url=base_url,
        options=options,
        tally=tally,
        deadline=started + options.duration,
        stop=asyncio.Event(),
    )
    sampler = Sampler(run, lk, pids, started, verbose=True)  # progress on stderr
    progress(
        f"{options.creators} creators for {options.duration:g}s, "
        f"{options.services} pong services; a line every {options.sample_interval:g}s"
    )
    await sampler.take("start")
    sampling = asyncio.create_task(sampler.every(options.sample_interval))
    try:
        await asyncio.gather(*(creator(run, n) for n in range(options.creators)))
        load_ended = round(time.monotonic() - started, 1)
        progress(f"t={load_ended}s: every creator has stopped; waiting for no live session")
        live_left, drain_s = await wait_for_no_live_session(run, options.drain_timeout)
        progress(f"{live_left} live session(s) after {drain_s}s; comparing LiveKit's rooms")
        first = await check_rooms(run, lk, started)
        progress(f"leaked rooms: {first.leaked}; again in {options.settle:g}s")
        if options.settle:
            await asyncio.sleep(options.settle)
        second = await check_rooms(run, lk, started)
        counters = await metric_sums(http, base_url) or {}
    finally:
        sampling.cancel()
        with suppress(asyncio.CancelledError):
            await sampling
    await sampler.take("end")
    report.update(
        options={k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        load_ended_at_s=load_ended,
        stopped_early=run.stop.is_set(),
        drain={"live_sessions_left": live_left, "seconds": drain_s},
        manager_counters={
            "created": counters.get("session_manager_sessions_created_total"),
            "ended": counters.get("session_manager_sessions_ended_total"),
            "events": counters.get("session_manager_events_total"),
        },
        requests=tally.requests,
        outcomes=dict(sorted(tally.outcomes.items(), key=lambda kv: (-kv[1], kv[0]))),
        server_errors_5xx=tally.server_errors,
        first_5xx=tally.first_5xx,
        client_errors=tally.client_errors,
        sessions_completed=tally.completed,
        create_answer_status=dict(tally.create_statuses),
        delete_answer_status=dict(tally.delete_statuses),
        create_ok_ms=latency_ms(tally.create_ok),
        create_failed_ms=latency_ms(tally.create_failed),
        delete_ok_ms=latency_ms(tally.delete_ok),
        sessions_per_s=round(tally.completed / options.duration, 1),
        rooms_at_end=asdict(first),
        rooms_after_settle=asdict(second),
        rss=rss_verdict(sampler.samples, RSS_WARMUP),
        samples=[asdict(s) for s in sampler.samples],
    )


# --- output -----------------------------------------------------------------------------------


def render(report: dict[str, Any]) -> str:
    m, o = report["machine"], report["options"]
    lines = [
        f"machine: nproc={m['nproc']} cpu={m['cpu']!r} python={m['python']} "
        f"client loop={m['client_loop']}, {m['date']}",
        f"         {m['livekit_server']}, livekit-api {m['livekit_api']}, livekit "
        f"{m['livekit_rtc']}, aiohttp {m['aiohttp']}, manager at {m['manager_revision']}, "
        f"load average before {m['load_avg_1min_before']}",
        f"run:     {o['creators']} creators x {o['duration']:g}s, {o['services']} pong services, "
        f"timeout_secs {o['timeout_secs']}, hold {o['hold']:g}s"
        + (f", manager args {' '.join(o['manager_args'])}" if o["manager_args"] else "")
        + "; last creator done at "
        f"t={report['load_ended_at_s']}s"
        + (" (STOPPED EARLY: a child died)" if report["stopped_early"] else ""),
        "",
        f"requests           {report['requests']}",
    ]
    for outcome, count in report["outcomes"].items():
        lines.append(f"  {outcome:<40} {count}")
    create, failed, delete = (
        report["create_ok_ms"],
        report["create_failed_ms"],
        report["delete_ok_ms"],
    )
    lines += [
        f"5xx                {report['server_errors_5xx']}"
        + (f"   first: {report['first_5xx']}" if report["first_5xx"] else ""),
        f"client-side errors {report['client_errors']} (timeouts, refused connections)",
        f"sessions completed {report['sessions_completed']} (created Ready, then deleted) = "
        f"{report['sessions_per_s']}/s",
        f"create 200 ms      p50 {create['p50']}  p90 {create['p90']}  p99 {create['p99']}  "
        f"max {create['max']}  (n={create['n']})",
        f"create failed ms   p50 {failed['p50']}  p99 {failed['p99']}  (n={failed['n']})",
        f"delete 200 ms      p50 {delete['p50']}  p99 {delete['p99']}  max {delete['max']}",
        f"drain              {report['drain']['live_sessions_left']} live session(s) left after "
        f"{report['drain']['seconds']}s; the manager counted "
        f"{report['manager_counters']['created']} session(s) created, "
        f"{report['manager_counters']['ended']} ended, "
        f"{report['manager_counters']['events']} events recorded",
    ]
    for label, key in (("at end", "rooms_at_end"), ("after settle", "rooms_after_settle")):
        check = report[key]
        lines.append(
            f"leaked rooms {label:<13} {check['leaked']} (t={check['at']}s: LiveKit has "
            f"{check['rooms']} room(s), {check['owned_by_live_sessions']} owned by live sessions)"
        )
        if check["error"]:
            lines.append(f"    could not compare: {check['error']}")
        for example in check["leaked_examples"]:
            lines.append(f"    {example}")
    rss = report["rss"]
    if rss["from_t"] is None:
        lines.append(f"manager RSS        too few samples after t={RSS_WARMUP:g}s to judge")
    else:
        lines.append(
            f"manager RSS        first {rss['first_mib']} MiB; from t={rss['from_t']}s: "
            f"{rss['rss_at_from_mib']} -> max {rss['max_after_mib']} MiB "
            f"(growth {rss['growth_mib']} MiB), last {rss['last_mib']} MiB; "
            f"since t={rss['tail_from_t']}s {rss['tail_growth_mib']:+} MiB"
        )
    lines += [
        "",
        "samples (CPU% of one core since the previous sample: "
        + " / ".join(CPU_GROUPS)
        + "; live = the manager's live sessions, rooms = LiveKit's):",
    ]
    lines += ["  " + render_sample(Sample(**s)) for s in report["samples"]]
    lines.append("")
    for name in ("manager", "services", "livekit"):
        logs = report["logs"][name]
        lines.append(
            f"{name} log: {logs['levels'] or 'no warnings'}"
            + (f", {logs['tracebacks']} traceback(s)" if logs["tracebacks"] else "")
        )
        for message, count in logs["top"]:
            lines.append(f"    {count:>6}  {message}")
    lines.append(f"exit codes: {report['exit_codes']}")
    if report["logs"]["kept_in"]:
        lines.append(f"logs kept in {report['logs']['kept_in']}")
    return "\n".join(lines)


async def soak_described(options: Options) -> dict[str, Any]:
    """`soak`, its failures said in words (a bare TimeoutError's text is empty)."""
    try:
        return await soak(options)
    except (LiveKitServerError, RuntimeError, OSError) as exc:
        if str(exc):
            raise
        raise RuntimeError(repr(exc)) from exc


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    require_netns()
    return run_and_print(
        lambda: soak_described(options),
        render,
        as_json=options.as_json,
        program="soak",
        errors=(LiveKitServerError, RuntimeError, OSError),
    )


if __name__ == "__main__":
    sys.exit(main())
