"""The processes of the end-to-end tests: children started with their output in files and
stopped in reverse order, the real `session-manager` among them, waited for on /health, that
must exit 0 (unless the test SIGKILLed it) and leave no livekit-server behind. Successive
managers on one port and one store (a restart) come from `session_manager_processes`.

Nothing a test starts may outlive it: every child gets a parent-death signal (the kernel kills
it when the test process dies, however it dies), every child is stopped when the test ends,
passed or failed, and a livekit-server left behind by the manager is looked for and killed in
both cases too.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import aiohttp
import pytest

from session_manager.livekit.server import die_with_parent
from tests.netns import NETNS_ENV, in_private_netns

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]
HEALTH_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0  # the manager's shutdown has several stages of up to 10 s each
POLL_INTERVAL = 0.1
LOG_TAIL_LINES = 80

# Settings a developer's shell may carry; the manager must run on its embedded defaults here.
_SETTING_ENV_PREFIXES = ("SESSION_MANAGER_", "LIVEKIT_")
_KEPT_ENV = frozenset({NETNS_ENV})


def require_netns() -> None:
    if not in_private_netns():
        pytest.fail("run through scripts/test.sh: this test needs the private network namespace")


def child_environment() -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key in _KEPT_ENV or not key.startswith(_SETTING_ENV_PREFIXES)
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


def session_manager_command() -> list[str]:
    script = Path(sys.executable).with_name("session-manager")
    if not script.exists():
        script = REPO_ROOT / ".venv" / "bin" / "session-manager"
    if not script.exists():
        pytest.fail(
            "the session-manager console script is not installed (run scripts/bootstrap.sh)"
        )
    return [str(script)]


# ------------------------------------------------------------------------------- child processes


@dataclass
class ChildProcess:
    name: str
    process: asyncio.subprocess.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


@dataclass
class Children:
    """The processes this test started, in start order, with their output in files."""

    log_dir: Path
    started: list[ChildProcess] = field(default_factory=list)

    async def start(
        self,
        name: str,
        argv: list[str],
        cwd: Path,
        *,
        env: dict[str, str] | None = None,
        new_session: bool = False,
    ) -> ChildProcess:
        """`env`: added to the child's environment (after the settings are stripped from it);
        `new_session`: the child leads a process group of its own (killed whole with killpg)."""
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log_file:  # the child keeps its own copy of the descriptor
            process = await asyncio.create_subprocess_exec(
                *argv,
                cwd=cwd,
                env={**child_environment(), **(env or {})},
                start_new_session=new_session,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                preexec_fn=die_with_parent,  # SIGKILLed by the kernel if this test process dies
            )
        child = ChildProcess(name, process, log_path)
        self.started.append(child)
        return child

    async def stop_all(self) -> None:
        """SIGTERM each child, last started first; SIGKILL one that outlives STOP_TIMEOUT.
        Every child is dealt with even when stopping one of them fails or is cancelled: what
        is still running at the end is SIGKILLed."""
        try:
            for child in reversed(self.started):
                try:
                    await stop_process(child)
                except Exception as error:
                    print(f"stopping {child.name} failed: {error!r}; killing it")
        finally:
            for child in self.started:
                if child.running:
                    with suppress(ProcessLookupError):
                        child.process.kill()

    def print_log_tails(self) -> None:
        for child in self.started:
            print(f"----- last {LOG_TAIL_LINES} lines of {child.name} ({child.log_path}) -----")
            print(child.log_tail())


async def stop_process(child: ChildProcess) -> int:
    if child.running:
        child.process.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(child.process.wait(), STOP_TIMEOUT)
    except TimeoutError:
        print(f"{child.name} ignored SIGTERM for {STOP_TIMEOUT} s; killing it")
        child.process.kill()
        return await child.process.wait()


# ------------------------------------------------------------------------------------- /proc


def child_pids(parent: int) -> set[int]:
    """Live (non-zombie) processes whose parent is `parent`, from /proc."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError):
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
            if int(ppid) == parent and state != "Z":
                children.add(int(stat.parent.name))
    return children


