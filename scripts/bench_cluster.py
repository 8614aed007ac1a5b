"""Benchmark: create-session on one manager process (SQLite store), one (Redis store) and two on
one Redis, beside CreateRoom + token straight on LiveKit, all measured in the same run.

One command starts everything it measures, on 127.0.0.1 only:

    .venv/bin/python scripts/bench_cluster.py --sessions 2000 --concurrency 16

1. one livekit-server (the project's binary, a config from `new_config`) on free ports, its
   webhooks posted to one manager URL (port A);
2. one redis-server (Debian's) on a free port, in a temp folder of its own, `--save ""
   --appendonly no`;
3. in rounds, four paths, the first of them rotating from round to round (with 4 rounds each
   path goes first, second, third and last once), each batch preceded by a warm-up of its own
   that is not counted. `--concurrency` requests are in flight on every path, in all:
   - direct:   CreateRoom (livekit-api) then the client token minted here, as in
               bench_create_session.py; a SQLite manager listens on port A only to receive
               LiveKit's webhooks, as the manager does there during the direct batches;
   - sqlite:   one manager, `--store sqlite` (bench_create_session.py's manager path);
   - redis:    one manager, `--store redis`;
   - redis-x2: two managers on that Redis (ports A and B), the requests alternating between
               them (round robin, as a load balancer in front of them would spread them).
   Latency, throughput and CPU per session are measured as in bench_create_session.py, with
   Redis's CPU beside the others, and the cores the whole machine was busy during each batch
   (/proc/stat), so that other work on the machine shows.

Why the managers are started for each batch and stopped after it: LiveKit's webhook URLs are
set when it starts, so only the managers of the path being measured may listen on them, and no
idle manager renews leases or handles webhooks during another path's batch. Nothing piles up
from batch to batch either: after each batch, every session it created is deleted through the
manager process that created it (DELETE /api/v1/sessions/{id}), every room LiveKit still has is
deleted (the direct path's; on a manager path, any the manager left, which is reported), the
managers are stopped, and Redis is emptied (FLUSHALL). Every batch starts on an empty LiveKit,
an empty Redis and a new SQLite folder; the managers of each batch have a `deployment` of their
own. On redis-x2, LiveKit posts every webhook to process A, as to the one URL of a load
balancer: the room_started that each create causes is dropped unread by the manager (it acts on
no such event), so it costs every path the same one request per session, and the room_finished
webhooks of the deletions reach B's sessions through Redis.

Everything is stopped at the end, also on Ctrl-C or error: the managers, then Redis and the
livekit-server. Results are reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import uuid
from asyncio.subprocess import Process
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from bench_create_session import (
    CREATE_PATH,
    HEALTH_PATH,
    MANAGER_STOP_TIMEOUT,
    REQUEST_TIMEOUT,
    START_TIMEOUT,
    WEBHOOK_PATH,
    Batch,
    Operation,
    cpu_snapshot,
    direct_operation,
    machine_info,
    round_sizes,
    run_closed_loop,
    running_livekit,
    summarize,
    wait_until_idle,
)
from bench_harness import (
    HOST,
    PROJECT_ROOT,
    clean_env,
    free_port,
    machine_busy_seconds,
    run_and_print,
    running_process,
)
from livekit import api
from redis.asyncio import Redis
from redis.exceptions import RedisError

sys.path.insert(0, str(PROJECT_ROOT))

from session_manager.livekit.server import (
    LiveKitServerError,
    ManagedLiveKitConfig,
    find_binary,
    new_config,
)

SESSIONS_PATH = "/api/v1/sessions"
REDIS_STOP_TIMEOUT = 10.0
# The target: two processes reach at least this times one process's rate (on Redis),
# or LiveKit's own CreateRoom rate if that is lower. Reported, never asserted.
SCALE_TARGET = 1.5


@dataclass(frozen=True)
class PathSpec:
    name: str
    store: str  # the store of the path's manager processes
    processes: int  # manager processes, each on its own port
    via_manager: bool  # False: CreateRoom + token straight on LiveKit
    label: str


PATHS: dict[str, PathSpec] = {
    spec.name: spec
    for spec in (
        PathSpec("direct", "sqlite", 1, False, "CreateRoom + token on LiveKit"),
        PathSpec("sqlite", "sqlite", 1, True, "1 manager, SQLite"),
        PathSpec("redis", "redis", 1, True, "1 manager, Redis"),
        PathSpec("redis-x2", "redis", 2, True, "2 managers, one Redis"),
    )
}


# --- options ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    sessions: int
    concurrency: int
    warmup: int
    rounds: int
    paths: tuple[str, ...]
    as_json: bool
    livekit_binary: str | None
    redis_binary: str


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description=(
            "Concurrent create-session calls (no services) through one manager on SQLite, one "
            "on Redis and two on one Redis, beside CreateRoom + token minting straight on "
            "LiveKit, measured in the same run. Loopback only."
        )
    )
    parser.add_argument(
        "--sessions", type=int, default=2000, help="measured sessions per path (default 2000)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=16,
        help="requests in flight on each path, spread over its processes (default 16)",
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
        help="split the sessions over this many rounds; the path that goes first rotates "
        "(default 4)",
    )
    parser.add_argument(
        "--paths",
        default=",".join(PATHS),
        help=f"comma-separated paths to measure (default {','.join(PATHS)})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument(
        "--livekit-binary", help="livekit-server to run (default: .cache/bin or PATH)"
    )
    parser.add_argument(
        "--redis-binary", default="redis-server", help="redis-server to run (default: PATH)"
    )
    args = parser.parse_args(argv)
    for name in ("sessions", "concurrency", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    if args.sessions < args.rounds:
        parser.error("--sessions must be at least --rounds")
    paths = tuple(dict.fromkeys(name.strip() for name in args.paths.split(",") if name.strip()))
    unknown = [name for name in paths if name not in PATHS]
    if unknown or not paths:
        parser.error(f"--paths: choose among {', '.join(PATHS)}")
    return Options(
        sessions=args.sessions,
        concurrency=args.concurrency,
        warmup=args.warmup,
        rounds=args.rounds,
        paths=paths,
        as_json=args.json,
        livekit_binary=args.livekit_binary,
        redis_binary=args.redis_binary,
    )


# --- processes --------------------------------------------------------------------------------


async def redis_answers(url: str) -> bool:
    client = Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(await client.ping())
    except (RedisError, OSError):
        return False
    finally:
        await client.aclose()


async def flush_redis(url: str) -> None:
    client = Redis.from_url(url, socket_timeout=10)
    try:
        await client.flushall()
    finally:
        await client.aclose()


def running_redis(binary: str, port: int, workdir: Path) -> AbstractAsyncContextManager[Process]:
    """redis-server on 127.0.0.1:`port`, in the new folder `workdir`, without persistence."""
    workdir.mkdir()
    url = redis_url(port)
    command = [binary, "--port", str(port), "--bind", HOST, "--dir", str(workdir)]
    command += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
    return running_process(
        "redis-server",
        command,
        cwd=workdir,
        env=None,
        probe=(lambda: redis_answers(url), url),
        start_timeout=START_TIMEOUT,
        stop_timeout=REDIS_STOP_TIMEOUT,
    )


def redis_url(port: int) -> str:
    return f"redis://{HOST}:{port}/0"


def manager_command(spec: PathSpec, run: Run, port: int, data_dir: Path) -> list[str]:
    command = [sys.executable, "-m", "session_manager", "--host", HOST, "--port", str(port)]
    command += ["--store", spec.store, "--livekit-url", run.config.url]
    command += ["--deployment", f"bench-{run.run_id}-{run.batches}-{spec.name}"]
    command += ["--log-level", "WARN"]
    if spec.store == "redis":
        command += ["--redis-url", run.redis_url]
    else:
        command += ["--data-dir", str(data_dir)]
    return command


def manager_env(config: ManagedLiveKitConfig) -> dict[str, str]:
    """Our environment without any manager or LiveKit setting, plus the key pair (kept out of
    the command line, where every process list shows it)."""
    env = clean_env()
    env.update(
        LIVEKIT_API_KEY=config.api_key,
        LIVEKIT_API_SECRET=config.api_secret,
        PYTHONPATH=str(PROJECT_ROOT),
    )
    return env


@asynccontextmanager
async def running_managers(spec: PathSpec, run: Run, workdir: Path) -> AsyncIterator[list[int]]:
    """The path's manager processes, one after the other on ports A (and B), each up on
    /health; yields their pids. All stopped on the way out."""
    async with AsyncExitStack() as stack:
        pids = []
        for number, port in enumerate(run.manager_ports[: spec.processes], start=1):
            manager = running_manager(spec, run, port, workdir / f"manager-{number}")
            pids.append((await stack.enter_async_context(manager)).pid)
        yield pids


def running_manager(
    spec: PathSpec, run: Run, port: int, folder: Path
) -> AbstractAsyncContextManager[Process]:
    """One manager process of the path, its log and data in the new folder `folder`."""
    folder.mkdir(parents=True)
    return running_process(
        "session-manager",
        manager_command(spec, run, port, folder / "data"),
        cwd=folder,  # so no config/session-manager.toml of the caller's is read
        env=manager_env(run.config),
        probe_url=f"http://{HOST}:{port}{HEALTH_PATH}",
        start_timeout=START_TIMEOUT,
        stop_timeout=MANAGER_STOP_TIMEOUT,
    )


# --- the paths --------------------------------------------------------------------------------


def manager_operation(
    http: aiohttp.ClientSession,
    base_urls: Sequence[str],
    run_id: str,
    created: list[tuple[str, str]],
) -> Operation:
    """create-session on the processes in turn (request i on process i mod N); each session's
    process and id go into `created`, for the clean-up."""

    async def create(index: int) -> None:
        base_url = base_urls[index % len(base_urls)]
        body = json.dumps({"user_identity": f"bench-{run_id}-{index}", "required_services": []})
        async with http.post(
            base_url + CREATE_PATH, data=body, headers={"Content-Type": "application/json"}
        ) as response:
            payload = await response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {payload[:200]!r}")
        answer = json.loads(payload)
        if answer.get("status") != "Ready" or not answer.get("access_token"):
            raise RuntimeError(f"unexpected answer: {answer}")
        created.append((base_url, answer["session_id"]))

    return create


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Run:
    """What every batch of the run shares."""

    options: Options
    config: ManagedLiveKitConfig
    lk: api.LiveKitAPI
    redis_url: str
    manager_ports: tuple[int, int]  # A, which LiveKit posts its webhooks to, and B
    tmp: Path
    run_id: str
    pids: dict[str, int]  # client, livekit, redis
    batches: int = 0  # batches started so far


@dataclass
class Measured:
    batch: Batch
    machine_busy: float = 0.0  # CPU seconds the whole machine used during the batch
    ours_busy: float = 0.0  # of which this run's processes
    manager_cpu: list[float] = field(default_factory=list)  # CPU seconds of each manager
    rooms_left: int = 0  # rooms of a manager path that LiveKit still had after the deletions
    cleanup_errors: int = 0


@dataclass
class PathResults:
    measured: list[Measured] = field(default_factory=list)


async def settle(pids: Sequence[int]) -> None:
    """Until each process is idle: LiveKit delivers webhooks with a lag."""
    await asyncio.gather(*(wait_until_idle(pid) for pid in pids))


async def measure(
    run: Run, make: Callable[[str], Operation], count: int, manager_pids: Mapping[str, int]
) -> Measured:
    """One warm-up (not counted) and one measured batch. The managers' and Redis's CPU is
    counted until the managers have worked off the batch (its webhooks come with a lag); the
    client's and LiveKit's until the last answer, as in bench_create_session.py."""
    options = run.options
    if options.warmup:
        warm = await run_closed_loop(make("w"), options.warmup, options.concurrency)
        if warm.errors:
            raise RuntimeError(f"warm-up failed: {warm.first_error}")
    await settle(list(manager_pids.values()))
    pids = {**run.pids, **manager_pids}
    before, busy_before = cpu_snapshot(pids), machine_busy_seconds()
    batch = await run_closed_loop(make("m"), count, options.concurrency)
    at_end, busy_after = cpu_snapshot(pids), machine_busy_seconds()
    await settle(list(manager_pids.values()))
    settled = cpu_snapshot(pids)
    late = {"redis", *manager_pids}
    used = {name: (settled if name in late else at_end)[name] - before[name] for name in pids}
    batch.cpu = {
        "client": used["client"],
        "livekit": used["livekit"],
        "redis": used["redis"],
        "managers": sum(used[name] for name in manager_pids),
    }
    return Measured(
        batch,
        machine_busy=busy_after - busy_before,
        ours_busy=sum(at_end[name] - before[name] for name in pids),
        manager_cpu=[used[name] for name in manager_pids],
    )


async def clean_up(
    run: Run, http: aiohttp.ClientSession, created: list[tuple[str, str]], pids: Sequence[int]
) -> tuple[int, int]:
    """Delete what a batch created: each session through the process that created it, then
    every room LiveKit still has. How many rooms were left after the sessions' deletion, and
    how many deletions failed."""
    concurrency = run.options.concurrency

    async def delete_session(index: int) -> None:
        base_url, session_id = created[index]
        async with http.delete(f"{base_url}{SESSIONS_PATH}/{session_id}") as response:
            payload = await response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {payload[:200]!r}")

    errors = 0
    if created:
        errors += (await run_closed_loop(delete_session, len(created), concurrency)).errors
    names = [room.name for room in (await run.lk.room.list_rooms(api.ListRoomsRequest())).rooms]

    async def delete_room(index: int) -> None:
        await run.lk.room.delete_room(api.DeleteRoomRequest(room=names[index]))

    if names:
        errors += (await run_closed_loop(delete_room, len(names), concurrency)).errors
    await settle([*pids, run.pids["livekit"], run.pids["redis"]])
    return len(names), errors


async def run_batch(run: Run, spec: PathSpec, count: int) -> Measured:
    """The path's managers started, a warm-up, a measured batch of `count`, everything it
    created deleted, the managers stopped and Redis emptied."""
    run.batches += 1
    tag = f"{run.run_id}-{run.batches}"
    workdir = run.tmp / f"batch-{run.batches}-{spec.name}"
    async with (
        running_managers(spec, run, workdir) as pids,
        aiohttp.ClientSession(  # a new one per batch: the managers are new too
            connector=aiohttp.TCPConnector(limit=max(256, 2 * run.options.concurrency)),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
        ) as http,
    ):
        ports = run.manager_ports[: spec.processes]
        base_urls = [f"http://{HOST}:{port}" for port in ports]
        created: list[tuple[str, str]] = []

        def make(part: str) -> Operation:
            if spec.via_manager:
                return manager_operation(http, base_urls, f"{tag}{part}", created)
            return direct_operation(run.lk, run.config, f"{tag}{part}")

        manager_pids = {f"manager-{number}": pid for number, pid in enumerate(pids, start=1)}
        measured = await measure(run, make, count, manager_pids)
        rooms_left, measured.cleanup_errors = await clean_up(run, http, created, pids)
        measured.rooms_left = rooms_left if spec.via_manager else 0
    if spec.store == "redis":
        await flush_redis(run.redis_url)
    return measured


def order_of(paths: Sequence[str], number: int) -> list[str]:
    """The paths rotated by the round's number: each goes first in turn."""
    shift = number % len(paths)
    return [*paths[shift:], *paths[:shift]]


