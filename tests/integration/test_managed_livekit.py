"""The livekit-server the manager runs as its child when no external LiveKit is configured."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from livekit import api

from session_manager.livekit.server import (
    LiveKitServerError,
    ManagedLiveKitServer,
    RestartBackoff,
    find_binary,
    new_config,
)
from tests.conftest import free_port, require_netns


def managed(port: int | None = None) -> ManagedLiveKitServer:
    return ManagedLiveKitServer(
        new_config(
            find_binary(None),
            port=port or free_port(),
            rtc_tcp_port=free_port(),
            rtc_udp_port=free_port(socket.SOCK_DGRAM),
        )
    )


async def test_a_killed_livekit_server_is_restarted_with_the_same_config(
    caplog: pytest.LogCaptureFixture,
) -> None:
    require_netns()
    server = managed()
    exits: list[int] = []
    server.add_exit_listener(exits.append)
    await server.start(timeout=30)
    config = server.config
    client = api.LiveKitAPI(config.url, config.api_key, config.api_secret, failover=False)
    try:
        await client.room.create_room(api.CreateRoomRequest(name="before"))
        old_pid = server.pid
        assert old_pid is not None
        with caplog.at_level(logging.WARNING, logger="session_manager.livekit.server"):
            os.kill(old_pid, signal.SIGKILL)
            await until(lambda: server.restarts == 1 and server.running, timeout=30)
        assert exits == [-signal.SIGKILL]
        messages = [r.getMessage() for r in caplog.records]
        assert "managed livekit-server exited unexpectedly" in messages
        assert "restarting managed livekit-server" in messages
        assert "managed livekit-server restarted" in messages
        assert server.pid not in (None, old_pid)
        # Same port and key pair: the client made before the kill still works; the rooms of
        # the dead process are gone (a single node keeps them in memory).
        rooms = await client.room.list_rooms(api.ListRoomsRequest())
        assert [room.name for room in rooms.rooms] == []
    finally:
        await client.aclose()
        await server.aclose()
    assert not server.running


async def test_a_port_in_use_fails_start_with_a_clear_message() -> None:
    require_netns()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = managed(port=taken.getsockname()[1])
        with pytest.raises(LiveKitServerError, match=r"exited with code|did not answer"):
            await server.start(timeout=10)
    assert not server.running


async def test_stop_is_clean_and_idempotent(caplog: pytest.LogCaptureFixture) -> None:
    require_netns()
    server = managed()
    await server.start(timeout=30)
    with caplog.at_level(logging.ERROR, logger="session_manager.livekit.server"):
        await server.aclose()
        await server.aclose()
    assert not server.running
    assert not any("exited unexpectedly" in r.getMessage() for r in caplog.records)
    assert server.restarts == 0


# LiveKit's dev pair is short on purpose; PyJWT says so, and that is not this test's subject.
@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
async def test_a_given_key_pair_is_the_one_that_works() -> None:
    require_netns()
    config = new_config(
        find_binary(None),
        port=free_port(),
        rtc_tcp_port=free_port(),
        rtc_udp_port=free_port(socket.SOCK_DGRAM),
        api_key="devkey",
        api_secret="secret",
    )
    server = ManagedLiveKitServer(config)
    await server.start(timeout=30)
    try:
        good = api.LiveKitAPI(config.url, "devkey", "secret", failover=False)
        bad = api.LiveKitAPI(config.url, "devkey", "not-the-secret", failover=False)
        try:
            await good.room.list_rooms(api.ListRoomsRequest())
            with pytest.raises(api.ServerError):
                await bad.room.list_rooms(api.ListRoomsRequest())
        finally:
            await good.aclose()
            await bad.aclose()
    finally:
        await server.aclose()


async def test_a_killed_manager_leaves_no_livekit_behind(tmp_path: Path) -> None:
    require_netns()
    pid_file = tmp_path / "livekit.pid"
    script = f"""
import asyncio, socket
from session_manager.livekit.server import ManagedLiveKitServer, find_binary, new_config
from tests.conftest import free_port
async def main():
    server = ManagedLiveKitServer(new_config(find_binary(None), port=free_port(),
        rtc_tcp_port=free_port(), rtc_udp_port=free_port(socket.SOCK_DGRAM)))
    await server.start(timeout=30)
    open({str(pid_file)!r}, "w").write(str(server._process.pid))
    await asyncio.sleep(60)
asyncio.run(main())
"""
    parent = await asyncio.create_subprocess_exec(sys.executable, "-c", script)
    try:
        for _ in range(300):
            if pid_file.exists() and pid_file.read_text():
                break
            await asyncio.sleep(0.05)
        livekit_pid = int(pid_file.read_text())
        assert alive(livekit_pid)
        parent.kill()  # SIGKILL: the manager gets no chance to stop its child
        await parent.wait()
        for _ in range(100):
            if not alive(livekit_pid):
                break
            await asyncio.sleep(0.05)
        assert not alive(livekit_pid), "livekit-server outlived the process that started it"
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.split(") ", 1)[1][0] != "Z"  # a zombie has exited already


async def until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


# The restart logic, on a stand-in for livekit-server: a script that answers `GET /` with OK on
# the port of the config file it is given, records each start, and exits with 3 at start while
# a file named `fail` exists in its control folder.
FAKE_LIVEKIT = """\
import http.server, os, pathlib, re, sys
config = pathlib.Path(sys.argv[2]).read_text()
control = pathlib.Path(os.environ["FAKE_LIVEKIT_DIR"])
with (control / "starts").open("a") as starts:
    starts.write(config.replace("\\n", "|") + "\\n")
