"""Benchmark (issue 15): what health checks cost at a short interval. The manager's own health
monitor and HTTP client (`HealthMonitor`, `health_session`, `MicroserviceClient`) check
`--instances` registrations, each at its own port of one server process (a child of this one),
every `--interval` seconds; the run reports the checks per second made, the CPU they cost this
process (the manager's side: scheduling, the HTTP client, handing over the results), how long a
check took, and how many TCP connections the server accepted (kept-alive: one per instance).
`--new-connections` makes the same checks with a new connection each, for comparison.

    .venv/bin/python scripts/bench_health_checks.py                    # 100 instances at 0.5 s
    .venv/bin/python scripts/bench_health_checks.py --instances 10 --seconds 30 --json

Everything listens on 127.0.0.1; the server is stopped on the way out. Reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from bench_harness import (
    HOST,
    PROJECT_ROOT,
    child_env,
    free_port,
    percentile,
    run_and_print,
    running_process,
)

sys.path.insert(0, str(PROJECT_ROOT))

from session_manager.dispatch import DispatchPolicy, MicroserviceClient
from session_manager.registry import Registry
from session_manager.registry.health import HealthMonitor, HealthResults, health_session
from session_manager.store import MemoryStore

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
SCRIPT = Path(__file__).resolve()
WARMUP = 3.0  # seconds before measuring: every instance checked, its connection open


@dataclass(frozen=True)
class Options:
    instances: int
    interval: float
    seconds: float
    new_connections: bool
    as_json: bool


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description="What health checks cost at a short interval.")
    parser.add_argument("--instances", type=int, default=100, help="registrations (default 100)")
    parser.add_argument(
        "--interval", type=float, default=0.5, help="their health_interval (default 0.5)"
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="measured (default 20)")
    parser.add_argument(
        "--new-connections",
        action="store_true",
        help="for comparison: a new TCP connection per check (no keep-alive)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument(
        "--serve", nargs=2, type=int, metavar=("PORT", "COUNT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(serve(*args.serve))
        raise SystemExit(0)
    if not 1 <= args.instances <= 1000 or not 0.5 <= args.interval <= 3600 or args.seconds <= 0:
        parser.error("--instances 1..1000, --interval 0.5..3600, --seconds above 0")
    return Options(args.instances, args.interval, args.seconds, args.new_connections, args.json)


# --- the server (a child process) -------------------------------------------------------------


async def serve(port: int, count: int) -> None:
    """/health on ports port+1 .. port+count; /stats on `port`: checks and connections seen."""
    peers: set[tuple[object, object]] = set()
    checks = 0

    async def health(request: web.Request) -> web.Response:
        nonlocal checks
        checks += 1
        transport = request.transport
        assert transport is not None
        # A connection is its two ends: one client port may reach several of our ports.
        peers.add((transport.get_extra_info("peername"), transport.get_extra_info("sockname")))
        return web.Response(text="ok")

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"checks": checks, "connections": len(peers)})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/stats", stats)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    for offset in range(count + 1):
        await web.TCPSite(runner, HOST, port + offset).start()
    await asyncio.Event().wait()  # until the parent stops it


def free_range(count: int) -> int:
    """A port from which count+1 ports in a row are free (probed, not reserved)."""
    for _ in range(50):
        base = free_port()
        if base + count < 65000 and all(_free(base + n) for n in range(1, count + 1)):
            return base
    raise RuntimeError(f"no {count + 1} free ports in a row found")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


# --- the run ----------------------------------------------------------------------------------


async def benchmark(options: Options) -> dict[str, Any]:
    base = free_range(options.instances)
    command = [sys.executable, str(SCRIPT), "--serve", str(base)]
    command.append(str(options.instances))
    workdir = Path(os.environ.get("TMPDIR", "/tmp"))
    async with running_process(
        "bench-health-server",
        command,
        cwd=workdir,
        env=child_env(),
        probe_url=f"http://{HOST}:{base}/stats",
        start_timeout=START_TIMEOUT,
        stop_timeout=STOP_TIMEOUT,
    ):
        registry = Registry(MemoryStore())
        for n in range(options.instances):
            metadata = {"health_interval": options.interval}
            registry.register(f"svc-{n}", f"http://{HOST}:{base + 1 + n}", metadata)
        results: HealthResults = []
        durations: list[float] = []
        http_client = (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64, force_close=True))
            if options.new_connections
            else health_session(concurrency=64)
        )
        async with http_client as http:
            client = MicroserviceClient(http, DispatchPolicy(timeout=2.0, attempts=1, backoff=0))
            check = client.check_health

            async def timed(
                endpoint: str, timeout: float, *, service_id: str | None = None
            ) -> str | None:
                started = time.perf_counter()
                try:
                    return await check(endpoint, timeout, service_id=service_id)
                finally:
                    durations.append(time.perf_counter() - started)

            client.check_health = timed  # type: ignore[method-assign]
            monitor = HealthMonitor(
                registry, client, interval=10.0, timeout=2.0, on_results=results.extend
            )
            await monitor.start()
            try:
                await asyncio.sleep(WARMUP)
                cpu0, wall0, done0, timed0 = (
                    time.process_time(),
                    time.monotonic(),
                    len(results),
                    len(durations),
                )
                await asyncio.sleep(options.seconds)
                cpu1, wall1, done1 = time.process_time(), time.monotonic(), len(results)
                measured = sorted(durations[timed0:])
            finally:
                await monitor.aclose()
        async with (
            aiohttp.ClientSession() as probe,
            probe.get(f"http://{HOST}:{base}/stats") as answer,
        ):
            server = await answer.json()
    checks = done1 - done0
    wall = wall1 - wall0
    return {
        "instances": options.instances,
        "connections": "new per check" if options.new_connections else "kept alive",
        "interval_s": options.interval,
        "measured_s": round(wall, 1),
        "checks_per_s": round(checks / wall, 1),
        "expected_per_s": round(options.instances / options.interval, 1),
        "cpu_share_of_a_core": round((cpu1 - cpu0) / wall, 3),
        "cpu_ms_per_check": round((cpu1 - cpu0) / max(checks, 1) * 1000, 3),
        "check_ms": {
            "p50": round(percentile(measured, 50) * 1000, 1),
            "p99": round(percentile(measured, 99) * 1000, 1),
        },
        "failed": sum(1 for _, error in results if error),
        "server_checks": server["checks"],
        "server_connections": server["connections"],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
    }


def render(report: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"{report['instances']} instances every {report['interval_s']:g} s, connections "
            f"{report['connections']}, measured "
            f"{report['measured_s']} s (load after {report['load_avg_after']})",
            f"checks/s:     {report['checks_per_s']} (expected {report['expected_per_s']}), "
            f"failed {report['failed']}",
            f"manager CPU:  {report['cpu_share_of_a_core'] * 100:.1f} % of a core, "
            f"{report['cpu_ms_per_check']} ms per check",
            f"check time:   p50 {report['check_ms']['p50']} ms, p99 {report['check_ms']['p99']} ms",
            f"server saw:   {report['server_checks']} checks over "
            f"{report['server_connections']} TCP connections",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    return run_and_print(
        lambda: benchmark(options),
        render,
        as_json=options.as_json,
        program="bench_health_checks",
        errors=(RuntimeError, OSError),
    )


if __name__ == "__main__":
    sys.exit(main())