async def benchmark(options: Options) -> dict[str, Any]:
    binary = find_binary(options.livekit_binary)
    load_before = os.getloadavg()
    manager_ports = (free_port(), free_port())
    config = new_config(
        binary,
        host=HOST,
        port=free_port(),
        rtc_tcp_port=free_port(),
        rtc_udp_port=free_port(socket.SOCK_DGRAM),
        webhook_urls=(f"http://{HOST}:{manager_ports[0]}{WEBHOOK_PATH}",),
    )
    results: dict[str, PathResults] = {name: PathResults() for name in options.paths}
    orders: list[list[str]] = []
    redis_port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        async with (
            running_livekit(config, Path(tmp) / "livekit") as livekit_process,
            running_redis(options.redis_binary, redis_port, Path(tmp) / "redis") as redis,
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=max(256, 2 * options.concurrency)),
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
            ) as lk_http,
        ):
            lk = api.LiveKitAPI(
                config.url, config.api_key, config.api_secret, session=lk_http, failover=False
            )
            run = Run(
                options=options,
                config=config,
                lk=lk,
                redis_url=redis_url(redis_port),
                manager_ports=manager_ports,
                tmp=Path(tmp),
                run_id=uuid.uuid4().hex[:8],
                pids={"client": os.getpid(), "livekit": livekit_process.pid, "redis": redis.pid},
            )
            try:
                for number, count in enumerate(round_sizes(options.sessions, options.rounds)):
                    order = order_of(options.paths, number)
                    orders.append(order)
                    for name in order:
                        measured = await run_batch(run, PATHS[name], count)
                        results[name].measured.append(measured)
            finally:
                await lk.aclose()
    load_after = os.getloadavg()
    return report(options, binary, results, orders, load_before, load_after)