if (control / "fail").exists():
    sys.exit(3)
port = int(re.search(r"^port: (\\d+)", config, re.M).group(1))
class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"OK")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Ok).serve_forever()
"""


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    binary = tmp_path / "fake-livekit-server"
    binary.write_text(f"#!{sys.executable}\n{FAKE_LIVEKIT}")
    binary.chmod(0o755)
    monkeypatch.setenv("FAKE_LIVEKIT_DIR", str(tmp_path))
    return binary


@pytest.fixture
async def fake_server(
    fake_binary: Path,
) -> AsyncIterator[Callable[..., ManagedLiveKitServer]]:
    servers: list[ManagedLiveKitServer] = []

    def make(**options: Any) -> ManagedLiveKitServer:
        config = new_config(str(fake_binary), port=free_port())
        server = ManagedLiveKitServer(config, **options)
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in servers:
            await server.aclose()


def starts(fake_binary: Path) -> list[str]:
    path = fake_binary.parent / "starts"
    return path.read_text().splitlines() if path.exists() else []


def delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    return [
        r.__dict__["delay"]
        for r in caplog.records
        if r.getMessage() == "restarting managed livekit-server"
    ]


def restart_failures(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        r.__dict__
        for r in caplog.records
        if r.getMessage() == "managed livekit-server restart failed"
    ]


async def kill_and_wait_for_restart(server: ManagedLiveKitServer) -> None:
    pid, restarts = server.pid, server.restarts
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await until(lambda: server.restarts == restarts + 1 and server.running, timeout=10)
    assert server.pid != pid


def test_the_backoff_doubles_up_to_its_cap_and_starts_over_after_a_stable_run() -> None:
    backoff = RestartBackoff(first=0.5, maximum=3.0, stable_after=60.0)
    assert [backoff.after_run(1.0) for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff.after_run(60.0) == 0.5
    assert backoff.after_run(0.0) == 1.0
    assert RestartBackoff(first=5.0, maximum=2.0, stable_after=1.0).after_run(0.0) == 2.0


async def test_each_restart_waits_longer_until_a_run_lasts(
    fake_server: Callable[..., ManagedLiveKitServer],
    fake_binary: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    server = fake_server(
        restart_first_backoff=0.01, restart_max_backoff=0.04, stable_after=100.0, clock=clock
    )
    exits: list[int] = []
    server.add_exit_listener(exits.append)
    await server.start(timeout=10)
    with caplog.at_level(logging.WARNING, logger="session_manager.livekit.server"):
        for _ in range(4):
            await kill_and_wait_for_restart(server)
        clock.now += 100.0  # the fifth run lasted long enough: the backoff starts over
        await kill_and_wait_for_restart(server)
    assert delays(caplog) == [0.01, 0.02, 0.04, 0.04, 0.01]
    assert exits == [-signal.SIGKILL] * 5
    configs = starts(fake_binary)
    assert len(configs) == 6
    assert len(set(configs)) == 1, "every restart must use the same config file content"


async def test_failed_restarts_are_retried_and_logged(
    fake_server: Callable[..., ManagedLiveKitServer],
    fake_binary: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = fake_server(restart_first_backoff=0.01, restart_max_backoff=0.05)
    await server.start(timeout=10)
    failing = fake_binary.parent / "fail"
    failing.touch()
    pid = server.pid
    assert pid is not None
    with caplog.at_level(logging.WARNING, logger="session_manager.livekit.server"):
        os.kill(pid, signal.SIGKILL)
        await until(lambda: len(restart_failures(caplog)) >= 3, timeout=10)
        failing.unlink()
        await until(lambda: server.restarts == 1 and server.running, timeout=10)
    failures = restart_failures(caplog)
    assert all("exited with code 3 at start" in failure["error"] for failure in failures)
    attempts = [failure["attempt"] for failure in failures]
    assert attempts == list(range(1, len(attempts) + 1))
    assert delays(caplog)[:4] == [0.01, 0.02, 0.04, 0.05]


async def test_nothing_restarts_a_server_that_is_being_closed(
    fake_server: Callable[..., ManagedLiveKitServer],
    fake_binary: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = fake_server(restart_first_backoff=30.0)
    await server.start(timeout=10)
    pid = server.pid
    assert pid is not None
    with caplog.at_level(logging.WARNING, logger="session_manager.livekit.server"):
        os.kill(pid, signal.SIGKILL)
        await until(lambda: delays(caplog) == [30.0], timeout=10)  # waiting to restart
        await server.aclose()
    assert not server.running
    assert server.restarts == 0
    assert len(starts(fake_binary)) == 1
    # And a running one that is closed is stopped, not restarted.
    again = fake_server(restart_first_backoff=0.01)
    await again.start(timeout=10)
    with caplog.at_level(logging.WARNING, logger="session_manager.livekit.server"):
        await again.aclose()
    assert not again.running
    assert again.restarts == 0
    assert len(starts(fake_binary)) == 2
    assert delays(caplog) == [30.0]
