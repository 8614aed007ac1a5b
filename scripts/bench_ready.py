"""Benchmark (issue 11): time from create-session to `Ready` for one HTTP service and for one
LiveKit agent, beside LiveKit's own floor for one participant joining, in one run.

Run it inside the private network namespace (WebRTC ignores loopback candidates; as root):

    scripts/netns-run.sh .venv/bin/python scripts/bench_ready.py            # 30 per path
    scripts/netns-run.sh .venv/bin/python scripts/bench_ready.py --sessions 50 --json

It starts, on free 127.0.0.1 ports:

1. one livekit-server (a config from `new_config`) whose webhooks go to the manager AND to a
   small aiohttp receiver in this process, which notes when each one arrives;
2. the manager (`python -m session_manager`, SQLite store, log level WARN) on that external
   LiveKit: `--livekit-url --livekit-api-key --livekit-api-secret`;
3. one `examples.pong` (the SDK, `--type PONG`), waited for until the manager lists it Healthy;
4. one `examples.agent_pong` livekit-agents worker (`agent_name="pong"`) with the same key pair,
   waited for until it has registered with LiveKit.

Then, one session at a time (never two at once), round-robin over the three paths so that other
work on the machine weighs on all of them alike, `--warmup` uncounted rounds and `--sessions`
measured ones:

- http:  POST /api/v1/create-session {"required_services": ["type:PONG"],
         "wait_until_ready": true}; the time is the HTTP round trip; the view's `ready_ms`
         (manager's created_at -> ready_at) is reported beside it. Then DELETE the session.
- agent: the same with ["agent:pong"].
- floor: no manager on the path: CreateRoom, then a `livekit.rtc.Room` in this process connects
         with a token of the kind the manager gives services (kind AGENT, same grants), until
         LiveKit's `participant_joined` webhook for it reaches the receiver. Then DeleteRoom.

Beside the totals, milestones (p50, ms from the start of each session) say where the time goes:
the manager's dispatch (its `dispatched_at`: join-room sent / agent dispatch created), for the
agent the worker's "received job request" log record, LiveKit's `participant_joined` webhook
reaching the receiver, the manager's `ready_at`, the answer. The manager's and the worker's
timestamps are on the same clock (the manager's to the millisecond).

Every process is stopped on the way out, also on Ctrl-C or SIGTERM: the agent worker (its whole
process group), the pong, the manager, then LiveKit. Results are reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from bench_harness import (
    HOST,
    PROJECT_ROOT,
    call_api,
    child_env,
    client_loop_name,
    cpu_model,
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
from livekit import api, rtc

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
WEBHOOK_PATH = "/livekit/webhook"  # the manager's
RECEIVER_PATH = "/webhook"  # ours
PONG_ID = "bench-ready-pong"
SERVICE_TYPE = "PONG"
AGENT_NAME = "pong"
PATHS = ("http", "agent", "floor")
REQUIREMENTS = {"http": f"type:{SERVICE_TYPE}", "agent": f"agent:{AGENT_NAME}"}

START_TIMEOUT = 30.0
WORKER_START_TIMEOUT = 90.0  # importing livekit-agents and registering with LiveKit
READY_TIMEOUT_SECS = 30  # the create's timeout_secs
REQUEST_TIMEOUT = READY_TIMEOUT_SECS + 15.0
WEBHOOK_TIMEOUT = 30.0
MANAGER_STOP_TIMEOUT = 60.0
SERVICE_STOP_TIMEOUT = 30.0
WORKER_STOP_TIMEOUT = 15.0
LIVEKIT_STOP_TIMEOUT = 15.0
FLOOR_ROOM_EMPTY_TIMEOUT = 60
TOKEN_TTL = timedelta(minutes=10)

# Milestones per path, in the order they happen; "total" is the path's measure.
MILESTONES = {
    "http": ("dispatched", "webhook", "ready_at", "total"),
    "agent": ("dispatched", "job_received", "webhook", "ready_at", "total"),
    "floor": ("room_created", "connected", "total"),
}
MILESTONE_TEXT = {
    "dispatched": "manager dispatched (join-room sent / agent dispatch created)",
    "job_received": "agent worker logged 'received job request' (its log's timestamp)",
    "room_created": "CreateRoom answered",
    "connected": "rtc.Room.connect returned",
    "webhook": "LiveKit's participant_joined webhook at the receiver",
    "ready_at": "manager's ready_at",
    "total": "the measure: create answered Ready / floor's participant_joined webhook",
}


# --- options ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    sessions: int
    warmup: int
    pause: float
    as_json: bool
    log_dir: Path | None
    livekit_binary: str | None


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description=(
            "Time from create-session to Ready for one HTTP service (examples.pong) and one "
            "LiveKit agent (examples.agent_pong), beside LiveKit's floor for one participant "
            "joining (CreateRoom -> participant_joined webhook). Run inside "
            "scripts/netns-run.sh."
        )
    )
    parser.add_argument(
        "--sessions", type=int, default=30, help="measured sessions per path (default 30)"
    )
    parser.add_argument(
        "--warmup", type=int, default=3, help="uncounted sessions per path first (default 3)"
    )
    parser.add_argument(
        "--pause",
        type=float,
        default=1.0,
        help="seconds between two sessions, so a service's leave and the agent worker's "
        "process pool settle before the next one (default 1.0)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument("--log-dir", type=Path, help="keep the processes' logs here (new folder)")
    parser.add_argument(
        "--livekit-binary", help="livekit-server to run (default: .cache/bin or PATH)"
    )
    args = parser.parse_args(argv)
    if args.sessions < 1:
        parser.error("--sessions must be at least 1")
    if args.warmup < 0 or args.pause < 0:
        parser.error("--warmup and --pause must not be negative")
    return Options(
        sessions=args.sessions,
        warmup=args.warmup,
        pause=args.pause,
        as_json=args.json,
        log_dir=args.log_dir.resolve() if args.log_dir else None,
        livekit_binary=args.livekit_binary,
    )


def require_netns() -> None:
    shared_require_netns(
        "bench_ready", "scripts/netns-run.sh .venv/bin/python scripts/bench_ready.py"
    )


# --- LiveKit's webhooks, as they arrive -------------------------------------------------------


class WebhookLog:
    """When (perf_counter) each room's first `participant_joined` webhook arrived; waiters."""

    def __init__(self) -> None:
        self.joined: dict[str, float] = {}
        self._waiters: dict[str, asyncio.Future[float]] = {}
        self.received = 0

    async def handle(self, request: web.Request) -> web.Response:
        arrived = time.perf_counter()
        body = await request.read()
        self.received += 1
        with suppress(ValueError, AttributeError):
            event = json.loads(body)
            room = event.get("room", {}).get("name")
            if event.get("event") == "participant_joined" and isinstance(room, str):
                self.joined.setdefault(room, arrived)
                waiter = self._waiters.pop(room, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(self.joined[room])
        return web.Response(text="ok")

    async def wait_joined(self, room: str, timeout: float) -> float:
        if room in self.joined:
            return self.joined[room]
        waiter = self._waiters.setdefault(room, asyncio.get_running_loop().create_future())
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        finally:
            self._waiters.pop(room, None)


@asynccontextmanager
async def webhook_receiver(log: WebhookLog, port: int) -> AsyncIterator[None]:
    app = web.Application()
    app.router.add_post(RECEIVER_PATH, log.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, HOST, port).start()
        yield
    finally:
        await runner.cleanup()


# --- one session per path ---------------------------------------------------------------------


@dataclass
class Sample:
    path: str
    ms: dict[str, float | None] = field(default_factory=dict)  # milestone -> ms from start
    view_ready_ms: float | None = None
    error: str | None = None
    room: str | None = None
    start_wall: float = 0.0


def ms_since(start: float, moment: float | None) -> float | None:
    return None if moment is None else round((moment - start) * 1000, 1)


def wall_ms(start_wall: float, stamp: object) -> float | None:
    """A manager timestamp (RFC 3339, ms) as ms after `start_wall` (time.time())."""
    if not isinstance(stamp, str) or not stamp:
        return None
    moment = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    return round((moment - start_wall) * 1000, 1)


@dataclass
class Bench:
    http: aiohttp.ClientSession
    base_url: str
    lk: api.LiveKitAPI
    config: ManagedLiveKitConfig
    webhooks: WebhookLog
    run_id: str

    async def call(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[int, dict[str, Any]]:
        return await call_api(self.http, self.base_url, method, path, body)

    async def manager_session(self, path: str, index: str) -> Sample:
        sample = Sample(path)
        body = {
            "user_identity": f"bench-ready-{self.run_id}-{path}-{index}",
            "required_services": [REQUIREMENTS[path]],
            "wait_until_ready": True,
            "timeout_secs": READY_TIMEOUT_SECS,
        }
        start_wall, start = time.time(), time.perf_counter()
        status, created = await self.call("POST", CREATE_PATH, body)
        answered = time.perf_counter()
        session_id = created.get("session_id")
        try:
            if status != 200 or created.get("status") != "Ready":
                sample.error = f"HTTP {status}: {json.dumps(created)[:200]}"
                return sample
            _, view = await self.call("GET", f"{SESSIONS_PATH}/{session_id}")
            (slot,) = view["services"]
            sample.room, sample.start_wall = str(view["room_name"]), start_wall
            joined = self.webhooks.joined.get(sample.room)
            sample.ms = {
                "dispatched": wall_ms(start_wall, slot.get("dispatched_at")),
                "webhook": ms_since(start, joined),
                "ready_at": wall_ms(start_wall, view.get("ready_at")),
                "total": ms_since(start, answered),
            }
            sample.view_ready_ms = view.get("ready_ms")
            return sample
        finally:
            if isinstance(session_id, str):
                status, ended = await self.call("DELETE", f"{SESSIONS_PATH}/{session_id}")
                if status != 200 and sample.error is None:
                    sample.error = f"DELETE: HTTP {status}: {json.dumps(ended)[:200]}"

    async def floor_session(self, index: str) -> Sample:
        sample = Sample("floor")
        room_name = f"bench-floor-{self.run_id}-{index}"
        identity = f"floor-{index}"
        token = (
            api.AccessToken(self.config.api_key, self.config.api_secret)
            .with_identity(identity)
            .with_ttl(TOKEN_TTL)
            .with_kind("agent")
            .with_grants(
                api.VideoGrants(
                    room_join=True,
                    room=room_name,
                    can_publish=True,
                    can_subscribe=True,
                    can_publish_data=True,
                )
            )
            .to_jwt()
        )
        room = rtc.Room()
        start = time.perf_counter()
        created = False
        try:
            await self.lk.room.create_room(
                api.CreateRoomRequest(name=room_name, empty_timeout=FLOOR_ROOM_EMPTY_TIMEOUT)
            )
            created = True
            room_created = time.perf_counter()
            await room.connect(self.config.url, token)
            connected = time.perf_counter()
            joined = await self.webhooks.wait_joined(room_name, WEBHOOK_TIMEOUT)
            sample.ms = {
                "room_created": ms_since(start, room_created),
                "connected": ms_since(start, connected),
                "total": ms_since(start, joined),
            }
        except Exception as exc:
            sample.error = f"{type(exc).__name__}: {exc}"
        finally:
            with suppress(Exception):
                await room.disconnect()
            if created:
                await self.lk.room.delete_room(api.DeleteRoomRequest(room=room_name))
        return sample

    async def one(self, path: str, index: str) -> Sample:
        if path == "floor":
            return await self.floor_session(index)
        return await self.manager_session(path, index)


# --- processes --------------------------------------------------------------------------------


def running_livekit(
    config: ManagedLiveKitConfig, workdir: Path
) -> AbstractAsyncContextManager[asyncio.subprocess.Process]:
    return shared_running_livekit(
        config, workdir, start_timeout=START_TIMEOUT, stop_timeout=LIVEKIT_STOP_TIMEOUT
    )


def running_manager(
    config: ManagedLiveKitConfig, port: int, workdir: Path
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
        "--livekit-url",
        config.url,
        "--livekit-api-key",
        config.api_key,
        "--livekit-api-secret",
        config.api_secret,
    ]
    return running_process(
        "session-manager",
        command,
        cwd=workdir,  # so no config/session-manager.toml of the caller's is picked up
        env=child_env(),
        probe_url=f"http://{HOST}:{port}{HEALTH_PATH}",
        start_timeout=START_TIMEOUT,
        stop_timeout=MANAGER_STOP_TIMEOUT,
    )


def running_pong(
    port: int, manager_url: str, workdir: Path
) -> AbstractAsyncContextManager[asyncio.subprocess.Process]:
    workdir.mkdir()
    command = [
        sys.executable,
        "-m",
        "examples.pong",
        "--service-id",
        PONG_ID,
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
        PONG_ID,
        command,
        cwd=workdir,
        env=child_env(),
        probe_url=f"http://{HOST}:{port}{HEALTH_PATH}",
        start_timeout=START_TIMEOUT,
        stop_timeout=SERVICE_STOP_TIMEOUT,
    )


def running_agent_worker(
    config: ManagedLiveKitConfig, workdir: Path
) -> AbstractAsyncContextManager[asyncio.subprocess.Process]:
    """examples.agent_pong, up once its log says it registered with LiveKit; on the way out its
    whole process group (the worker and its job processes) is killed after it was asked to stop.
    """
    workdir.mkdir()
    return _agent_worker(config, workdir)


@asynccontextmanager
async def _agent_worker(
    config: ManagedLiveKitConfig, workdir: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    name = "agent-pong"
    log_path = workdir / f"{name}.log"
    env = child_env(config)
    env.update(AGENT_PONG_NAME=AGENT_NAME, AGENT_PONG_HEALTH_PORT=str(free_port()))

    async def registered() -> bool:
        with suppress(OSError):
            return "registered worker" in log_path.read_text(errors="replace")
        return False

    process: asyncio.subprocess.Process | None = None
    try:
        async with running_process(
            name,
            [sys.executable, "-m", "examples.agent_pong", "start"],
            cwd=workdir,
            env=env,
            probe=(registered, "'registered worker' in its log"),
            start_timeout=WORKER_START_TIMEOUT,
            stop_timeout=WORKER_STOP_TIMEOUT,
            probe_interval=0.2,
            reap_children=True,
        ) as process:
            yield process
    finally:
        if process is not None:  # spawn made it the leader of its own process group
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)


def add_job_times(samples: list[Sample], worker_log: Path) -> None:
    """The agent path's `job_received` milestone, from the worker's JSON log records
    "received job request" (each names the room; timestamps on the same clock)."""
    received: dict[str, str] = {}
    with suppress(OSError):
        for line in worker_log.read_text(errors="replace").splitlines():
            with suppress(ValueError, AttributeError):
                record = json.loads(line)
                if record.get("message") == "received job request":
                    received.setdefault(str(record.get("room")), str(record.get("timestamp")))
    for sample in samples:
        if sample.room is not None and sample.ms:
            sample.ms["job_received"] = wall_ms(sample.start_wall, received.get(sample.room))


async def wait_for_pong(bench: Bench) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        with suppress(aiohttp.ClientError, TimeoutError):
            status, body = await bench.call("GET", f"{SERVICES_PATH}/{PONG_ID}")
            if status == 200 and body.get("status") == "Healthy":
                return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{PONG_ID} not registered Healthy within {START_TIMEOUT}s")


# --- the run ----------------------------------------------------------------------------------


def machine_info(livekit_binary: str, load_before: tuple[float, float, float]) -> dict[str, Any]:
    livekit_version = subprocess.run(
        [livekit_binary, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "nproc": usable_cpus(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "client_loop": client_loop_name(),
        "livekit_server": livekit_version,
        "livekit_rtc": package_version("livekit"),
        "livekit_agents": package_version("livekit-agents"),
        "manager_revision": manager_revision(),
        "load_avg_before": [round(x, 2) for x in load_before],
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def stats(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0, "p50": None, "p90": None, "max": None}
    return {
        "n": len(ordered),
        "p50": round(percentile(ordered, 50), 1),
        "p90": round(percentile(ordered, 90), 1),
        "max": round(ordered[-1], 1),
    }


def summarize(path: str, samples: list[Sample]) -> dict[str, Any]:
    good = [s for s in samples if s.error is None]
    milestones = {
        name: stats([v for s in good if (v := s.ms.get(name)) is not None])
        for name in MILESTONES[path]
    }
    summary: dict[str, Any] = {
        "path": path,
        "errors": len(samples) - len(good),
        "first_error": next((s.error for s in samples if s.error), None),
        "total_ms": milestones["total"],
        "milestones_ms": milestones,
    }
    if path != "floor":
        summary["view_ready_ms"] = stats([s.view_ready_ms for s in good if s.view_ready_ms])
    return summary


async def run_rounds(
    bench: Bench, options: Options, progress: Callable[[str], None]
) -> dict[str, list[Sample]]:
    samples: dict[str, list[Sample]] = {path: [] for path in PATHS}
    for number in range(options.warmup + options.sessions):
        warm = number < options.warmup
        for path in PATHS:
            sample = await bench.one(path, f"{'w' if warm else ''}{number}")
            if not warm:
                samples[path].append(sample)
            elif sample.error:
                progress(f"warm-up {path} failed: {sample.error}")
            await asyncio.sleep(options.pause)
        if not warm and (number - options.warmup + 1) % 10 == 0:
            progress(f"{number - options.warmup + 1}/{options.sessions} rounds")
    return samples


def progress_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def benchmark(options: Options) -> dict[str, Any]:
    require_netns()
    binary = find_binary(options.livekit_binary)
    load_before = os.getloadavg()
    manager_port, receiver_port = free_port(), free_port()
    config = new_config(
        binary,
        host=HOST,
        port=free_port(),
        rtc_tcp_port=free_port(),
        rtc_udp_port=free_port(socket.SOCK_DGRAM),
        webhook_urls=(
            f"http://{HOST}:{manager_port}{WEBHOOK_PATH}",
            f"http://{HOST}:{receiver_port}{RECEIVER_PATH}",
        ),
    )
    base_url = f"http://{HOST}:{manager_port}"
    report: dict[str, Any] = {"machine": machine_info(binary, load_before)}
    webhooks = WebhookLog()
    with tempfile.TemporaryDirectory(prefix="bench-ready-") as tmp:
        workdir = options.log_dir or Path(tmp)
        if options.log_dir is not None:
            workdir.mkdir(parents=True)
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(webhook_receiver(webhooks, receiver_port))
            await stack.enter_async_context(running_livekit(config, workdir / "livekit"))
            await stack.enter_async_context(
                running_manager(config, manager_port, workdir / "manager")
            )
            await stack.enter_async_context(running_pong(free_port(), base_url, workdir / "pong"))
            await stack.enter_async_context(running_agent_worker(config, workdir / "agent"))
            timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
            http = await stack.enter_async_context(aiohttp.ClientSession(timeout=timeout))
            lk_http = await stack.enter_async_context(aiohttp.ClientSession(timeout=timeout))
            lk = api.LiveKitAPI(
                config.url, config.api_key, config.api_secret, session=lk_http, failover=False
            )
            bench = Bench(http, base_url, lk, config, webhooks, uuid.uuid4().hex[:8])
            await wait_for_pong(bench)
            progress_line("all up; measuring")
            samples = await run_rounds(bench, options, progress_line)
            add_job_times(samples["agent"], workdir / "agent" / "agent-pong.log")
            await lk.aclose()
    report["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    report["sessions"] = options.sessions
    report["warmup"] = options.warmup
    report["pause_s"] = options.pause
    report["results"] = [summarize(path, samples[path]) for path in PATHS]
    return report


# --- output -----------------------------------------------------------------------------------


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def render(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        f"machine: nproc={machine['nproc']} cpu={machine['cpu']!r} python={machine['python']} "
        f"client loop={machine['client_loop']}, {machine['date']}",
        f"         {machine['livekit_server']}, livekit {machine['livekit_rtc']}, "
        f"livekit-agents {machine['livekit_agents']}, manager at {machine['manager_revision']}",
        f"load:    before {machine['load_avg_before']}, after {report['load_avg_after']}",
        f"run:     {report['sessions']} sessions per path, one at a time, round-robin "
        f"http/agent/floor, {report['warmup']} warm-up rounds, {report['pause_s']} s pause",
        "",
        f"{'path':<6} {'n':>3} {'err':>3} {'p50 ms':>7} {'p90 ms':>7} {'max ms':>7}   "
        "view ready_ms p50 / p90 / max",
    ]
    for row in report["results"]:
        total = row["total_ms"]
        view = row.get("view_ready_ms")
        view_text = (
            f"{_num(view['p50'])} / {_num(view['p90'])} / {_num(view['max'])}" if view else "-"
        )
        lines.append(
            f"{row['path']:<6} {total['n']:>3} {row['errors']:>3} {_num(total['p50']):>7} "
            f"{_num(total['p90']):>7} {_num(total['max']):>7}   {view_text}"
        )
        if row["first_error"]:
            lines.append(f"       first error: {row['first_error']}")
    lines += ["", "milestones, p50 (p90) ms from the start of the session:"]
    for row in report["results"]:
        parts = [
            f"{name} {_num(m['p50'])} ({_num(m['p90'])})"
            for name, m in row["milestones_ms"].items()
        ]
        lines.append(f"  {row['path']:<6} " + " -> ".join(parts))
    lines += [""] + [f"  {name}: {text}" for name, text in MILESTONE_TEXT.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    return run_and_print(
        lambda: benchmark(options),
        render,
        as_json=options.as_json,
        program="bench_ready",
        errors=(LiveKitServerError, RuntimeError, OSError),
    )


if __name__ == "__main__":
    sys.exit(main())
