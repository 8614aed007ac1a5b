"""Shared fixtures: a real livekit-server for the test session, and managers wired to it.

LiveKit is started once per test session with the same config the manager writes for its managed
child; it posts webhooks to a fixed port, where each test's manager listens in turn.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient
from livekit import api
from livekit.rtc import _ffi_client
from redis.backoff import NoBackoff
from redis.retry import Retry

from session_manager.api.app import create_app
from session_manager.config import Settings
from session_manager.livekit.server import die_with_parent, find_binary, new_config
from tests.netns import in_private_netns


class _FfiPanicGuard:
    """The `livekit` realtime SDK answers a panic of its native side by sending SIGTERM to its
    own process. In this test process each test has its own event loop: a room whose connect
    callback arrives after its test's loop has closed makes the native side panic ("timed out
    waiting for ReadyForRoomEventRequest") seconds later, in the middle of an unrelated test,
    and the SIGTERM would kill the whole run. Here that signal is turned into a line on stderr;
    a test that really depends on a broken room still fails on its own assertions."""

    def __init__(self, real_os: Any) -> None:
        self._os = real_os

    def __getattr__(self, name: str) -> Any:
        return getattr(self._os, name)

    def kill(self, pid: int, sig: int) -> None:
        if pid == self._os.getpid() and sig == signal.SIGTERM:
            sys.__stderr__.write("livekit FFI panic in the test process: SIGTERM suppressed\n")
            return
        self._os.kill(pid, sig)


_ffi_client.os = _FfiPanicGuard(_ffi_client.os)  # type: ignore[assignment]


def require_netns() -> None:
    """Tests with a real LiveKit run only inside the private network namespace of
    scripts/test.sh: there WebRTC works and no packet can reach another network."""
    if not in_private_netns():
        pytest.fail(
            "this test needs the private network namespace: run it through scripts/test.sh "
            "(or scripts/netns-run.sh .venv/bin/python -m pytest ...)"
        )


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class LiveKitUnderTest:
    url: str
    api_key: str
    api_secret: str
    webhook_port: int  # where this LiveKit posts its webhooks: the manager under test listens here


def _wait_until_up(url: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"livekit-server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"livekit-server did not answer on {url} within {timeout}s")


@pytest.fixture(scope="session")
def livekit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveKitUnderTest]:
    require_netns()
    webhook_port = free_port()
    config = new_config(
        find_binary(None),
        port=free_port(),
        rtc_tcp_port=free_port(),
        rtc_udp_port=free_port(socket.SOCK_DGRAM),
        webhook_urls=(f"http://127.0.0.1:{webhook_port}/livekit/webhook",),
    )
    workdir = tmp_path_factory.mktemp("livekit")
    config_path = workdir / "livekit.yaml"
    config_path.write_text(config.render())
    with (workdir / "livekit.log").open("wb") as output:
        process = subprocess.Popen(
            [config.binary, "--config", str(config_path)],
            stdout=output,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,  # gone with this test process, however it ends
        )
    try:
        _wait_until_up(f"http://127.0.0.1:{config.port}/", process, timeout=30)
        yield LiveKitUnderTest(config.url, config.api_key, config.api_secret, webhook_port)
    finally:
        stop_livekit(process)


def stop_livekit(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM; a second one forces LiveKit out of a drain it can hang in; then SIGKILL."""
    for wait in (2, 5):
        process.terminate()
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
    process.kill()
    process.wait()


# Short timeouts so failure paths finish quickly; each test may override any of them.
FAST_SETTINGS: dict[str, Any] = {
    "join_timeout": 10.0,
    "dispatch_timeout": 2.0,
    "dispatch_attempts": 2,
    "dispatch_backoff": 0.05,
    "livekit_timeout": 3.0,
    "shutdown_timeout": 5.0,
}


@pytest.fixture
def make_settings(livekit: LiveKitUnderTest, tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "port": livekit.webhook_port,
            "livekit_url": livekit.url,
            "livekit_api_key": livekit.api_key,
            "livekit_api_secret": livekit.api_secret,
            "store": "sqlite",
            "data_dir": tmp_path / "state",
            **FAST_SETTINGS,
        }
        values.update(overrides)
        return Settings.model_validate(values)

    return make


ManagerFactory = Callable[..., "Any"]


@pytest.fixture
async def start_manager(
    aiohttp_client: Any, livekit: LiveKitUnderTest, make_settings: Callable[..., Settings]
) -> ManagerFactory:
    """Start a manager (on the port LiveKit posts webhooks to) and return its test client."""

    async def start(**overrides: Any) -> TestClient[web.Request, web.Application]:
        app = create_app(make_settings(**overrides))
        client: TestClient[web.Request, web.Application] = await aiohttp_client(
            app, server_kwargs={"port": livekit.webhook_port}
        )
        return client

    return start


@pytest.fixture
async def manager(start_manager: ManagerFactory) -> TestClient[web.Request, web.Application]:
    client: TestClient[web.Request, web.Application] = await start_manager()
    return client


@pytest.fixture
async def livekit_api(livekit: LiveKitUnderTest) -> AsyncIterator[api.LiveKitAPI]:
    client = api.LiveKitAPI(livekit.url, livekit.api_key, livekit.api_secret, failover=False)
    try:
        yield client
    finally:
        await client.aclose()


async def room_names(livekit_api: api.LiveKitAPI) -> set[str]:
    response = await livekit_api.room.list_rooms(api.ListRoomsRequest())
    return {room.name for room in response.rooms}


# ------------------------------------------------------------------------------------ markers

