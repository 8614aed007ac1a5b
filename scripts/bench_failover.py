"""Benchmark (issue 15): failover time, from the moment the process serving a session is killed
to the first pong a real LiveKit client hears from its replacement, over `--kills` kills (10),
as p50 and max, for three cases:

- sdk:      examples.pong as written (the SDK, its presence connection on), the manager at its
            defaults, `kill -9` of the serving instance;
- http:     examples.pong as a plain HTTP service at its fastest settings: no presence
            connection (`SESSION_MANAGER_PRESENCE=off`) and `--health-interval 0.5` in its
            registration metadata; `kill -9`;
- graceful: examples.pong as written, SIGTERM of the serving instance (it drains and leaves).

Run it inside the private network namespace (WebRTC ignores loopback candidates; as root):

    scripts/netns-run.sh .venv/bin/python scripts/bench_failover.py               # 10 kills each
    scripts/netns-run.sh .venv/bin/python scripts/bench_failover.py --kills 5 --cases http \\
        --health-interval 1 --unhealthy-after 2 --json

Each case runs its own manager (`python -m session_manager`, its managed livekit-server,
memory store, log level WARN, on free 127.0.0.1 ports; `--unhealthy-after` and
`--health-timeout`, when given, are its settings) and two pong instances of type PONG. One kill:

1. create a session for `type:PONG` (`wait_until_ready`), connect a `livekit.rtc.Room` with its
   token, ping the room every 100 ms until the serving instance answers, wait for `Active`;
2. kill the serving instance, and from then on note, polling the API every 50 ms, when the
   manager lists it Unhealthy (or draining) and when the session's slot names another
   instance; the measure is the first b"pong" the client hears from any other participant
   (a pong from a participant LiveKit has not announced yet counts: the served one was
   announced before the kill, so it can only be the replacement);
3. end the session, deregister the killed instance and start a new one under a new id, so each
   kill starts from two Healthy instances.

`--hang` sends SIGSTOP instead of SIGKILL in the sdk and http cases: a process that hangs
(or a host that is gone) refuses nothing, so each health check waits its timeout.

A kill that is not heard from within `--failover-timeout` (45 s) counts as an error. Every
process is stopped on the way out, also on Ctrl-C or SIGTERM. Results are reported, never
asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import sys
import tempfile
import time
from asyncio.subprocess import Process
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from bench_harness import (
    HOST,
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
    spawn,
    stop_process,
    tail,
    usable_cpus,
)
from bench_harness import (
    require_netns as shared_require_netns,
)
from livekit import rtc

CASES = ("sdk", "http", "graceful")
CASE_TEXT = {
    "sdk": "SDK service, defaults (presence on), kill -9",
    "http": "plain HTTP service (presence off), health_interval {interval:g} s, kill -9",
    "graceful": "SDK service, SIGTERM (drain and leave)",
}
SERVICE_TYPE = "PONG"
PING, PONG = b"ping", b"pong"
PING_INTERVAL = 0.1
POLL_INTERVAL = 0.05
START_TIMEOUT = 30.0
READY_TIMEOUT_SECS = 30
REQUEST_TIMEOUT = 45.0
FIRST_PONG_TIMEOUT = 20.0
CONNECT_TIMEOUT = 15.0
ACTIVE_TIMEOUT = 15.0
MANAGER_STOP_TIMEOUT = 30.0
PONG_STOP_TIMEOUT = 20.0
PLAIN_HTTP_ENV = {"SESSION_MANAGER_PRESENCE": "off"}


# --- options ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    kills: int
    cases: tuple[str, ...]
    health_interval: float
    health_timeout: float | None
    unhealthy_after: int | None
    failover_timeout: float
    hang: bool
    as_json: bool
    log_dir: Path | None


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description=(
            "Failover time (kill -> first pong from the replacement, heard by a real LiveKit "
            "client) for SDK services, plain HTTP services and a graceful leave. Run inside "
            "scripts/netns-run.sh."
        )
    )
    parser.add_argument("--kills", type=int, default=10, help="kills per case (default 10)")
    parser.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma-separated, from {', '.join(CASES)} (default: all)",
    )
    parser.add_argument(
        "--health-interval",
        type=float,
        default=0.5,
        help="the http case's metadata.health_interval, 0.5 to 3600 (default 0.5)",
    )
    parser.add_argument(
        "--health-timeout", type=float, help="the managers' health_timeout (default: theirs)"
    )
    parser.add_argument(
        "--unhealthy-after", type=int, help="the managers' unhealthy_after (default: theirs)"
    )
    parser.add_argument(
        "--failover-timeout",
        type=float,
        default=45.0,
        help="seconds a kill may take to be heard before it counts as an error (default 45)",
    )
    parser.add_argument(
        "--hang",
        action="store_true",
        help="SIGSTOP instead of kill -9 in the sdk and http cases: a process that hangs, as "
        "a lost host looks to the manager (each health check waits its timeout)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument("--log-dir", type=Path, help="keep the processes' logs here (new folder)")
    args = parser.parse_args(argv)
    cases = tuple(case for case in args.cases.split(",") if case)
    if not cases or any(case not in CASES for case in cases):
        parser.error(f"--cases: a comma-separated list from {', '.join(CASES)}")
    if not 1 <= args.kills <= 1000:
        parser.error("--kills must be from 1 to 1000")
    if not 0.5 <= args.health_interval <= 3600:
        parser.error("--health-interval must be from 0.5 to 3600")
    if args.failover_timeout <= 0:
        parser.error("--failover-timeout must be positive")
    return Options(
        kills=args.kills,
        cases=cases,
        health_interval=args.health_interval,
        health_timeout=args.health_timeout,
        unhealthy_after=args.unhealthy_after,
        failover_timeout=args.failover_timeout,
        hang=args.hang,
        as_json=args.json,
        log_dir=args.log_dir.resolve() if args.log_dir else None,
    )


def require_netns() -> None:
    shared_require_netns(
        "bench_failover", "scripts/netns-run.sh .venv/bin/python scripts/bench_failover.py"
    )


# --- the manager's API ------------------------------------------------------------------------


@dataclass
class Api:
    http: aiohttp.ClientSession
    base_url: str

    async def call(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[int, dict[str, Any]]:
        return await call_api(self.http, self.base_url, method, path, body)

    async def until(
        self, path: str, done: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        answer: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with suppress(aiohttp.ClientError, TimeoutError):
                status, answer = await self.call("GET", path)
                if status == 200 and done(answer):
                    return answer
            await asyncio.sleep(POLL_INTERVAL)
        raise RuntimeError(f"{what} not seen within {timeout} s; last: {json.dumps(answer)[:300]}")


# --- the processes ----------------------------------------------------------------------------


def running_manager(
    options: Options, port: int, workdir: Path
) -> AbstractAsyncContextManager[Process]:
    workdir.mkdir()
    return _running_manager(options, port, workdir)


@asynccontextmanager
async def _running_manager(options: Options, port: int, workdir: Path) -> AsyncIterator[Process]:
    command = [
        sys.executable,
        "-m",
        "session_manager",
        f"--host={HOST}",
        f"--port={port}",
        "--store=memory",
        f"--livekit-port={free_port()}",
        f"--livekit-rtc-tcp-port={free_port()}",
        f"--livekit-rtc-udp-port={free_port(socket.SOCK_DGRAM)}",
        "--log-level=WARN",
    ]
    if options.health_timeout is not None:
        command.append(f"--health-timeout={options.health_timeout}")
    if options.unhealthy_after is not None:
        command.append(f"--unhealthy-after={options.unhealthy_after}")
    async with running_process(
        "session-manager",
        command,
        cwd=workdir,  # so no config/session-manager.toml of the caller's is picked up
        env=child_env(),
        probe_url=f"http://{HOST}:{port}/health",
        start_timeout=START_TIMEOUT,
        stop_timeout=MANAGER_STOP_TIMEOUT,
        reap_children=True,  # its livekit-server, should it be killed first
    ) as process:
        yield process


@dataclass
class Pongs:
    """The pong instances of one case: started under new ids, stopped on the way out."""

    api: Api
    workdir: Path
    case: str
    health_interval: float
    started: int = 0
    live: dict[str, Process] = field(default_factory=dict)

    async def start(self) -> str:
        self.started += 1
        service_id = f"{self.case}-pong-{self.started}"
        command = [
            sys.executable,
            "-m",
            "examples.pong",
            f"--service-id={service_id}",
            f"--host={HOST}",
            f"--port={free_port()}",
            f"--manager-url={self.api.base_url}",
            f"--type={SERVICE_TYPE}",
            "--log-level=WARNING",
        ]
        env = child_env()
        if self.case == "http":
            command.append(f"--health-interval={self.health_interval}")
            env.update(PLAIN_HTTP_ENV)
        log_path = self.workdir / f"{service_id}.log"
        process = await spawn(command, cwd=self.workdir, env=env, log_path=log_path)
        self.live[service_id] = process
        try:
            await self.api.until(
                f"/api/v1/microservices/{service_id}",
                lambda view: view.get("status") == "Healthy",
                START_TIMEOUT,
                f"{service_id} registered and Healthy",
            )
        except RuntimeError:
            print(f"{service_id} log, last lines:\n{tail(log_path)}", file=sys.stderr)
            raise
        return service_id

    async def stop(self, service_id: str, *, hung: bool = False) -> None:
        process = self.live.pop(service_id, None)
        if process is not None:
            if hung:  # a stopped process would not act on SIGTERM
                with suppress(ProcessLookupError):
                    process.kill()
            await stop_process(process, service_id, PONG_STOP_TIMEOUT)
        await self.api.call("DELETE", f"/api/v1/microservices/{service_id}")

    async def stop_all(self) -> None:
        for service_id in list(self.live):
            process = self.live.pop(service_id)
            await stop_process(process, service_id, PONG_STOP_TIMEOUT)


# --- one kill ---------------------------------------------------------------------------------


@dataclass
class Sample:
    killed: str = ""
    replacement: str | None = None
    marks: dict[str, float] = field(default_factory=dict)  # what -> seconds after the kill
    error: str | None = None


class Listener:
    """A LiveKit client in the session's room: its pongs, with their senders."""

    def __init__(self) -> None:
        self.room = rtc.Room()
        self.pongs: asyncio.Queue[tuple[str | None, float]] = asyncio.Queue()
        self.room.on("data_received", self._received)

    def _received(self, packet: rtc.DataPacket) -> None:
        if packet.data == PONG:
            sender = packet.participant.identity if packet.participant is not None else None
            self.pongs.put_nowait((sender, time.perf_counter()))

    async def pong_from(self, accept: Callable[[str | None], bool], timeout: float) -> float:
        """The moment (perf_counter) of the first pong whose sender `accept` takes."""
        async with asyncio.timeout(timeout):
            while True:
                sender, at = await self.pongs.get()
                if accept(sender):
                    return at

    async def ping(self) -> None:
        while True:
            with suppress(Exception):  # a ping lost while the room reconnects
                await self.room.local_participant.publish_data(PING, reliable=True)
            await asyncio.sleep(PING_INTERVAL)


