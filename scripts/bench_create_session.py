"""Benchmark: create-session through the manager vs. CreateRoom + token straight on LiveKit.

One command starts everything it measures, on loopback only:

    .venv/bin/python scripts/bench_create_session.py --sessions 2000 --concurrency 16

1. one livekit-server (the project's binary, a config from `new_config`), on free 127.0.0.1
   ports, its webhooks pointed at the manager;
2. the manager as a separate process (`python -m session_manager`, SQLite store in a temp dir,
   log level WARN, LIVEKIT_URL/KEY/SECRET pointing at that livekit-server), waited for on /health;
3. in rounds, both paths, the first one alternating from round to round, each preceded by its own
   warm-up that is not counted:
   - direct:  CreateRoom (livekit-api) then an AccessToken minted here, the same work the
              manager does for a session without services;
   - manager: POST /api/v1/create-session {"user_identity": ..., "required_services": []}.
   Each is a closed loop of `--concurrency` workers; latency is per request (perf_counter),
   throughput is completed requests over the wall-clock time of the measured batch, and the CPU
   time each process (this client, livekit-server, the manager) used during the batch, from
   /proc, is reported per session: on a 2-core machine all three share the same cores.

`--manager-profile out.prof` runs the manager under cProfile, enabled (by SIGUSR1/SIGUSR2) only
during its measured batches; read it with `python -m pstats out.prof`.

Everything is stopped at the end, also on Ctrl-C or error: SIGTERM to the manager (it deletes
its rooms), then the livekit-server. Results are reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from asyncio.subprocess import Process
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
from livekit import api

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from session_manager.livekit.server import (  # noqa: E402
    LiveKitServerError,
    ManagedLiveKitConfig,
    find_binary,
    new_config,
)

HOST = "127.0.0.1"  # the only address anything here binds to or talks to
CREATE_PATH = "/api/v1/create-session"
HEALTH_PATH = "/health"
WEBHOOK_PATH = "/livekit/webhook"
# What the manager uses by default for a session without duration_limit, so both paths mint the
# same token: identity, grants, ttl and the two attributes.
ROOM_EMPTY_TIMEOUT = 300
TOKEN_TTL = timedelta(hours=6)
ROLE_ATTRIBUTE = "session_manager.role"
SESSION_ATTRIBUTE = "session_manager.session_id"
# The target on a 2-core machine; reported, never asserted.
P50_RATIO_TARGET = 1.3
SESSIONS_PER_S_TARGET = 300
REQUEST_TIMEOUT = 30.0
START_TIMEOUT = 30.0
# The manager ends every live session (one DeleteRoom each) before it exits.
MANAGER_STOP_TIMEOUT = 90.0
LIVEKIT_STOP_TIMEOUT = 15.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

Operation = Callable[[int], Awaitable[None]]


# --- options ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    sessions: int
    concurrency: int
    warmup: int
    rounds: int
    as_json: bool
    manager_profile: Path | None
    livekit_binary: str | None


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description=(
            "Concurrent create-session calls through the manager (no services) beside "
            "CreateRoom + token minting straight on LiveKit, measured in the same run. "
            "Loopback only."
        )
    )
    parser.add_argument(
        "--sessions", type=int, default=2000, help="measured sessions per path (default 2000)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=16, help="requests in flight (default 16)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=100,
        help="uncounted requests before each measured batch (default 100)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="split the sessions over this many rounds; the path that goes first alternates "
        "(default 4: direct, manager, manager, direct, ...), so bursts of other work on the "
        "machine and livekit-server's growing room count weigh on both paths alike",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument(
        "--manager-profile",
        type=Path,
        metavar="PATH",
        help="profile the manager with cProfile during its measured batches and write the "
        "stats here (read them with pstats; the profiler slows the manager down)",
    )
    parser.add_argument(
        "--livekit-binary", help="livekit-server to run (default: .cache/bin or PATH)"
    )
    args = parser.parse_args(argv)
    for name in ("sessions", "concurrency", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    if args.sessions < args.rounds:
        parser.error("--sessions must be at least --rounds")
    return Options(
        sessions=args.sessions,
        concurrency=args.concurrency,
        warmup=args.warmup,
        rounds=args.rounds,
        as_json=args.json,
        manager_profile=args.manager_profile.resolve() if args.manager_profile else None,
        livekit_binary=args.livekit_binary,
    )


# --- measuring --------------------------------------------------------------------------------


@dataclass
class Batch:
    """The outcome of one measured batch: per-request latencies (s) and the wall-clock time."""

    latencies: list[float] = field(default_factory=list)
    wall: float = 0.0
    errors: int = 0
    first_error: str | None = None
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds used by each process


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far, from /proc/<pid>/stat."""
    # Fields after the command name start at field 3 (state); utime and stime are 14 and 15.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_snapshot(pids: Mapping[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