# `integration`: needs the real livekit-server; `e2e`: real processes and WebRTC. Every test in
# tests/integration and tests/e2e carries its folder's marker (modules say so with `pytestmark`
# too), so `-m "not e2e"` is the inner loop and `-m "not integration and not e2e"` the unit loop.
FOLDER_MARKERS = {"integration": "integration", "e2e": "e2e"}
REAL_LIVEKIT_FIXTURE = "livekit"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects anything by these markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test by its folder; a test elsewhere that uses the real LiveKit (the
    `livekit` fixture, directly or through another fixture) without an `integration` or `e2e`
    marker of its own fails collection, since `-m` would otherwise run it in the unit loop."""
    tests_dir = Path(__file__).resolve().parent
    unmarked: list[str] = []
    for item in items:
        try:
            folder = item.path.resolve().relative_to(tests_dir).parts[0]
        except ValueError:
            folder = ""
        marker = FOLDER_MARKERS.get(folder)
        if marker is not None and item.get_closest_marker(marker) is None:
            item.add_marker(marker)
        needs_livekit = REAL_LIVEKIT_FIXTURE in getattr(item, "fixturenames", ())
        if needs_livekit and not any(item.get_closest_marker(m) for m in FOLDER_MARKERS.values()):
            unmarked.append(item.nodeid)
    if unmarked:
        raise pytest.UsageError(
            "these tests use the real livekit-server (the `livekit` fixture) but are not marked "
            "`integration` (or `e2e`): add `pytestmark = pytest.mark.integration` to their "
            "module or mark them one by one:\n  " + "\n  ".join(unmarked)
        )


# ------------------------------------------------------------------- nothing left running

# What the suite starts as processes: a run must end with none of them alive.
OUR_PROCESSES = (
    "livekit-server",
    "redis-server",
    "session_manager",
    "session-manager",
    "pong.py",
    "agent",
)


def _our_survivors() -> dict[int, str]:
    """Processes of the kinds the suite starts still alive (not zombies) in this PID
    namespace, other than this pytest process and its ancestors."""
    spared = {os.getpid()}
    pid = os.getpid()
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        spared.add(pid)
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in spared:
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if state != "Z" and any(name in command for name in OUR_PROCESSES):
            found[int(entry.name)] = command.strip()
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The suite ends by checking that no manager, LiveKit or service it started is still
    alive (only inside the private namespace, where every process is the run's own)."""
    if not in_private_netns():
        return
    survivors = _our_survivors()
    deadline = time.monotonic() + 5  # children told to stop may still be on their way out
    while survivors and time.monotonic() < deadline:
        time.sleep(0.1)
        survivors = _our_survivors()
    if not survivors:
        return
    for pid, command in survivors.items():
        sys.stderr.write(f"left running by the test run: pid {pid}: {command}\n")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


# ------------------------------------------------------------------------------------- redis


class RedisUnderTest:
    """The redis-server of this test session: on a free loopback port, in a folder of its own,
    without persistence of its own. `stop` and `start` make an outage of it on the same port;
    `pause` and `resume` make it hang (SIGSTOP: connections are still accepted, nothing is
    answered)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None
        self._paused = False

    def start(self, timeout: float = 10.0) -> None:
        """Start the server, or nothing if it runs. Call it from the test's own thread: the
        server dies with the thread that started it (its parent-death signal is per thread),
        so one started from a worker thread (asyncio.to_thread) is killed when that thread ends."""
        if self._process is not None and self._process.poll() is None:
            return
        self._process = None
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--dir", str(self.workdir), "--save", "", "--appendonly", "no"]
        command += ["--daemonize", "no"]
        with (self.workdir / "redis.log").open("ab") as output:
            process = subprocess.Popen(
                command,
                stdout=output,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,  # gone with this test process, however it ends
            )
        self._process = process
        deadline = time.monotonic() + timeout
        while not self._answers_ping():
            if process.poll() is not None:
                self._process = None
                raise RuntimeError(f"redis-server exited with {process.returncode}")
            if time.monotonic() > deadline:
                self.stop(keep_data=False)
                raise RuntimeError(f"redis-server did not answer on {self.url} within {timeout}s")
            time.sleep(0.02)

    def stop(self, *, keep_data: bool = True) -> None:
        """End the server. `keep_data`: as a Redis that persists would, the next `start` finds
        what was written (saved to its folder first); else it starts empty."""
        process, self._process = self._process, None
        if process is None:
            return
        self._resume(process)
        if keep_data:
            # Saves and exits in one command: nothing written in between can be lost.
            with contextlib.suppress(Exception), self._client() as client:
                client.shutdown(save=True)
        for end in (process.terminate, process.kill):
            if process.poll() is None:
                end()
            try:
                process.wait(5)
                return
            except subprocess.TimeoutExpired:
                continue

    def pause(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        if self._process is not None:
            self._resume(self._process)

    def _resume(self, process: subprocess.Popen[bytes]) -> None:
        if self._paused:
            process.send_signal(signal.SIGCONT)
            self._paused = False

    def _client(self) -> redis.Redis:
        # The sync client: these helpers run outside the test's event loop, or block it briefly.
        # No retries: SHUTDOWN closes the connection, which redis-py would otherwise retry.
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=2, retry=Retry(NoBackoff(), 0)
        )

    def _answers_ping(self) -> bool:
        try:
            with self._client() as client:
                return bool(client.ping())
        except Exception:
            return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisUnderTest]:
    server = RedisUnderTest(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop(keep_data=False)


@pytest.fixture
def redis_prefix(redis_server: RedisUnderTest) -> Iterator[str]:
    """A key prefix of this test's own on the session's redis-server, which is running and
    answering when the test starts and after it ends (an outage test may have stopped it)."""
    redis_server.resume()
    redis_server.start()
    yield f"test-{uuid.uuid4().hex}:"
    redis_server.resume()
    redis_server.start()