def process_name(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def is_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def livekit_children(manager_pid: int) -> set[int]:
    return {pid for pid in child_pids(manager_pid) if process_name(pid) == "livekit-server"}


def kill_leftovers(pids: set[int]) -> None:
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------- the session-manager


class NotHealthy(Exception):
    """A health probe's answer other than the one waited for; its text is that answer."""


@dataclass
class ManagerChild:
    """A test's session-manager, the first of the children the test starts."""

    children: Children
    child: ChildProcess
    livekit_pids: set[int] = field(default_factory=set)
    killed: bool = False  # SIGKILLed by the test: its exit status is -SIGKILL, not 0

    async def wait_for_health(
        self,
        probe: Callable[[], Awaitable[T]],
        expected: str,
        errors: tuple[type[Exception], ...] = (aiohttp.ClientError, TimeoutError),
    ) -> T:
        """What `probe` returns once it returns (it raises NotHealthy or one of `errors` until
        /health answers as `expected`); fails if the manager exits or HEALTH_TIMEOUT passes."""
        deadline = time.monotonic() + HEALTH_TIMEOUT
        last_error = "no attempt yet"
        while time.monotonic() < deadline:
            if not self.child.running:
                pytest.fail(
                    f"session-manager exited with {self.child.process.returncode} before /health"
                )
            try:
                return await probe()
            except NotHealthy as answer:
                last_error = str(answer)
            except errors as error:
                last_error = repr(error)
            await asyncio.sleep(POLL_INTERVAL)
        pytest.fail(
            f"GET /health did not answer {expected} within {HEALTH_TIMEOUT} s: {last_error}"
        )

    def find_livekit(self) -> None:
        """Note the livekit-server children of the manager: none may outlive it."""
        self.livekit_pids = livekit_children(self.child.pid)
        assert self.livekit_pids, "the manager started no livekit-server child"

    def kill_leftover_livekit(self) -> set[int]:
        """The manager's livekit-server children still alive after it stopped, killed."""
        left = {pid for pid in self.livekit_pids if is_alive(pid)}
        kill_leftovers(left)
        return left

    async def kill(self) -> None:
        """SIGKILL the manager, as a crash would, and wait until it is gone."""
        self.livekit_pids |= livekit_children(self.child.pid)
        self.killed = True
        self.child.process.kill()
        await self.child.process.wait()

    def check_stopped_cleanly(self, left: set[int]) -> None:
        """Exit status 0, or -SIGKILL for a manager the test killed (any other status means it
        ended by itself before), and no livekit-server left running."""
        returncode = self.child.process.returncode
        if self.killed:
            assert returncode == -signal.SIGKILL, (
                f"session-manager exited with {returncode} before the test killed it"
            )
        else:
            assert returncode == 0, f"session-manager exited with {returncode}"
        assert not left, f"livekit-server processes left running after the manager: {left}"


@asynccontextmanager
async def session_manager_child(tmp_path: Path, command: list[str]) -> AsyncIterator[ManagerChild]:
    """`command`, a session-manager, started in tmp_path/manager-cwd (its SQLite store, if any,
    lands under ./var there), its log and those of the children started after it in tmp_path.

    On the way out, passed or failed, every child is stopped, the manager last, and a
    livekit-server the manager left running is killed. Then, if the test passed, the manager must
    have exited 0 and left no livekit-server; if it failed, what was left is noted on its error.
    On any failure every child's log tail is printed."""
    cwd = tmp_path / "manager-cwd"
    cwd.mkdir()
    children = Children(tmp_path)
    manager = ManagerChild(children, await children.start("session-manager", command, cwd))
    try:
        try:
            yield manager
        except BaseException as error:
            left = await stop_everything(manager)
            if left:
                error.add_note(f"livekit-server processes left running after the manager: {left}")
            raise
        manager.check_stopped_cleanly(await stop_everything(manager))
    except BaseException:
        children.print_log_tails()
        raise


async def stop_everything(manager: ManagerChild) -> set[int]:
    """Stop every child (the manager last), then kill any livekit-server the manager left
    running, even when stopping was interrupted; returns the pids of those left running."""
    if manager.child.running:  # its LiveKit, even one started after find_livekit()
        manager.livekit_pids |= livekit_children(manager.child.pid)
    try:
        await manager.children.stop_all()
    finally:
        left = manager.kill_leftover_livekit()
    return left


# --------------------------------------------------------------- successive session-managers


@dataclass
class ManagerProcesses:
    """Session-managers run one after another with the same command, so on the same port and
    the same store: a restart, or a crash and a restart; or side by side, each on a port of its
    own (`start(command, alongside=True)`): a cluster on one Redis. The children a test starts
    beside them (services) are in the same `children`."""

    children: Children
    command: list[str]
    cwd: Path
    managers: list[ManagerChild] = field(default_factory=list)

    @property
    def current(self) -> ManagerChild:
        if not self.managers:
            raise RuntimeError("no session-manager started yet")
        return self.managers[-1]

    async def start(
        self, command: list[str] | None = None, *, alongside: bool = False
    ) -> ManagerChild:
        """The next manager (log: session-manager-N.log), with `command` (default: the one
        given for them all). The previous one must be gone, unless `alongside`: managers
        running at once (a cluster on one store), each with a command of its own (its port)."""
        if not alongside and self.managers and self.current.child.running:
            raise RuntimeError("the previous session-manager is still running")
        name = f"session-manager-{len(self.managers) + 1}"
        argv = self.command if command is None else command
        manager = ManagerChild(self.children, await self.children.start(name, argv, self.cwd))
        self.managers.append(manager)
        return manager

    async def stop(self) -> None:
        """SIGTERM the running manager: it must exit 0 and leave no livekit-server."""
        manager = self.current
        manager.livekit_pids |= livekit_children(manager.child.pid)
        await stop_process(manager.child)
        manager.check_stopped_cleanly(manager.kill_leftover_livekit())

    async def kill(self) -> None:
        """SIGKILL the running manager, as a crash would."""
        await self.current.kill()


@asynccontextmanager
async def session_manager_processes(
    tmp_path: Path, command: list[str]
) -> AsyncIterator[ManagerProcesses]:
    """Like `session_manager_child`, for a test that runs several managers one after another
    (`start`, `stop`, `kill`), all with `command` in tmp_path/manager-cwd.

    On the way out, passed or failed, every child is stopped (last started first) and any
    livekit-server a manager left running is killed. Then, if the test passed, each manager must
    have exited 0 (-SIGKILL for those the test killed) and left no livekit-server. On any
    failure every child's log tail is printed."""
    cwd = tmp_path / "manager-cwd"
    cwd.mkdir()
    processes = ManagerProcesses(Children(tmp_path), command, cwd)
    try:
        try:
            yield processes
        except BaseException as error:
            left = await stop_managers(processes)
            if any(left.values()):
                error.add_note(f"livekit-server processes left running after the managers: {left}")
            raise
        left = await stop_managers(processes)
        for manager in processes.managers:
            manager.check_stopped_cleanly(left[manager.child.name])
    except BaseException:
        processes.children.print_log_tails()
        raise


async def stop_managers(processes: ManagerProcesses) -> dict[str, set[int]]:
    """Stop every child (last started first), then kill any livekit-server a manager left
    running, even when stopping was interrupted; returns, by manager, the pids of those."""
    for manager in processes.managers:
        if manager.child.running:
            manager.livekit_pids |= livekit_children(manager.child.pid)
    try:
        await processes.children.stop_all()
    finally:
        left = {
            manager.child.name: manager.kill_leftover_livekit() for manager in processes.managers
        }
    return left