async def wait_until_idle(pid: int, *, busy: float = 0.05, timeout: float = 30.0) -> None:
    """Wait until the process uses under `busy` of a core: LiveKit delivers webhooks with a lag,
    so the manager may still be working off the previous batch's room_started events."""
    window = 0.25
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = cpu_seconds(pid)
        await asyncio.sleep(window)
        if cpu_seconds(pid) - before < busy * window:
            return


async def run_closed_loop(operation: Operation, count: int, concurrency: int) -> Batch:
    """`count` calls of `operation(i)`, `concurrency` workers each starting the next one as soon
    as its previous call returns."""
    batch = Batch()
    indexes: Iterator[int] = iter(range(count))

    async def worker() -> None:
        for index in indexes:  # shared iterator: each index is taken by exactly one worker
            started = time.perf_counter()
            try:
                await operation(index)
            except Exception as exc:
                batch.errors += 1
                batch.first_error = batch.first_error or f"{type(exc).__name__}: {exc}"
                continue
            batch.latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
    batch.wall = time.perf_counter() - started
    return batch


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass(frozen=True)
class PathStats:
    path: str
    n: int
    concurrency: int
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    sessions_per_s: float
    cpu_ms_per_session: dict[str, float]
    first_error: str | None


def summarize(path: str, batches: list[Batch], concurrency: int) -> PathStats:
    latencies = sorted(lat for batch in batches for lat in batch.latencies)
    wall = sum(batch.wall for batch in batches)
    errors = sum(batch.errors for batch in batches)
    first_error = next((b.first_error for b in batches if b.first_error), None)
    cpu_ms = {
        name: sum(b.cpu[name] for b in batches) * 1000 / max(1, len(latencies))
        for name in batches[0].cpu
    }
    return PathStats(
        path=path,
        n=len(latencies),
        concurrency=concurrency,
        errors=errors,
        p50_ms=round(percentile(latencies, 50) * 1000, 3),
        p90_ms=round(percentile(latencies, 90) * 1000, 3),
        p99_ms=round(percentile(latencies, 99) * 1000, 3),
        max_ms=round(latencies[-1] * 1000, 3) if latencies else math.nan,
        mean_ms=round(sum(latencies) / len(latencies) * 1000, 3) if latencies else math.nan,
        sessions_per_s=round(len(latencies) / wall, 1) if wall > 0 else math.nan,
        cpu_ms_per_session={name: round(ms, 3) for name, ms in cpu_ms.items()},
        first_error=first_error,
    )


# --- the two paths ----------------------------------------------------------------------------


def mint_client_token(key: str, secret: str, *, identity: str, room: str, session: str) -> str:
    """The token the manager mints for a session's client (SessionActor._start)."""
    grants = api.VideoGrants(
        room_join=True, room=room, can_publish=True, can_subscribe=True, can_publish_data=True
    )
    return (
        api.AccessToken(key, secret)
        .with_identity(identity)
        .with_ttl(TOKEN_TTL)
        .with_grants(grants)
        .with_attributes({ROLE_ATTRIBUTE: "client", SESSION_ATTRIBUTE: session})
        .to_jwt()
    )


def direct_operation(lk: api.LiveKitAPI, config: ManagedLiveKitConfig, run_id: str) -> Operation:
    async def create(index: int) -> None:
        session_id = str(uuid.uuid4())
        room = f"bench-direct-{run_id}-{index}"
        identity = f"bench-user-{index}"
        metadata = json.dumps({"session_id": session_id, "user_identity": identity})
        await lk.room.create_room(
            api.CreateRoomRequest(name=room, metadata=metadata, empty_timeout=ROOM_EMPTY_TIMEOUT)
        )
        token = mint_client_token(
            config.api_key, config.api_secret, identity=identity, room=room, session=session_id
        )
        if not token:
            raise RuntimeError("empty token")

    return create


def manager_operation(http: aiohttp.ClientSession, base_url: str, run_id: str) -> Operation:
    url = base_url + CREATE_PATH

    async def create(index: int) -> None:
        body = json.dumps({"user_identity": f"bench-{run_id}-{index}", "required_services": []})
        async with http.post(
            url, data=body, headers={"Content-Type": "application/json"}
        ) as response:
            payload = await response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {payload[:200]!r}")
        answer = json.loads(payload)
        if answer.get("status") != "Ready" or not answer.get("access_token"):
            raise RuntimeError(f"unexpected answer: {answer}")

    return create


