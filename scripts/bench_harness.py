"""What the benchmark scripts beside this file share: their client event loop and main, free
loopback ports, child processes (started in their own session, waited for on an HTTP probe or
one of the caller's, stopped on the way out), /proc readings, percentiles and facts about the
machine.

The scripts import it as a sibling (`import bench_harness`): a script's own folder is the first
entry of sys.path when it runs as `.venv/bin/python scripts/<name>.py`.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from asyncio.subprocess import Process
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp

PROJECT_ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # the only address anything here binds to or talks to
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

T = TypeVar("T")


# --- the client loop and main -----------------------------------------------------------------


def client_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when it is installed, else None (asyncio's own)."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def client_loop_name() -> str:
    """`uvloop <version>` when the client loop is uvloop's (see client_loop_factory)."""
    if client_loop_factory() is None:
        return "asyncio"
    return f"uvloop {package_version('uvloop')}"


def run_cancellable(runner: asyncio.Runner, work: Callable[[], Awaitable[T]]) -> T:
    """`work()` run to the end on `runner`; SIGTERM, like Ctrl-C, cancels it, so every process
    it started is still stopped in order."""
    main_task: list[asyncio.Task[Any]] = []
    runner.get_loop().add_signal_handler(
        signal.SIGTERM, lambda: [task.cancel() for task in main_task]
    )

    async def run() -> T:
        current = asyncio.current_task()
        assert current is not None
        main_task.append(current)
        return await work()

    return runner.run(run())


def run_and_print(
    benchmark: Callable[[], Awaitable[T]],
    render: Callable[[T], str],
    *,
    as_json: bool,
    program: str,
    errors: tuple[type[Exception], ...],
) -> int:
    """A benchmark's main: run it on the client loop and print its report, as JSON or rendered.

    The exit status: 0; 1 on one of `errors`, said on stderr after `program`; 130 when
    interrupted (Ctrl-C or SIGTERM)."""
    with asyncio.Runner(loop_factory=client_loop_factory()) as runner:
        try:
            report = run_cancellable(runner, benchmark)
        except (KeyboardInterrupt, asyncio.CancelledError):
            print("interrupted; everything started was stopped", file=sys.stderr)
            return 130
        except errors as exc:
            print(f"{program}: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(report, indent=2) if as_json else render(report))
    return 0


# --- measuring --------------------------------------------------------------------------------


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name, which may hold spaces: index 0 is
    field 3 (state), 1 the parent's pid, 11 and 12 utime and stime (fields 14 and 15)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds every process of the machine (the kernel's own work included) has used since
    boot, summed over the cores: the first line of /proc/stat without idle and iowait."""
    first_line = Path("/proc/stat").read_text().split("\n", 1)[0]
    # cpu user nice system idle iowait irq softirq steal (guest time is counted in user)
    ticks = [int(value) for value in first_line.split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is `pid` (scanning /proc: `children` files may be missing)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with suppress(OSError):
            if int(proc_stat(int(entry.name))[1]) == pid:
                found.append(int(entry.name))
    return found


# --- the machine ------------------------------------------------------------------------------


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def cpu_model() -> str:
    """The first "model name" of /proc/cpuinfo, else what `platform` says."""
    cpu = ""
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return cpu or platform.processor()


def usable_cpus() -> int | None:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return affinity or os.cpu_count()


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


# --- processes --------------------------------------------------------------------------------


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def clean_env() -> dict[str, str]:
    """Our environment without any manager or LiveKit setting."""
    return {
        k: v for k, v in os.environ.items() if not k.startswith(("SESSION_MANAGER_", "LIVEKIT_"))
    }


def tail(path: Path, lines: int = 20) -> str:
    with suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


async def spawn(
    command: list[str], *, cwd: Path, env: dict[str, str] | None, log_path: Path
) -> Process:
    """`command` in its own session (a Ctrl-C reaches only us), its output in `log_path`."""
    with log_path.open("wb") as log_file:  # the child keeps its own copy of the descriptor
        return await asyncio.create_subprocess_exec(
            *command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def wait_until_up(
    process: Process, name: str, probe_url: str, timeout: float, interval: float
) -> None:
    """Poll `probe_url` every `interval` s until it answers 200; fail early if the process dies."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:

        async def answers() -> bool:
            with suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(probe_url) as response:
                    return response.status == 200
            return False

        await wait_until_ready(process, name, answers, probe_url, timeout, interval)