async def watch_manager(api: Api, session_id: str, killed: str, sample: Sample, t0: float) -> None:
    """Note when the manager stopped counting on the killed instance and moved the slot."""

    def mark(what: str) -> None:
        sample.marks.setdefault(what, round(time.perf_counter() - t0, 3))

    while True:
        with suppress(aiohttp.ClientError, TimeoutError):
            _, service = await api.call("GET", f"/api/v1/microservices/{killed}")
            if service.get("status") == "Unhealthy" or service.get("draining"):
                mark("unhealthy_s")
            _, view = await api.call("GET", f"/api/v1/sessions/{session_id}")
            slots = view.get("services") or []
            if slots and slots[0].get("service_id") != killed:
                mark("moved_s")
                if slots[0].get("state") == "joined":
                    mark("joined_s")
        await asyncio.sleep(POLL_INTERVAL)


async def one_kill(api: Api, case: str, timeout: float, kill: Callable[[str], None]) -> Sample:
    sample = Sample()
    body = {
        "user_identity": f"bench-failover-{case}",
        "required_services": [f"type:{SERVICE_TYPE}"],
        "wait_until_ready": True,
        "timeout_secs": READY_TIMEOUT_SECS,
    }
    status, created = await api.call("POST", "/api/v1/create-session", body)
    if status != 200 or created.get("status") != "Ready":
        sample.error = f"create-session: HTTP {status}: {json.dumps(created)[:200]}"
        return sample
    session_id = created["session_id"]
    listener = Listener()
    pinger: asyncio.Task[None] | None = None
    watcher: asyncio.Task[None] | None = None
    try:
        _, view = await api.call("GET", f"/api/v1/sessions/{session_id}")
        serving = sample.killed = view["services"][0]["service_id"]
        await asyncio.wait_for(
            listener.room.connect(created["livekit_url"], created["access_token"]),
            CONNECT_TIMEOUT,
        )
        pinger = asyncio.create_task(listener.ping(), name="pinger")
        await listener.pong_from(lambda sender: sender == serving, FIRST_PONG_TIMEOUT)
        await api.until(
            f"/api/v1/sessions/{session_id}",
            lambda view: view.get("status") == "Active",
            ACTIVE_TIMEOUT,
            "session Active",
        )
        while not listener.pongs.empty():  # only pongs after the kill count
            listener.pongs.get_nowait()
        t0 = time.perf_counter()
        kill(serving)
        watcher = asyncio.create_task(watch_manager(api, session_id, serving, sample, t0))
        try:
            heard = await listener.pong_from(lambda sender: sender != serving, timeout)
        except TimeoutError:
            sample.error = f"no pong from a replacement within {timeout} s"
            return sample
        sample.marks["pong_s"] = round(heard - t0, 3)
        _, view = await api.call("GET", f"/api/v1/sessions/{session_id}")
        sample.replacement = view["services"][0]["service_id"]
        return sample
    except (RuntimeError, TimeoutError, aiohttp.ClientError, KeyError, IndexError) as exc:
        sample.error = sample.error or f"{type(exc).__name__}: {exc}"
        return sample
    finally:
        for task in (pinger, watcher):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (pinger, watcher) if t), return_exceptions=True)
        with suppress(Exception):
            await listener.room.disconnect()
        await api.call("DELETE", f"/api/v1/sessions/{session_id}")