# --- processes --------------------------------------------------------------------------------


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def manager_env(config: ManagedLiveKitConfig) -> dict[str, str]:
    """Our environment without any manager or LiveKit setting, plus the LiveKit to use."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SESSION_MANAGER_", "LIVEKIT_"))
    }
    env.update(
        LIVEKIT_URL=config.url,
        LIVEKIT_API_KEY=config.api_key,
        LIVEKIT_API_SECRET=config.api_secret,
        PYTHONPATH=str(PROJECT_ROOT),
    )
    return env


# `python -m session_manager`, with a cProfile that SIGUSR1 starts and SIGUSR2 stops (and
# dumps, cumulatively, to the path given as first argument): the profile covers the manager's
# measured batches only, not its start, the warm-ups, the direct path or its shutdown.
PROFILED_MANAGER = """
import cProfile, signal, sys
from session_manager.cli import main
profile, path = cProfile.Profile(), sys.argv.pop(1)
def start(signum, frame): profile.enable()
def stop(signum, frame): profile.disable(); profile.dump_stats(path)
signal.signal(signal.SIGUSR1, start)
signal.signal(signal.SIGUSR2, stop)
sys.exit(main())
"""


def manager_command(port: int, data_dir: Path, profile: Path | None) -> list[str]:
    runner = ["-c", PROFILED_MANAGER, str(profile)] if profile else ["-m", "session_manager"]
    return [
        sys.executable,
        *runner,
        "--host",
        HOST,
        "--port",
        str(port),
        "--store",
        "sqlite",
        "--data-dir",
        str(data_dir),
        "--log-level",
        "WARN",
    ]


async def wait_until_up(process: Process, name: str, probe_url: str, timeout: float) -> None:
    """Poll `probe_url` until it answers 200; fail early if the process dies."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
        while time.monotonic() < deadline:
            if process.returncode is not None:
                raise RuntimeError(f"{name} exited with code {process.returncode} at start")
            with suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(probe_url) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{name} did not answer {probe_url} within {timeout}s")


async def stop_process(process: Process, name: str, timeout: float) -> None:
    """SIGTERM, wait, then SIGKILL."""
    if process.returncode is not None:
        return
    with suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        print(f"{name} ignored SIGTERM for {timeout}s; killing it", file=sys.stderr)
        with suppress(ProcessLookupError):
            process.kill()
        await process.wait()


def tail(path: Path, lines: int = 20) -> str:
    with suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


@asynccontextmanager
async def running_process(
    name: str,
    command: list[str],
    *,
    cwd: Path,
    env: dict[str, str] | None,
    probe_url: str,
    stop_timeout: float,
) -> AsyncIterator[Process]:
    """A child in its own session (a Ctrl-C reaches only us), its output in `cwd/<name>.log`,
    up once `probe_url` answers, stopped on the way out whatever happens."""
    log_path = cwd / f"{name}.log"
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            *command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        up = False
        try:
            await wait_until_up(process, name, probe_url, START_TIMEOUT)
            up = True
            yield process
        finally:
            if not up or process.returncode is not None:  # failed to start, or died early
                print(f"{name} log, last lines:\n{tail(log_path)}", file=sys.stderr)
            await stop_process(process, name, stop_timeout)


def running_livekit(
    config: ManagedLiveKitConfig, workdir: Path
) -> AbstractAsyncContextManager[Process]:
    """livekit-server with the config the manager would write for its own managed child."""
    workdir.mkdir()
    config_path = workdir / "livekit.yaml"
    config_path.write_text(config.render(), encoding="utf-8")
    config_path.chmod(0o600)
    return running_process(
        "livekit-server",
        [config.binary, "--config", str(config_path)],
        cwd=workdir,
        env=None,
        probe_url=f"http://{config.host}:{config.port}/",
        stop_timeout=LIVEKIT_STOP_TIMEOUT,
    )


def running_manager(
    config: ManagedLiveKitConfig, port: int, workdir: Path, profile: Path | None
) -> AbstractAsyncContextManager[Process]:
    workdir.mkdir()
    return running_process(
        "session-manager",
        manager_command(port, workdir / "data", profile),
        cwd=workdir,  # so no config/session-manager.toml of the caller's is picked up
        env=manager_env(config),
        probe_url=f"http://{HOST}:{port}{HEALTH_PATH}",
        stop_timeout=MANAGER_STOP_TIMEOUT,
    )


