"""The livekit-server the manager runs as its child when no external LiveKit is configured."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from pathlib import Path

import pytest
from livekit import api

from session_manager.livekit.server import (
    LiveKitServerError,
    ManagedLiveKitServer,
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


async def test_an_unexpected_exit_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    require_netns()
    server = managed()
    await server.start(timeout=30)
    try:
        assert server.running
        process = server._process
        assert process is not None
        with caplog.at_level(logging.ERROR, logger="session_manager.livekit.server"):
            process.send_signal(signal.SIGKILL)
            for _ in range(100):
                if any("exited unexpectedly" in r.getMessage() for r in caplog.records):
                    break
                await asyncio.sleep(0.02)
        assert any("exited unexpectedly" in r.getMessage() for r in caplog.records)
        assert not server.running
    finally:
        await server.aclose()


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