# --- the report -------------------------------------------------------------------------------


def path_row(spec: PathSpec, results: PathResults, concurrency: int) -> dict[str, Any]:
    measured = results.measured
    batches = [m.batch for m in measured]
    wall = sum(batch.wall for batch in batches)
    row = asdict(summarize(spec.name, batches, concurrency))
    per_manager = [sum(each) for each in zip(*(m.manager_cpu for m in measured), strict=True)]
    row.update(
        label=spec.label,
        manager_processes=spec.processes if spec.via_manager else 0,
        sessions_per_s_by_round=[
            round(len(batch.latencies) / batch.wall, 1) if batch.wall > 0 else None
            for batch in batches
        ],
        cores_busy_ours=round(sum(m.ours_busy for m in measured) / wall, 2) if wall else None,
        cores_busy_machine=round(sum(m.machine_busy for m in measured) / wall, 2) if wall else None,
        cpu_ms_per_session_each_manager=[
            round(seconds * 1000 / max(1, row["n"]), 3) for seconds in per_manager
        ],
        rooms_left_after_delete=sum(m.rooms_left for m in measured),
        cleanup_errors=sum(m.cleanup_errors for m in measured),
    )
    return row


def report(
    options: Options,
    binary: str,
    results: dict[str, PathResults],
    orders: list[list[str]],
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
) -> dict[str, Any]:
    rows = {
        name: path_row(PATHS[name], results[name], options.concurrency) for name in options.paths
    }
    machine = machine_info(binary, load_before[0])
    machine["load_avg_before"] = [round(value, 2) for value in load_before]
    machine["load_avg_after"] = [round(value, 2) for value in load_after]
    machine["redis_server"] = redis_version(options.redis_binary)
    answer: dict[str, Any] = {
        "machine": machine,
        "sessions": options.sessions,
        "concurrency": options.concurrency,
        "warmup": options.warmup,
        "rounds": options.rounds,
        "orders": orders,
        "results": list(rows.values()),
    }
    if "redis" in rows and "redis-x2" in rows:
        one, two = rows["redis"]["sessions_per_s"], rows["redis-x2"]["sessions_per_s"]
        wanted = SCALE_TARGET * one
        direct = rows["direct"]["sessions_per_s"] if "direct" in rows else None
        if direct is not None:
            wanted = min(wanted, direct)
        answer["target"] = {
            "two_over_one": round(two / one, 3),
            "two_over_sqlite": round(two / rows["sqlite"]["sessions_per_s"], 3)
            if "sqlite" in rows
            else None,
            "wanted_sessions_per_s": round(wanted, 1),
            "rule": f"min({SCALE_TARGET} x redis, direct)",
            "met": two >= wanted,
        }
    answer["no_errors"] = all(row["errors"] == 0 for row in rows.values())
    return answer