# --- the run ----------------------------------------------------------------------------------


def uvloop_version() -> str | None:
    """The version of uvloop if this client's loop uses it (see client_loop_factory)."""
    if client_loop_factory() is None:
        return None
    return _package_version("uvloop")


def manager_revision() -> str:
    """The commit the manager runs from, `+dirty` when session_manager/ has local changes."""
    git = ["git", "-C", str(PROJECT_ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown"
    status = subprocess.run(
        [*git, "status", "--porcelain", "--", "session_manager"], capture_output=True, text=True
    )
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def machine_info(livekit_binary: str, load_before: float) -> dict[str, Any]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    version = subprocess.run(
        [livekit_binary, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    cpu = ""
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": affinity or os.cpu_count(),
        "cpu": cpu or platform.processor(),
        "python": platform.python_version(),
        "client_loop": f"uvloop {uvloop}" if (uvloop := uvloop_version()) else "asyncio",
        "livekit_server": version,
        "livekit_api": _package_version("livekit-api"),
        "aiohttp": aiohttp.__version__,
        "manager_revision": manager_revision(),
        "load_avg_1min_before": round(load_before, 2),
    }


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


async def measure(
    name: str,
    make: Callable[[str], Operation],
    options: Options,
    count: int,
    pids: Mapping[str, int],
    profiled_pid: int | None = None,
) -> Batch:
    """One warm-up (not counted) and one measured batch of a path, with fresh room names.

    The manager's CPU (and its profile, when `profiled_pid` is given) is counted until it has
    worked off the batch's webhooks, which LiveKit delivers with a lag; the other processes'
    CPU until the last request is answered."""
    tag = uuid.uuid4().hex[:8]
    if options.warmup:
        warm = await run_closed_loop(make(f"{tag}w"), options.warmup, options.concurrency)
        if warm.errors:
            raise RuntimeError(f"{name} warm-up failed: {warm.first_error}")
    await wait_until_idle(pids["manager"])
    if profiled_pid is not None:
        os.kill(profiled_pid, signal.SIGUSR1)
        await asyncio.sleep(0.2)
    before = cpu_snapshot(pids)
    batch = await run_closed_loop(make(tag), count, options.concurrency)
    after = cpu_snapshot(pids)
    await wait_until_idle(pids["manager"])
    after["manager"] = cpu_seconds(pids["manager"])
    if profiled_pid is not None:
        os.kill(profiled_pid, signal.SIGUSR2)
    batch.cpu = {process: after[process] - before[process] for process in pids}
    return batch


def round_sizes(total: int, rounds: int) -> list[int]:
    base, extra = divmod(total, rounds)
    return [base + (1 if i < extra else 0) for i in range(rounds)]


async def benchmark(options: Options) -> dict[str, Any]:
    binary = find_binary(options.livekit_binary)
    load_before = os.getloadavg()[0]  # other work on the machine skews every figure
    manager_port = free_port()
    config = new_config(
        binary,
        host=HOST,
        port=free_port(),
        rtc_tcp_port=free_port(),
        rtc_udp_port=free_port(socket.SOCK_DGRAM),
        webhook_urls=(f"http://{HOST}:{manager_port}{WEBHOOK_PATH}",),
    )
    run_id = uuid.uuid4().hex[:8]
    batches: dict[str, list[Batch]] = {"direct": [], "manager": []}
    connector_limit = max(256, 2 * options.concurrency)
    with tempfile.TemporaryDirectory(prefix="bench-create-session-") as tmp:
        async with (
            running_livekit(config, Path(tmp) / "livekit") as livekit_process,
            running_manager(
                config, manager_port, Path(tmp) / "manager", options.manager_profile
            ) as manager_process,
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=connector_limit),
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
            ) as lk_http,
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=connector_limit),
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
            ) as manager_http,
        ):
            lk = api.LiveKitAPI(
                config.url, config.api_key, config.api_secret, session=lk_http, failover=False
            )
            base_url = f"http://{HOST}:{manager_port}"
            paths: dict[str, Callable[[str], Operation]] = {
                "direct": lambda tag: direct_operation(lk, config, f"{run_id}-{tag}"),
                "manager": lambda tag: manager_operation(manager_http, base_url, f"{run_id}-{tag}"),
            }
            pids = {
                "client": os.getpid(),
                "livekit": livekit_process.pid,
                "manager": manager_process.pid,
            }
            for number, count in enumerate(round_sizes(options.sessions, options.rounds)):
                order = ["direct", "manager"] if number % 2 == 0 else ["manager", "direct"]
                for name in order:
                    profiling = name == "manager" and options.manager_profile is not None
                    profiled = manager_process.pid if profiling else None
                    batch = await measure(name, paths[name], options, count, pids, profiled)
                    batches[name].append(batch)
            await lk.aclose()
    direct = summarize("direct", batches["direct"], options.concurrency)
    manager = summarize("manager", batches["manager"], options.concurrency)
    return {
        "machine": machine_info(binary, load_before),
        "sessions": options.sessions,
        "concurrency": options.concurrency,
        "warmup": options.warmup,
        "rounds": options.rounds,
        "manager_profiled": options.manager_profile is not None,
        "results": [asdict(direct), asdict(manager)],
        "p50_ratio_manager_over_direct": round(manager.p50_ms / direct.p50_ms, 3),
        "target": {
            "p50_ratio_max": P50_RATIO_TARGET,
            "p50_ratio_met": manager.p50_ms / direct.p50_ms <= P50_RATIO_TARGET,
            "manager_sessions_per_s_min": SESSIONS_PER_S_TARGET,
            "sessions_per_s_met": manager.sessions_per_s >= SESSIONS_PER_S_TARGET,
            "no_errors": manager.errors == 0 and direct.errors == 0,
        },
    }


