"""The livekit-server the manager runs as its child when no external LiveKit is configured."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

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