async def wait_until_ready(
    process: Process,
    name: str,
    probe: Callable[[], Awaitable[bool]],
    what: str,
    timeout: float,
    interval: float,
) -> None:
    """Call `probe` every `interval` s until it says True; fail early if the process dies.
    `what` names what is probed in the error."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.returncode is not None:
            raise RuntimeError(f"{name} exited with code {process.returncode} at start")
        if await probe():
            return
        await asyncio.sleep(interval)
    raise RuntimeError(f"{name} did not answer {what} within {timeout}s")


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


def kill_survivors(pids: Iterable[int]) -> None:
    """SIGKILL those of `pids` still in /proc."""
    for pid in pids:
        if Path(f"/proc/{pid}").exists():
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@asynccontextmanager
async def running_process(
    name: str,
    command: list[str],
    *,
    cwd: Path,
    env: dict[str, str] | None,
    probe_url: str | None = None,
    start_timeout: float,
    stop_timeout: float,
    probe_interval: float = 0.05,
    reap_children: bool = False,
    probe: tuple[Callable[[], Awaitable[bool]], str] | None = None,
) -> AsyncIterator[Process]:
    """A child in its own session, its output in `cwd/<name>.log`, up once `probe_url` answers
    200 (or, for a server that speaks no HTTP, once `probe`'s function says True; its string
    names what it probes), stopped on the way out whatever happens (its log's last lines
    printed if it failed to start or died). With `reap_children`, the children it has when it
    is to stop and that outlive it (it was killed before it could stop them) are killed too."""
    if (probe_url is None) == (probe is None):
        raise ValueError("give exactly one of probe_url and probe")
    log_path = cwd / f"{name}.log"
    process = await spawn(command, cwd=cwd, env=env, log_path=log_path)
    up = False
    try:
        if probe_url is not None:
            await wait_until_up(process, name, probe_url, start_timeout, probe_interval)
        elif probe is not None:
            ready, what = probe
            await wait_until_ready(process, name, ready, what, start_timeout, probe_interval)
        up = True
        yield process
    finally:
        if not up or process.returncode is not None:  # failed to start, or died early
            print(f"{name} log, last lines:\n{tail(log_path)}", file=sys.stderr)
        orphans = child_pids(process.pid) if reap_children else []
        await stop_process(process, name, stop_timeout)
        kill_survivors(orphans)


# --- the private network namespace ------------------------------------------------------------

NETNS_ENV = "SESSION_MANAGER_NETNS"  # exported by scripts/netns-run.sh
PRIVATE_INTERFACES = frozenset({"lo", "sm-veth0", "sm-veth1"})  # all that exists in there


def in_private_netns() -> bool:
    """Inside scripts/netns-run.sh's namespace: its variable is set, and the interfaces this
    process sees (/proc/self/net/dev is per network namespace) are only loopback and its veth
    pair, so a variable set by hand elsewhere does not pass."""
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    seen = {line.split(":", 1)[0].strip() for line in lines if ":" in line}
    return os.environ.get(NETNS_ENV) == "1" and seen <= PRIVATE_INTERFACES


def require_netns(program: str, command: str) -> None:
    """Stop `program` unless it runs inside the private namespace: WebRTC needs the veth
    (it skips loopback), and nothing it sends may reach another network."""
    if not in_private_netns():
        raise SystemExit(
            f"{program}: run it as `{command}`: WebRTC needs the private network namespace "
            "of scripts/netns-run.sh"
        )


# --- the manager's API ------------------------------------------------------------------------


async def call_api(
    http: aiohttp.ClientSession,
    base_url: str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
) -> tuple[int, dict[str, Any]]:
    """One call to the manager's API: its status and its JSON object (a body that is not an
    object comes back as `{"raw": ...}`, so a failing call can still be reported)."""
    async with http.request(method, base_url + path, json=body) as response:
        payload = await response.read()
    try:
        answer = json.loads(payload)
    except ValueError:
        answer = {"raw": payload[:200].decode(errors="replace")}
    return response.status, answer if isinstance(answer, dict) else {"raw": answer}


# --- LiveKit and the children that use it -----------------------------------------------------


class LiveKitConfig(Protocol):
    """What the scripts need of session_manager.livekit.server's ManagedLiveKitConfig (not
    imported here: this module is imported before the scripts put the project on sys.path)."""

    @property
    def binary(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def url(self) -> str: ...
    @property
    def api_key(self) -> str: ...
    @property
    def api_secret(self) -> str: ...
    def render(self) -> str: ...


def child_env(config: LiveKitConfig | None = None) -> dict[str, str]:
    """A child's environment: no settings of the developer's shell, the project importable,
    and (given a LiveKit) LiveKit's own variables naming it."""
    env = clean_env()
    env.update(PYTHONPATH=str(PROJECT_ROOT), PYTHONUNBUFFERED="1")
    if config is not None:
        env.update(
            LIVEKIT_URL=config.url,
            LIVEKIT_API_KEY=config.api_key,
            LIVEKIT_API_SECRET=config.api_secret,
        )
    return env


def running_livekit(
    config: LiveKitConfig, workdir: Path, *, start_timeout: float, stop_timeout: float
) -> AbstractAsyncContextManager[Process]:
    """A livekit-server with `config` (written to workdir, readable by us only), up once it
    answers on its port."""
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
        start_timeout=start_timeout,
        stop_timeout=stop_timeout,
    )