async def run_case(
    case: str, options: Options, workdir: Path, progress: Callable[[str], None]
) -> dict[str, Any]:
    port = free_port()
    samples: list[Sample] = []
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(running_manager(options, port, workdir / "manager"))
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        http = await stack.enter_async_context(aiohttp.ClientSession(timeout=timeout))
        api = Api(http, f"http://{HOST}:{port}")
        pongs = Pongs(api, workdir, case, options.health_interval)
        stack.push_async_callback(pongs.stop_all)
        await pongs.start()
        await pongs.start()
        signum = signal.SIGKILL
        if case == "graceful":
            signum = signal.SIGTERM
        elif options.hang:
            signum = signal.SIGSTOP

        def kill(service_id: str) -> None:
            with suppress(ProcessLookupError):
                pongs.live[service_id].send_signal(signum)

        for number in range(1, options.kills + 1):
            sample = await one_kill(api, case, options.failover_timeout, kill)
            samples.append(sample)
            heard = sample.marks.get("pong_s")
            progress(
                f"{case} {number}/{options.kills}: "
                + (f"{heard:.2f} s" if heard is not None else f"error: {sample.error}")
            )
            if sample.killed:
                await pongs.stop(sample.killed, hung=signum == signal.SIGSTOP)
            while len(pongs.live) < 2:
                await pongs.start()
    return summarize(case, options, samples)


