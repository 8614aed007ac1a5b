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
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from asyncio.subprocess import Process
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
from bench_harness import (
    HOST,
    PROJECT_ROOT,
    clean_env,
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
from livekit import api
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(PROJECT_ROOT))

from session_manager.livekit.server import (
    LiveKitServerError,
    ManagedLiveKitConfig,
    find_binary,
    new_config,
)

CREATE_PATH = "/api/v1/create-session"
HEALTH_PATH = "/health"
WEBHOOK_PATH = "/livekit/webhook"
# Every room and session the run makes outlives it (the manager is given the same two timeouts):
# with LiveKit's 300 s, the pre-filled sessions and the first rounds' rooms all expired together
# in the middle of a long run, and that burst of deletes and webhooks stalled whichever path was
# being measured then.
ROOM_EMPTY_TIMEOUT = 3600
# What the manager uses by default for a session without duration_limit, so both paths mint the
# same token: identity, grants, ttl and the two attributes.
TOKEN_TTL = timedelta(hours=6)
ROLE_ATTRIBUTE = "session_manager.role"
SESSION_ATTRIBUTE = "session_manager.session_id"
# The target on a 2-core machine; reported, never asserted.
P50_RATIO_TARGET = 1.3
SESSIONS_PER_S_TARGET = 300
P99_RATIO_TARGET = 1.5  # issue 14: p99 within 1.5x the simplest token server's
DECAY_TARGET = 0.7  # issue 14: the slowest round keeps 70% of the fastest round's rate
REQUEST_TIMEOUT = 30.0
PREFILL_CONCURRENCY = 32
GC_STALL = 0.025  # a full GC pause longer than this shows in a create-session's p99
LOOP_STALL = 0.05  # a timer this late: every request in flight waited as long
WRITE_STALL = 0.025  # a store batch this slow holds back every create waiting on it
LIVEKIT_STALL = 0.25  # a CreateRoom this slow is LiveKit's share of the manager's p99
START_TIMEOUT = 30.0
# The manager ends every live session (one DeleteRoom each) before it exits.
MANAGER_STOP_TIMEOUT = 90.0
LIVEKIT_STOP_TIMEOUT = 15.0

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
    peer: bool
    live: int
    manager_settings: tuple[str, ...]
    slices: int
    together: bool


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
    parser.add_argument(
        "--slices",
        type=int,
        default=1,
        metavar="K",
        help="run each round's batch of a path as K slices, the paths taking turns slice by "
        "slice (default 1: one batch per path and round). livekit-server stalls now and then "
        "for a second or two (its garbage collector, see the README): with slices, every path "
        "is measured across the same stretch of the run, so a stall lands on each of them in "
        "proportion instead of on whichever path happened to be running",
    )
    parser.add_argument(
        "--together",
        action="store_true",
        help="run the paths at the same time, each with --concurrency requests in flight, "
        "instead of one after another: a LiveKit stall then lands on every path at once",
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
    parser.add_argument(
        "--peer",
        action="store_true",
        help="also measure a third path: the simplest token server a user could write instead "
        "(scripts/peer_token_server.py: aiohttp + livekit-api, CreateRoom and a token), as a "
        "process of its own like the manager",
    )
    parser.add_argument(
        "--live",
        type=int,
        default=0,
        metavar="N",
        help="first create N sessions through the manager (not measured) and keep them live, "
        "so every path is measured with N more rooms in LiveKit and the manager carrying N "
        "live sessions (default 0)",
    )
    parser.add_argument(
        "--manager-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a manager setting as an environment variable SESSION_MANAGER_<NAME>, e.g. "
        "store=memory (repeatable); max_live_sessions is raised to fit the run unless given",
    )
    args = parser.parse_args(argv)
    if args.live < 0:
        parser.error("--live must not be negative")
    for setting in args.manager_setting:
        if "=" not in setting:
            parser.error(f"--manager-setting {setting!r} is not NAME=VALUE")
    for name in ("sessions", "concurrency", "rounds", "slices"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    if args.together and (args.slices > 1 or args.manager_profile):
        parser.error("--together runs whole rounds at once: no --slices or --manager-profile")
    if args.sessions < args.rounds * args.slices:
        parser.error("--sessions must be at least --rounds times --slices")
    return Options(
        sessions=args.sessions,
        concurrency=args.concurrency,
        warmup=args.warmup,
        rounds=args.rounds,
        as_json=args.json,
        manager_profile=args.manager_profile.resolve() if args.manager_profile else None,
        livekit_binary=args.livekit_binary,
        peer=args.peer,
        live=args.live,
        manager_settings=tuple(args.manager_setting),
        slices=args.slices,
        together=args.together,
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
    # The manager's garbage-collector pauses during the batch (manager batches only): count,
    # the manager's stalls during the batch (`pause_summary`): full collections (gc), event
    # loop lag (lag) and store batch writes (write)
    pauses: dict[str, dict[str, float]] = field(default_factory=dict)


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


@dataclass(frozen=True)
class PathStats:
    path: str
    n: int
    concurrency: int
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float
    sessions_per_s: float
    round_sessions_per_s: list[float]  # each round's rate: a falling series is decay
    round_p99_ms: list[float]
    # the manager's stalls per round: full GC collections, loop lag, store writes
    round_pauses: list[dict[str, dict[str, float]]]
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
        p999_ms=round(percentile(latencies, 99.9) * 1000, 3),
        max_ms=round(latencies[-1] * 1000, 3) if latencies else math.nan,
        mean_ms=round(sum(latencies) / len(latencies) * 1000, 3) if latencies else math.nan,
        sessions_per_s=round(len(latencies) / wall, 1) if wall > 0 else math.nan,
        round_sessions_per_s=[
            round(len(b.latencies) / b.wall, 1) if b.wall > 0 else math.nan for b in batches
        ],
        round_p99_ms=[round(percentile(sorted(b.latencies), 99) * 1000, 1) for b in batches],
        round_pauses=[b.pauses for b in batches if b.pauses],
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


def manager_env(config: ManagedLiveKitConfig, settings: Mapping[str, str] = {}) -> dict[str, str]:
    """Our environment without any manager or LiveKit setting, plus the LiveKit to use and the
    manager settings given (as SESSION_MANAGER_<NAME>)."""
    env = clean_env()
    env.update(
        LIVEKIT_URL=config.url,
        LIVEKIT_API_KEY=config.api_key,
        LIVEKIT_API_SECRET=config.api_secret,
        PYTHONPATH=str(PROJECT_ROOT),
    )
    env.update({f"SESSION_MANAGER_{name.upper()}": value for name, value in settings.items()})
    return env


def manager_settings(options: Options) -> dict[str, str]:
    """The settings given with --manager-setting; max_live_sessions is raised to hold every
    session the run creates (pre-fill, warm-ups and measured ones), and no session or room
    expires during the run, unless given."""
    settings = dict(setting.split("=", 1) for setting in options.manager_settings)
    settings = {name.strip().lower(): value for name, value in settings.items()}
    needed = options.live + options.sessions + options.warmup * options.rounds + 1000
    settings.setdefault("max_live_sessions", str(max(10_000, needed)))
    settings.setdefault("client_join_timeout", str(ROOM_EMPTY_TIMEOUT))
    settings.setdefault("room_empty_timeout", str(ROOM_EMPTY_TIMEOUT))
    return settings


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
        start_timeout=START_TIMEOUT,
        stop_timeout=LIVEKIT_STOP_TIMEOUT,
    )


def running_manager(
    config: ManagedLiveKitConfig,
    port: int,
    workdir: Path,
    profile: Path | None,
    settings: Mapping[str, str],
) -> AbstractAsyncContextManager[Process]:
    workdir.mkdir()
    return running_process(
        "session-manager",
        manager_command(port, workdir / "data", profile),
        cwd=workdir,  # so no config/session-manager.toml of the caller's is picked up
        env=manager_env(config, settings),
        probe_url=f"http://{HOST}:{port}{HEALTH_PATH}",
        start_timeout=START_TIMEOUT,
        stop_timeout=MANAGER_STOP_TIMEOUT,
    )


def running_peer(
    config: ManagedLiveKitConfig, port: int, workdir: Path
) -> AbstractAsyncContextManager[Process]:
    """scripts/peer_token_server.py on `port`: the simplest token server, the tail's yardstick."""
    workdir.mkdir()
    return running_process(
        "peer-token-server",
        [
            sys.executable,
            str(PROJECT_ROOT / "scripts" / "peer_token_server.py"),
            "--port",
            str(port),
        ],
        cwd=workdir,
        env=manager_env(config),
        probe_url=f"http://{HOST}:{port}{HEALTH_PATH}",
        start_timeout=START_TIMEOUT,
        stop_timeout=LIVEKIT_STOP_TIMEOUT,
    )


async def prefill(operation: Operation, count: int) -> float:
    """`count` sessions created (not measured) and left live; returns the seconds it took."""
    started = time.perf_counter()
    batch = await run_closed_loop(operation, count, PREFILL_CONCURRENCY)
    if batch.errors:
        raise RuntimeError(f"pre-fill failed {batch.errors} times: {batch.first_error}")
    return time.perf_counter() - started


# --- the run ----------------------------------------------------------------------------------


def machine_info(livekit_binary: str, load_before: float) -> dict[str, Any]:
    version = subprocess.run(
        [livekit_binary, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "nproc": usable_cpus(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "client_loop": client_loop_name(),
        "livekit_server": version,
        "livekit_api": package_version("livekit-api"),
        "aiohttp": aiohttp.__version__,
        "manager_revision": manager_revision(),
        "load_avg_1min_before": round(load_before, 2),
    }


# (metric family, label filter, short name) read from the manager's /metrics around each batch
PAUSE_FAMILIES: tuple[tuple[str, dict[str, str], str], ...] = (
    ("session_manager_gc_pause_seconds", {"generation": "2"}, "gc"),
    ("session_manager_event_loop_lag_seconds", {}, "lag"),
    ("session_manager_store_write_seconds", {"outcome": "ok"}, "write"),
    (
        "session_manager_livekit_call_duration_seconds",
        {"method": "CreateRoom", "outcome": "ok"},
        "create_room",
    ),
    (
        "session_manager_livekit_call_duration_seconds",
        {"method": "ListRooms", "outcome": "ok"},
        "list_rooms",
    ),
)


async def manager_pauses(http: aiohttp.ClientSession, base_url: str) -> dict[str, float]:
    """The manager's stall histograms so far, from its /metrics, flattened: `gc_count`,
    `gc_sum`, `gc<=0.025` and so on for full collections, event-loop lag and store writes."""
    async with http.get(base_url + "/metrics") as response:
        text = await response.text()
    flat: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "session_manager_livekit_call_duration_seconds":
            for sample in family.samples:
                if sample.name.endswith("_count"):
                    method, outcome = sample.labels["method"], sample.labels["outcome"]
                    flat[f"calls:{method} {outcome}"] = sample.value
        for name, wanted, short in PAUSE_FAMILIES:
            if family.name != name.removesuffix("_seconds") and family.name != name:
                continue
            for sample in family.samples:
                if any(sample.labels.get(k) != v for k, v in wanted.items()):
                    continue
                if sample.name.endswith("_count"):
                    flat[f"{short}_count"] = sample.value
                elif sample.name.endswith("_sum"):
                    flat[f"{short}_sum"] = sample.value
                elif sample.name.endswith("_bucket"):
                    flat[f"{short}<={float(sample.labels['le']):g}"] = sample.value
    return flat


def pause_summary(delta: Mapping[str, float], short: str, over: float) -> dict[str, float]:
    """One histogram's change over a batch: how many, their total ms, how many took longer
    than `over` seconds, and the bucket bound the longest reached (ms; inf past the last)."""
    count = delta.get(f"{short}_count", 0.0)
    bounds = sorted(float(key.split("<=", 1)[1]) for key in delta if key.startswith(f"{short}<="))
    under = delta.get(f"{short}<={over:g}", 0.0)
    worst = next((b for b in bounds if delta[f"{short}<={b:g}"] >= count), math.inf)
    return {
        "count": count,
        "ms": round(delta.get(f"{short}_sum", 0.0) * 1000, 1),
        "over": count - under,
        "worst_le_ms": round(worst * 1000, 1) if count else 0.0,
    }


async def measure(
    name: str,
    make: Callable[[str], Operation],
    options: Options,
    count: int,
    pids: Mapping[str, int],
    profiled_pid: int | None = None,
    pause_reading: Callable[[], Awaitable[dict[str, float]]] | None = None,
    *,
    warm_up: bool = True,
) -> Batch:
    """One warm-up (not counted; unless `warm_up` is false) and one measured batch of a path,
    with fresh room names.

    The manager's CPU (and its profile, when `profiled_pid` is given) is counted until it has
    worked off the batch's webhooks, which LiveKit delivers with a lag; the other processes'
    CPU until the last request is answered."""
    tag = uuid.uuid4().hex[:8]
    if warm_up and options.warmup:
        warm = await run_closed_loop(make(f"{tag}w"), options.warmup, options.concurrency)
        if warm.errors:
            raise RuntimeError(f"{name} warm-up failed: {warm.first_error}")
    await wait_until_idle(pids["manager"])
    if profiled_pid is not None:
        os.kill(profiled_pid, signal.SIGUSR1)
        await asyncio.sleep(0.2)
    pauses_before = await pause_reading() if pause_reading else {}
    before = cpu_snapshot(pids)
    batch = await run_closed_loop(make(tag), count, options.concurrency)
    after = cpu_snapshot(pids)
    await wait_until_idle(pids["manager"])
    after["manager"] = cpu_seconds(pids["manager"])
    if profiled_pid is not None:
        os.kill(profiled_pid, signal.SIGUSR2)
    batch.cpu = {process: after[process] - before[process] for process in pids}
    if pause_reading:
        batch.pauses = stalls_between(pauses_before, await pause_reading())
    return batch


def stalls_between(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, Any]:
    """What the manager's stall histograms gained between two readings (`manager_pauses`)."""
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    return {
        "gc": pause_summary(delta, "gc", GC_STALL),
        "lag": pause_summary(delta, "lag", LOOP_STALL),
        "write": pause_summary(delta, "write", WRITE_STALL),
        "create_room": pause_summary(delta, "create_room", LIVEKIT_STALL),
        "list_rooms": pause_summary(delta, "list_rooms", LIVEKIT_STALL),
        "livekit_calls": {
            key.removeprefix("calls:"): count
            for key, count in sorted(delta.items())
            if key.startswith("calls:") and count
        },
    }


async def measure_together(
    makers: Mapping[str, Callable[[str], Operation]],
    options: Options,
    count: int,
    pids: Mapping[str, int],
    pause_reading: Callable[[], Awaitable[dict[str, float]]],
) -> dict[str, Batch]:
    """One warm-up and one measured batch of every path at once, each path with its own
    `concurrency` requests in flight: whatever stalls LiveKit stalls them all alike.

    CPU: a path's own server process (manager, peer) is its own; what the paths share (the
    client, LiveKit) is split evenly between them."""
    tag = uuid.uuid4().hex[:8]
    if options.warmup:
        warm = await asyncio.gather(
            *(
                run_closed_loop(make(f"{tag}w"), options.warmup, options.concurrency)
                for make in makers.values()
            )
        )
        if failed := next((batch for batch in warm if batch.errors), None):
            raise RuntimeError(f"warm-up failed: {failed.first_error}")
    await wait_until_idle(pids["manager"])
    pauses_before = await pause_reading()
    before = cpu_snapshot(pids)
    measured = await asyncio.gather(
        *(run_closed_loop(make(tag), count, options.concurrency) for make in makers.values())
    )
    after = cpu_snapshot(pids)
    await wait_until_idle(pids["manager"])
    after["manager"] = cpu_seconds(pids["manager"])
    used = {process: after[process] - before[process] for process in pids}
    stalls = stalls_between(pauses_before, await pause_reading())
    batches = dict(zip(makers, measured, strict=True))

    def share(process: str, path: str, seconds: float) -> float:
        if process in makers:  # a path's own server
            return seconds if process == path else 0.0
        return seconds / len(makers)

    for name, batch in batches.items():
        batch.cpu = {process: share(process, name, seconds) for process, seconds in used.items()}
        batch.pauses = stalls if name == "manager" else {}
    return batches


def round_sizes(total: int, rounds: int) -> list[int]:
    base, extra = divmod(total, rounds)
    return [base + (1 if i < extra else 0) for i in range(rounds)]


def joined(slices: list[Batch]) -> Batch:
    """The slices of one path's round as one batch: their requests, time, CPU and stalls."""
    whole = Batch(
        latencies=[latency for piece in slices for latency in piece.latencies],
        wall=sum(piece.wall for piece in slices),
        errors=sum(piece.errors for piece in slices),
        first_error=next((piece.first_error for piece in slices if piece.first_error), None),
        cpu={name: sum(piece.cpu[name] for piece in slices) for name in slices[0].cpu},
    )
    for piece in slices:
        for kind, summary in piece.pauses.items():
            total = whole.pauses.setdefault(kind, {})
            for key, value in summary.items():
                if key == "worst_le_ms":
                    total[key] = max(total.get(key, 0.0), value)
                else:
                    total[key] = total.get(key, 0.0) + value
    return whole


async def benchmark(options: Options) -> dict[str, Any]:
    binary = find_binary(options.livekit_binary)
    load_before = os.getloadavg()[0]  # other work on the machine skews every figure
    manager_port, peer_port = free_port(), free_port()
    config = new_config(
        binary,
        host=HOST,
        port=free_port(),
        rtc_tcp_port=free_port(),
        rtc_udp_port=free_port(socket.SOCK_DGRAM),
        webhook_urls=(f"http://{HOST}:{manager_port}{WEBHOOK_PATH}",),
    )
    run_id = uuid.uuid4().hex[:8]
    names = ["direct", "manager", *(["peer"] if options.peer else [])]
    batches: dict[str, list[Batch]] = {name: [] for name in names}
    connector_limit = max(256, 2 * options.concurrency)
    settings = manager_settings(options)
    prefill_seconds = 0.0
    with tempfile.TemporaryDirectory(prefix="bench-create-session-") as tmp:
        async with AsyncExitStack() as stack:
            livekit_process = await stack.enter_async_context(
                running_livekit(config, Path(tmp) / "livekit")
            )
            manager_process = await stack.enter_async_context(
                running_manager(
                    config, manager_port, Path(tmp) / "manager", options.manager_profile, settings
                )
            )
            pids = {
                "client": os.getpid(),
                "livekit": livekit_process.pid,
                "manager": manager_process.pid,
            }
            if options.peer:
                peer_process = await stack.enter_async_context(
                    running_peer(config, peer_port, Path(tmp) / "peer")
                )
                pids["peer"] = peer_process.pid
            http = {
                name: await stack.enter_async_context(
                    aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(limit=connector_limit),
                        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
                    )
                )
                for name in names
            }
            lk = api.LiveKitAPI(
                config.url,
                config.api_key,
                config.api_secret,
                session=http["direct"],
                failover=False,
            )
            stack.push_async_callback(lk.aclose)
            manager_url = f"http://{HOST}:{manager_port}"
            peer_url = f"http://{HOST}:{peer_port}"
            paths: dict[str, Callable[[str], Operation]] = {
                "direct": lambda tag: direct_operation(lk, config, f"{run_id}-{tag}"),
                "manager": lambda tag: manager_operation(
                    http["manager"], manager_url, f"{run_id}-{tag}"
                ),
                "peer": lambda tag: manager_operation(http["peer"], peer_url, f"{run_id}-{tag}"),
            }
            if options.live:
                prefill_seconds = await prefill(paths["manager"](f"live-{run_id}"), options.live)

            def read_manager() -> Awaitable[dict[str, float]]:
                return manager_pauses(http["manager"], manager_url)

            for number, count in enumerate(round_sizes(options.sessions, options.rounds)):
                # The path that goes first rotates from round to round.
                order = names[number % len(names) :] + names[: number % len(names)]
                if options.together:
                    together = await measure_together(
                        {name: paths[name] for name in order},
                        options,
                        count,
                        pids,
                        read_manager,
                    )
                    for name in order:
                        batches[name].append(together[name])
                    continue
                pieces: dict[str, list[Batch]] = {name: [] for name in order}
                for piece, part in enumerate(round_sizes(count, options.slices)):
                    for name in order:
                        profiling = name == "manager" and options.manager_profile is not None
                        profiled = manager_process.pid if profiling else None
                        reading = read_manager if name == "manager" else None
                        pieces[name].append(
                            await measure(
                                name,
                                paths[name],
                                options,
                                part,
                                pids,
                                profiled,
                                reading,
                                warm_up=piece == 0,
                            )
                        )
                for name in order:
                    batches[name].append(joined(pieces[name]))
    stats = {name: summarize(name, batches[name], options.concurrency) for name in names}
    manager, direct = stats["manager"], stats["direct"]
    report: dict[str, Any] = {
        "machine": machine_info(binary, load_before),
        "sessions": options.sessions,
        "concurrency": options.concurrency,
        "warmup": options.warmup,
        "rounds": options.rounds,
        "slices": options.slices,
        "together": options.together,
        "live": options.live,
        "prefill_seconds": round(prefill_seconds, 1),
        "manager_settings": settings,
        "manager_profiled": options.manager_profile is not None,
        "results": [asdict(stats[name]) for name in names],
        "p50_ratio_manager_over_direct": round(manager.p50_ms / direct.p50_ms, 3),
        "target": {
            "p50_ratio_max": P50_RATIO_TARGET,
            "p50_ratio_met": manager.p50_ms / direct.p50_ms <= P50_RATIO_TARGET,
            "manager_sessions_per_s_min": SESSIONS_PER_S_TARGET,
            "sessions_per_s_met": manager.sessions_per_s >= SESSIONS_PER_S_TARGET,
            "no_errors": all(stat.errors == 0 for stat in stats.values()),
        },
    }
    report["decay"] = {name: decay(stats[name]) for name in names}
    if options.peer:
        ratio = manager.p99_ms / stats["peer"].p99_ms
        report["p99_ratio_manager_over_peer"] = round(ratio, 3)
        report["target"]["p99_ratio_over_peer_max"] = P99_RATIO_TARGET
        report["target"]["p99_ratio_over_peer_met"] = ratio <= P99_RATIO_TARGET
        typical = {name: statistics.median(stats[name].round_p99_ms) for name in names}
        report["median_round_p99_ms"] = typical
        report["median_round_p99_ratio_manager_over_peer"] = round(
            typical["manager"] / typical["peer"], 3
        )
    report["manager_rounds_livekit_stalled"] = [
        paused["create_room"]["over"] >= len(batch.latencies) / 100
        for paused, batch in zip(manager.round_pauses, batches["manager"], strict=False)
    ]
    report["target"]["decay_min"] = DECAY_TARGET
    report["target"]["decay_met"] = report["decay"]["manager"] >= DECAY_TARGET
    return report


def decay(stats: PathStats) -> float:
    """The slowest round's rate over the fastest round's (1.0: no decay)."""
    rates = [rate for rate in stats.round_sessions_per_s if not math.isnan(rate)]
    return round(min(rates) / max(rates), 3) if rates else math.nan


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
        f"first path rotating"
        + (
            f", each path's round in {report['slices']} slices taking turns"
            if report["slices"] > 1
            else ""
        )
        + (
            ", the paths at the same time (shared CPU split evenly between them)"
            if report["together"]
            else ""
        )
        + f"; warm-up {report['warmup']} per path and round, not counted"
        + ("; manager under cProfile (slower)" if report["manager_profiled"] else ""),
    ]
    if report["live"]:
        lines.append(
            f"         {report['live']} sessions created first through the manager and kept "
            f"live ({report['prefill_seconds']} s)"
        )
    lines += [
        "",
        f"{'path':<8} {'n':>6} {'conc':>5} {'err':>4} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'p99.9 ms':>9} {'max ms':>8} {'sessions/s':>11}   CPU ms per session by process",
    ]
    for row in report["results"]:
        cpu = row["cpu_ms_per_session"]
        lines.append(
            f"{row['path']:<8} {row['n']:>6} {row['concurrency']:>5} {row['errors']:>4} "
            f"{row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} {row['p999_ms']:>9.2f} "
            f"{row['max_ms']:>8.2f} {row['sessions_per_s']:>11.1f}   "
            + " + ".join(f"{name} {ms:.2f}" for name, ms in cpu.items())
            + f" = {sum(cpu.values()):.2f}"
        )
        if row["first_error"]:
            lines.append(f"         first error: {row['first_error']}")
    lines += ["", "per round (sessions/s, p99 ms):"]
    for row in report["results"]:
        rounds = ", ".join(
            f"{rate:.0f}/{p99:.0f}"
            for rate, p99 in zip(row["round_sessions_per_s"], row["round_p99_ms"], strict=True)
        )
        lines.append(
            f"  {row['path']:<8} {rounds}   (slowest/fastest rate {report['decay'][row['path']]})"
        )
        for number, paused in enumerate(row["round_pauses"]):
            gc_, lag, write = paused["gc"], paused["lag"], paused["write"]
            create_room, list_rooms = paused["create_room"], paused["list_rooms"]
            lines.append(
                f"           round {number + 1}: full GC {gc_['count']:.0f} ({gc_['ms']:.0f} ms, "
                f"{gc_['over']:.0f} over {GC_STALL * 1000:.0f}); loop late "
                f"{lag['over']:.0f}x over {LOOP_STALL * 1000:.0f} ms (worst <= "
                f"{lag['worst_le_ms']:g}); store writes {write['count']:.0f} "
                f"({write['over']:.0f} over {WRITE_STALL * 1000:.0f} ms, worst <= "
                f"{write['worst_le_ms']:g}); LiveKit CreateRoom {create_room['over']:.0f}x over "
                f"{LIVEKIT_STALL * 1000:.0f} ms (worst <= {create_room['worst_le_ms']:g}); "
                f"ListRooms {list_rooms['count']:.0f} (worst <= {list_rooms['worst_le_ms']:g}); "
                "LiveKit calls: "
                + ", ".join(f"{call} {n:.0f}" for call, n in paused["livekit_calls"].items())
            )
    target = report["target"]
    manager = next(row for row in report["results"] if row["path"] == "manager")
    lines += [
        "",
        f"manager p50 / direct p50 = {report['p50_ratio_manager_over_direct']:.2f}   "
        f"(target <= {target['p50_ratio_max']}: {_verdict(target['p50_ratio_met'])})",
        f"manager sessions/s       = {manager['sessions_per_s']:.1f}   "
        f"(target >= {target['manager_sessions_per_s_min']}: "
        f"{_verdict(target['sessions_per_s_met'])})",
        f"manager decay            = {report['decay']['manager']:.2f}   "
        f"(slowest round over fastest, target >= {target['decay_min']}: "
        f"{_verdict(target['decay_met'])})",
    ]
    if "p99_ratio_manager_over_peer" in report:
        lines.append(
            f"manager p99 / peer p99   = {report['p99_ratio_manager_over_peer']:.2f}   "
            f"(target <= {target['p99_ratio_over_peer_max']}: "
            f"{_verdict(target['p99_ratio_over_peer_met'])})"
        )
    if "median_round_p99_ratio_manager_over_peer" in report:
        lines.append(
            "typical round (median of the rounds' p99): manager / peer = "
            f"{report['median_round_p99_ratio_manager_over_peer']:.2f}"
        )
    stalled = report["manager_rounds_livekit_stalled"]
    if any(stalled):
        lines.append(
            f"{sum(stalled)} of {len(stalled)} manager rounds had at least 1% of their "
            f"CreateRoom calls to LiveKit over {LIVEKIT_STALL * 1000:.0f} ms: their p99 is "
            "LiveKit's (rounds " + ", ".join(str(i + 1) for i, s in enumerate(stalled) if s) + ")"
        )
    if not target["no_errors"]:
        lines.append("some requests failed: see the err column")
    return "\n".join(lines)


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    return run_and_print(
        lambda: benchmark(options),
        render_table,
        as_json=options.as_json,
        program="bench_create_session",
        errors=(LiveKitServerError, RuntimeError, OSError),
    )


if __name__ == "__main__":
    sys.exit(main())