# --- output -----------------------------------------------------------------------------------


def render_table(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        f"machine: nproc={machine['nproc']} cpu={machine['cpu']!r} python={machine['python']} "
        f"client loop={machine['client_loop']}",
        f"         {machine['livekit_server']}, livekit-api {machine['livekit_api']}, "
        f"aiohttp {machine['aiohttp']}, manager at {machine['manager_revision']}, "
        f"load average before {machine['load_avg_1min_before']}",
        f"run:     {report['sessions']} sessions per path in {report['rounds']} round(s), "
        f"first path alternating; warm-up {report['warmup']} per batch, not counted"
        + ("; manager under cProfile (slower)" if report["manager_profiled"] else ""),
        "",
        f"{'path':<8} {'n':>6} {'conc':>5} {'err':>4} {'p50 ms':>8} {'p90 ms':>8} "
        f"{'p99 ms':>8} {'max ms':>8} {'sessions/s':>11}   CPU ms per session: "
        "client + livekit + manager = total",
    ]
    for row in report["results"]:
        cpu = row["cpu_ms_per_session"]
        lines.append(
            f"{row['path']:<8} {row['n']:>6} {row['concurrency']:>5} {row['errors']:>4} "
            f"{row['p50_ms']:>8.2f} {row['p90_ms']:>8.2f} {row['p99_ms']:>8.2f} "
            f"{row['max_ms']:>8.2f} {row['sessions_per_s']:>11.1f}   "
            f"{cpu['client']:.2f} + {cpu['livekit']:.2f} + {cpu['manager']:.2f} "
            f"= {sum(cpu.values()):.2f}"
        )
        if row["first_error"]:
            lines.append(f"         first error: {row['first_error']}")
    target = report["target"]
    manager = report["results"][1]
    lines += [
        "",
        f"manager p50 / direct p50 = {report['p50_ratio_manager_over_direct']:.2f}   "
        f"(target <= {target['p50_ratio_max']}: {_verdict(target['p50_ratio_met'])})",
        f"manager sessions/s       = {manager['sessions_per_s']:.1f}   "
        f"(target >= {target['manager_sessions_per_s_min']}: "
        f"{_verdict(target['sessions_per_s_met'])})",
    ]
    if not target["no_errors"]:
        lines.append("some requests failed: see the err column")
    return "\n".join(lines)


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def client_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    with asyncio.Runner(loop_factory=client_loop_factory()) as runner:
        # SIGTERM, like Ctrl-C, cancels the run so every process still gets stopped in order.
        loop = runner.get_loop()
        main_task: list[asyncio.Task[Any]] = []
        loop.add_signal_handler(signal.SIGTERM, lambda: [t.cancel() for t in main_task])

        async def run() -> dict[str, Any]:
            current = asyncio.current_task()
            assert current is not None
            main_task.append(current)
            return await benchmark(options)

        try:
            report = runner.run(run())
        except (KeyboardInterrupt, asyncio.CancelledError):
            print("interrupted; everything started was stopped", file=sys.stderr)
            return 130
        except (LiveKitServerError, RuntimeError, OSError) as exc:
            print(f"bench_create_session: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(report, indent=2) if options.as_json else render_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