# --- the report -------------------------------------------------------------------------------


def stats(values: list[float]) -> dict[str, float | int | None]:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0, "p50": None, "max": None}
    return {"n": len(ordered), "p50": round(percentile(ordered, 50), 2), "max": ordered[-1]}


def summarize(case: str, options: Options, samples: list[Sample]) -> dict[str, Any]:
    good = [s for s in samples if s.error is None]
    return {
        "case": case,
        "text": CASE_TEXT[case].format(interval=options.health_interval),
        "kills": len(samples),
        "errors": len(samples) - len(good),
        "first_error": next((s.error for s in samples if s.error), None),
        "pong_s": stats([s.marks["pong_s"] for s in good]),
        "unhealthy_s": stats([v for s in good if (v := s.marks.get("unhealthy_s")) is not None]),
        "moved_s": stats([v for s in good if (v := s.marks.get("moved_s")) is not None]),
        "samples": [
            {"killed": s.killed, "replacement": s.replacement, **s.marks, "error": s.error}
            for s in samples
        ],
    }


def machine_info() -> dict[str, Any]:
    return {
        "nproc": usable_cpus(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "client_loop": client_loop_name(),
        "livekit_rtc": package_version("livekit"),
        "manager_revision": manager_revision(),
        "load_avg_before": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


async def benchmark(options: Options) -> dict[str, Any]:
    require_netns()
    report: dict[str, Any] = {"machine": machine_info(), "settings": settings_text(options)}
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp:
        workdir = options.log_dir or Path(tmp)
        if options.log_dir is not None:
            workdir.mkdir(parents=True)
        results = []
        for case in options.cases:
            (workdir / case).mkdir()
            results.append(await run_case(case, options, workdir / case, progress_line))
        report["results"] = results
    report["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    return report


def settings_text(options: Options) -> str:
    parts = [f"health_interval (http case) {options.health_interval:g} s"]
    parts.append(
        "health_timeout "
        + (f"{options.health_timeout:g} s" if options.health_timeout else "default")
    )
    parts.append(f"unhealthy_after {options.unhealthy_after or 'default'}")
    if options.hang:
        parts.append("SIGSTOP instead of kill -9")
    return ", ".join(parts)


def progress_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _num(value: float | int | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        f"machine: nproc={machine['nproc']} cpu={machine['cpu']!r} python={machine['python']} "
        f"client loop={machine['client_loop']}, livekit {machine['livekit_rtc']}, "
        f"manager at {machine['manager_revision']}, {machine['date']}",
        f"load:    before {machine['load_avg_before']}, after {report['load_avg_after']}",
        f"settings: {report['settings']}",
        "",
        "failover: kill -> first pong from the replacement, heard by a LiveKit client (s)",
        f"{'case':<9} {'kills':>5} {'err':>3} {'p50':>6} {'max':>6}   "
        "unhealthy p50/max   moved p50/max   what",
    ]
    for row in report["results"]:
        pong, bad, moved = row["pong_s"], row["unhealthy_s"], row["moved_s"]
        lines.append(
            f"{row['case']:<9} {row['kills']:>5} {row['errors']:>3} {_num(pong['p50']):>6} "
            f"{_num(pong['max']):>6}   {_num(bad['p50']):>5} / {_num(bad['max']):<5}    "
            f"{_num(moved['p50']):>5} / {_num(moved['max']):<5}  {row['text']}"
        )
        if row["first_error"]:
            lines.append(f"          first error: {row['first_error']}")
    lines += [
        "",
        "unhealthy: the manager lists the killed instance Unhealthy (graceful: draining);",
        "moved: the session's slot names another instance (polled every 50 ms)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    return run_and_print(
        lambda: benchmark(options),
        render,
        as_json=options.as_json,
        program="bench_failover",
        errors=(RuntimeError, OSError),
    )


if __name__ == "__main__":
    sys.exit(main())
