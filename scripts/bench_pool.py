"""Benchmark (issue 14): create-session -> `Ready` for three services on a warm pool hit, on a
miss, and with no pool on the path, in one run.

Run it inside the private network namespace (WebRTC ignores loopback candidates; as root):

    scripts/netns-run.sh .venv/bin/python scripts/bench_pool.py            # 30 rounds
    scripts/netns-run.sh .venv/bin/python scripts/bench_pool.py --rounds 50 --json

It starts, on free 127.0.0.1 ports: one livekit-server whose webhooks go to the manager; the
manager (`python -m session_manager`, SQLite store, log level WARN) on it, with one warm pool
`{"services": ["type:ASR", "type:LLM", "type:TTS"], "size": 1}`; three `examples.pong`
processes of types ASR, LLM and TTS (ids bench-pool-asr, -llm, -tts), waited for until the
manager lists them Healthy.

Each round, one create at a time, each but the miss after `--pause` seconds of quiet, every
create `{"wait_until_ready": true}` and timed as its HTTP round trip (a kept-alive connection):

- hit:  the pool's member is Ready (GET /api/v1/pools says so): create with
        ["type:TTS", "type:ASR", "type:LLM"] (any order matches) takes it;
- miss: right after, the same create: the pool's refill is not Ready yet, so this one is
        dispatched as usual (its refill's three joins run at the same time);
- none: once the pool is full again, a create naming the three instances by id, which no pool
        matches: dispatched as usual while nothing else runs — LiveKit's floor for three
        services joining plus the manager's work.

Each session's view must say what happened (`pool` set on a hit, null otherwise); a round where
it does not counts as an error. Sessions are deleted at the end of their round. Results are
reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time
import uuid
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from bench_harness import (
    HOST,
    PROJECT_ROOT,
    call_api,
    child_env,
    client_loop_name,
    cpu_model,
    free_port,
    manager_revision,
    percentile,
    run_and_print,
    running_process,
    usable_cpus,
)
from bench_harness import (
    require_netns as shared_require_netns,
)
from bench_harness import running_livekit as shared_running_livekit

sys.path.insert(0, str(PROJECT_ROOT))

from session_manager.livekit.server import (
    LiveKitServerError,
    ManagedLiveKitConfig,
    find_binary,
    new_config,
)

CREATE_PATH = "/api/v1/create-session"
SESSIONS_PATH = "/api/v1/sessions"
POOLS_PATH = "/api/v1/pools"
HEALTH_PATH = "/health"
WEBHOOK_PATH = "/livekit/webhook"
TYPES = ("ASR", "LLM", "TTS")
POOL_SERVICES = [f"type:{kind}" for kind in TYPES]
POOL_NAME = "+".join(sorted(POOL_SERVICES))
HIT_REQUEST = ["type:TTS", "type:ASR", "type:LLM"]  # another order: matched as a multiset
SERVICE_IDS = {kind: f"bench-pool-{kind.lower()}" for kind in TYPES}
PATHS = ("hit", "miss", "none")

START_TIMEOUT = 30.0
FILL_TIMEOUT = 30.0
READY_TIMEOUT_SECS = 30
REQUEST_TIMEOUT = READY_TIMEOUT_SECS + 15.0
STOP_TIMEOUT = 60.0


@dataclass(frozen=True)
class Options:
    rounds: int
    warmup: int
    pause: float
    as_json: bool
    store: str


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description="create-session -> Ready for three services: warm pool hit, miss, and no "
        "pool, in one run. Run inside scripts/netns-run.sh."
    )
    parser.add_argument("--rounds", type=int, default=30, help="measured rounds (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="uncounted rounds (default 3)")
    parser.add_argument(
        "--pause",
        type=float,
        default=1.0,
        help="seconds of quiet before each measured create but the miss (default 1.0)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument(
        "--store",
        choices=("sqlite", "memory"),
        default="sqlite",
        help="the manager's store (default sqlite): a hit is stored before it is answered",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or args.pause < 0:
        parser.error("--rounds must be at least 1; --warmup and --pause not negative")
    return Options(args.rounds, args.warmup, args.pause, args.json, args.store)


def require_netns() -> None:
    shared_require_netns(
        "bench_pool", "scripts/netns-run.sh .venv/bin/python scripts/bench_pool.py"
    )


# --- the processes ------------------------------------------------------------------------------


def running_manager(
    config: ManagedLiveKitConfig, port: int, workdir: Path, store: str
) -> AbstractAsyncContextManager[asyncio.subprocess.Process]:
    workdir.mkdir()
    pools = json.dumps([{"services": POOL_SERVICES, "size": 1, "max_idle": 3600}])
    command = [
        *(sys.executable, "-m", "session_manager", "--host", HOST, "--port", str(port)),
        *("--store", store, "--data-dir", str(workdir / "data"), "--log-level", "WARN"),
        *("--livekit-url", config.url, "--livekit-api-key", config.api_key),
        *("--livekit-api-secret", config.api_secret, f"--warm-pools={pools}"),
    ]
    return running_process(
        "session-manager",
        command,
        cwd=workdir,  # so no config/session-manager.toml of the caller's is picked up
        env=child_env(),
        probe_url=f"http://{HOST}:{port}{HEALTH_PATH}",
        start_timeout=START_TIMEOUT,
        stop_timeout=STOP_TIMEOUT,
    )


def running_pong(
    kind: str, port: int, manager_url: str, workdir: Path
) -> AbstractAsyncContextManager[asyncio.subprocess.Process]:
    workdir.mkdir()
    command = [
        *(sys.executable, "-m", "examples.pong", "--service-id", SERVICE_IDS[kind]),
        *("--host", HOST, "--port", str(port), "--manager-url", manager_url),
        *("--type", kind, "--log-level", "WARNING"),
    ]
    return running_process(
        SERVICE_IDS[kind],
        command,
        cwd=workdir,
        env=child_env(),
        probe_url=f"http://{HOST}:{port}{HEALTH_PATH}",
        start_timeout=START_TIMEOUT,
        stop_timeout=STOP_TIMEOUT,
    )


# --- measuring ---------------------------------------------------------------------------------


@dataclass
class Results:
    ms: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PATHS})
    view_ready_ms: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PATHS})
    errors: dict[str, list[str]] = field(default_factory=lambda: {p: [] for p in PATHS})


@dataclass
class Bench:
    http: aiohttp.ClientSession
    base_url: str
    run_id: str

    async def call(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[int, dict[str, Any]]:
        return await call_api(self.http, self.base_url, method, path, body)

    async def pool_ready(self) -> int:
        _, answer = await self.call("GET", POOLS_PATH)
        pool = next(p for p in answer["pools"] if p["name"] == POOL_NAME)
        return int(pool["ready"])

    async def until_pool_ready(self) -> None:
        deadline = time.monotonic() + FILL_TIMEOUT
        while await self.pool_ready() < 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the pool had no Ready member within {FILL_TIMEOUT} s")
            await asyncio.sleep(0.05)

    async def create(self, path: str, tag: str) -> tuple[float, dict[str, Any], str | None]:
        """(ms to the answer, the session's view, the error if any)."""
        required = HIT_REQUEST if path != "none" else list(SERVICE_IDS.values())
        body = {
            "user_identity": f"bench-pool-{self.run_id}-{path}-{tag}",
            "required_services": required,
            "wait_until_ready": True,
            "timeout_secs": READY_TIMEOUT_SECS,
        }
        started = time.perf_counter()
        status, created = await self.call("POST", CREATE_PATH, body)
        took = (time.perf_counter() - started) * 1000
        if status != 200 or created.get("status") != "Ready":
            return took, {}, f"HTTP {status}: {json.dumps(created)[:200]}"
        _, view = await self.call("GET", f"{SESSIONS_PATH}/{created['session_id']}")
        from_pool = view.get("pool") == POOL_NAME
        if from_pool != (path == "hit"):
            return took, view, f"a {path} that was {'' if from_pool else 'not '}from the pool"
        return took, view, None

    async def round(self, tag: str, results: Results | None, pause: float) -> None:
        # Each measure starts after `pause` of quiet: the last round's sessions ended, the
        # pool full and idle (a user arriving at a manager that is not busy).
        await self.until_pool_ready()
        await asyncio.sleep(pause)
        outcomes = {}
        outcomes["hit"] = await self.create("hit", tag)
        outcomes["miss"] = await self.create("miss", tag)
        await self.until_pool_ready()
        await asyncio.sleep(pause)
        outcomes["none"] = await self.create("none", tag)
        for path, (took, view, error) in outcomes.items():
            if results is not None:
                if error is None:
                    results.ms[path].append(took)
                    if view.get("ready_ms") is not None:
                        results.view_ready_ms[path].append(float(view["ready_ms"]))
                else:
                    results.errors[path].append(error)
            if view.get("session_id"):
                await self.call("DELETE", f"{SESSIONS_PATH}/{view['session_id']}")


def stats(values: list[float]) -> dict[str, float | int | None]:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0, "p50": None, "p90": None, "max": None}
    return {
        "n": len(ordered),
        "p50": round(percentile(ordered, 50), 1),
        "p90": round(percentile(ordered, 90), 1),
        "max": round(ordered[-1], 1),
    }