def redis_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip()


def render_table(report: dict[str, Any]) -> str:
    machine = report["machine"]
    load_b, load_a = machine["load_avg_before"], machine["load_avg_after"]
    lines = [
        f"machine: nproc={machine['nproc']} cpu={machine['cpu']!r} python={machine['python']} "
        f"client loop={machine['client_loop']}",
        f"         {machine['livekit_server']}, {machine['redis_server'].split(' sha=')[0]}, "
        f"livekit-api {machine['livekit_api']}, aiohttp {machine['aiohttp']}, "
        f"manager at {machine['manager_revision']}",
        f"load:    1/5/15 min before {'/'.join(map(str, load_b))}, "
        f"after {'/'.join(map(str, load_a))}",
        f"run:     {report['sessions']} sessions per path in {report['rounds']} round(s), "
        f"first path rotating; {report['concurrency']} in flight per path; warm-up "
        f"{report['warmup']} per batch, not counted",
        "",
        f"{'path':<9} {'n':>6} {'err':>4} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} "
        f"{'max ms':>7} {'sess/s':>7}  {'by round':<24} cores busy   CPU ms per session",
        f"{'':<9} {'':>6} {'':>4} {'':>7} {'':>7} {'':>7} {'':>7} {'':>7}  {'':<24} "
        "ours/machine client+livekit+redis+managers = total",
    ]
    for row in report["results"]:
        cpu = row["cpu_ms_per_session"]
        by_round = ", ".join(f"{rate:.0f}" for rate in row["sessions_per_s_by_round"])
        lines.append(
            f"{row['path']:<9} {row['n']:>6} {row['errors']:>4} {row['p50_ms']:>7.2f} "
            f"{row['p90_ms']:>7.2f} {row['p99_ms']:>7.2f} {row['max_ms']:>7.2f} "
            f"{row['sessions_per_s']:>7.1f}  {by_round:<24} "
            f"{row['cores_busy_ours']:.2f}/{row['cores_busy_machine']:.2f}    "
            f"{cpu['client']:.2f}+{cpu['livekit']:.2f}+{cpu['redis']:.2f}+{cpu['managers']:.2f}"
            f" = {sum(cpu.values()):.2f}"
        )
        each = row["cpu_ms_per_session_each_manager"]
        if len(each) > 1:
            lines.append(
                f"          managers' CPU ms per session, each: {' + '.join(map(str, each))}"
            )
        if row["first_error"]:
            lines.append(f"          first error: {row['first_error']}")
        if row["rooms_left_after_delete"] or row["cleanup_errors"]:
            lines.append(
                f"          clean-up: {row['rooms_left_after_delete']} room(s) left by the "
                f"manager, {row['cleanup_errors']} deletion(s) failed"
            )
    target = report.get("target")
    if target:
        lines += [
            "",
            f"redis-x2 / redis = {target['two_over_one']:.2f}"
            + (
                f", redis-x2 / sqlite = {target['two_over_sqlite']:.2f}"
                if target["two_over_sqlite"] is not None
                else ""
            ),
            f"target: redis-x2 >= {target['rule']} = {target['wanted_sessions_per_s']:.1f} "
            f"sessions/s: {'met' if target['met'] else 'MISSED'}",
        ]
    if not report["no_errors"]:
        lines.append("some requests failed: see the err column")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    return run_and_print(
        lambda: benchmark(options),
        render_table,
        as_json=options.as_json,
        program="bench_cluster",
        errors=(LiveKitServerError, RuntimeError, OSError, RedisError),
    )


if __name__ == "__main__":
    sys.exit(main())