async def benchmark(options: Options) -> dict[str, Any]:
    require_netns()
    binary = find_binary(None)
    load_before = os.getloadavg()
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
    results = Results()
    with tempfile.TemporaryDirectory(prefix="bench-pool-") as tmp:
        workdir = Path(tmp)
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(
                shared_running_livekit(
                    config, workdir / "livekit", start_timeout=START_TIMEOUT, stop_timeout=15
                )
            )
            await stack.enter_async_context(
                running_manager(config, manager_port, workdir / "manager", options.store)
            )
            for kind in TYPES:
                await stack.enter_async_context(
                    running_pong(kind, free_port(), base_url, workdir / f"pong-{kind}")
                )
            timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
            http = await stack.enter_async_context(aiohttp.ClientSession(timeout=timeout))
            bench = Bench(http, base_url, uuid.uuid4().hex[:8])
            print("all up; measuring", file=sys.stderr, flush=True)
            for number in range(options.warmup + options.rounds):
                warm = number < options.warmup
                tag = f"{'w' if warm else ''}{number}"
                await bench.round(tag, None if warm else results, options.pause)
    return {
        "machine": {
            "nproc": usable_cpus(),
            "cpu": cpu_model(),
            "client_loop": client_loop_name(),
            "manager_revision": manager_revision(),
            "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        },
        "store": options.store,
        "rounds": options.rounds,
        "warmup": options.warmup,
        "results": {
            path: {
                "create_to_ready_ms": stats(results.ms[path]),
                "view_ready_ms": stats(results.view_ready_ms[path]),
                "errors": len(results.errors[path]),
                "first_error": results.errors[path][0] if results.errors[path] else None,
            }
            for path in PATHS
        },
    }


def _num(value: object) -> str:
    return "-" if value is None else f"{value:.1f}"


def render(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        f"machine: nproc={machine['nproc']} cpu={machine['cpu']!r} "
        f"client loop={machine['client_loop']}, manager at {machine['manager_revision']}, "
        f"{machine['date']}",
        f"load:    before {machine['load_avg_before']}, after {machine['load_avg_after']}",
        f"run:     {report['rounds']} rounds (+{report['warmup']} warm-up), one create at a "
        f"time; three services (ASR, LLM, TTS pongs); wait_until_ready; "
        f"store {report['store']}",
        "",
        f"{'path':<5} {'n':>3} {'err':>3} {'p50 ms':>8} {'p90 ms':>8} {'max ms':>8}   "
        "view ready_ms p50 / p90",
    ]
    for path, row in report["results"].items():
        total, view = row["create_to_ready_ms"], row["view_ready_ms"]
        lines.append(
            f"{path:<5} {total['n']:>3} {row['errors']:>3} {_num(total['p50']):>8} "
            f"{_num(total['p90']):>8} {_num(total['max']):>8}   "
            f"{_num(view['p50'])} / {_num(view['p90'])}"
        )
        if row["first_error"]:
            lines.append(f"      first error: {row['first_error']}")
    lines += [
        "",
        "  hit:  a Ready member taken; miss: the pool empty (its refill under way);",
        "  none: no pool matches (the three services by id), the pool idle and full.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    return run_and_print(
        lambda: benchmark(options),
        render,
        as_json=options.as_json,
        program="bench_pool",
        errors=(LiveKitServerError, RuntimeError, OSError),
    )


if __name__ == "__main__":
    sys.exit(main())
