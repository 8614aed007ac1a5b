"""When LiveKit dies: /health says so, creates are refused, sessions whose rooms died end, and
everything works again once LiveKit is back. Each test runs its own real livekit-server (the
session-wide one of conftest must not be killed)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient

from session_manager.api.app import create_app
from session_manager.api.routes import DAEMON
from session_manager.config import Settings
from session_manager.livekit.server import (
    ManagedLiveKitConfig,
    die_with_parent,
    find_binary,
    new_config,
)
from tests.conftest import FAST_SETTINGS, free_port, require_netns
from tests.fake_services import wait_for_status
from tests.integration.test_sessions import assert_envelope

Client = TestClient[web.Request, web.Application]
PROBE_INTERVAL = 0.2


async def until(condition: Any, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.02)


async def wait_for_health(client: Client, status: int, timeout: float = 20) -> dict[str, Any]:
    body: dict[str, Any] = {}

    async def reached() -> bool:
        nonlocal body
        response = await client.get("/health")
        body = await response.json()
        return response.status == status

    await until(reached, timeout, f"/health never answered {status} (last: {body})")
    return body


def livekit_problem(health: dict[str, Any]) -> str:
    assert health["status"] == "unhealthy", health
    reasons = [p["reason"] for p in health["problems"] if p["component"] == "livekit"]
    assert len(reasons) == 1, health
    return str(reasons[0])


async def create_ready_session(client: Client) -> dict[str, Any]:
    response = await client.post(
        "/api/v1/create-session", json={"user_identity": "u", "required_services": []}
    )
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    assert body["status"] == "Ready", body
    return body


async def test_a_killed_managed_livekit_is_restarted_and_its_sessions_end(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    require_netns()
    port = free_port()
    settings = Settings.model_validate(
        {
            **FAST_SETTINGS,
            "port": port,
            "store": "memory",
            "data_dir": tmp_path / "state",
            "livekit_port": free_port(),
            "livekit_rtc_tcp_port": free_port(),
            "livekit_rtc_udp_port": free_port(socket.SOCK_DGRAM),
            "livekit_probe_interval": PROBE_INTERVAL,
        }
    )
    client: Client = await aiohttp_client(create_app(settings), server_kwargs={"port": port})
    daemon = client.app[DAEMON]
    server = daemon.livekit_server
    assert server is not None
    before = await create_ready_session(client)

    old_pid = server.pid
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)
    # Down from the exit until a probe of the restarted server answers: at least the first
    # restart delay (0.5 s), so a poll this fast cannot miss it.
    reason = livekit_problem(await wait_for_health(client, 503))
    assert reason == "managed livekit-server exited with code -9; restarting"

    await wait_for_health(client, 200, timeout=30)
    # The watch's probe may see the new process answer before the restarter's own check does.

    async def restarted() -> bool:
        return server.restarts == 1

    await until(restarted, 10, "the restart was never counted")
    assert server.pid not in (None, old_pid)
    ended = await wait_for_status(client, before["session_id"], "Terminated")
    assert "LiveKit" in ended["reason"], ended

    after = await create_ready_session(client)
    assert after["livekit_url"] == before["livekit_url"]  # same port, same URL for clients
    assert after["room_name"] in await daemon.gateway.list_rooms()
    # RemoveParticipant reaches the restarted server with a valid token (a 401 would raise);
    # nobody of that name, or no such room, counts as removed.
    await daemon.gateway.remove_participant(after["room_name"], "nobody")
    await daemon.gateway.remove_participant("no-such-room", "nobody")


class OwnLiveKit:
    """A livekit-server this test starts, kills and starts again on the same config."""

    def __init__(self, config: ManagedLiveKitConfig, workdir: Path) -> None:
        self.config = config
        self._config_path = workdir / "livekit.yaml"
        self._config_path.write_text(config.render())
        self._log = workdir / "livekit.log"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self._log.open("ab") as output:
            self.process = await asyncio.create_subprocess_exec(
                self.config.binary,
                "--config",
                str(self._config_path),
                stdout=output,
                stderr=output,
                preexec_fn=die_with_parent,  # gone with this test process, however it ends
            )
        url = f"http://127.0.0.1:{self.config.port}/"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:

            async def answers() -> bool:
                assert self.process is not None and self.process.returncode is None
                try:
                    async with http.get(url) as response:
                        return response.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    return False

            await until(answers, 30, "livekit-server did not answer")

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await asyncio.wait_for(self.process.wait(), 10)

    async def stop(self) -> None:
        """SIGTERM twice (LiveKit can hang draining), then SIGKILL."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        for _ in range(2):
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 3)
                return
            except TimeoutError:
                continue
        await self.kill()


async def test_an_external_livekit_that_dies_and_comes_back(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    require_netns()
    port = free_port()
    livekit = OwnLiveKit(
        new_config(
            find_binary(None),
            port=free_port(),
            rtc_tcp_port=free_port(),
            rtc_udp_port=free_port(socket.SOCK_DGRAM),
            webhook_urls=(f"http://127.0.0.1:{port}/livekit/webhook",),
        ),
        tmp_path,
    )
    client: Client | None = None
    try:
        await livekit.start()
        settings = Settings.model_validate(
            {
                **FAST_SETTINGS,
                "port": port,
                "store": "memory",
                "data_dir": tmp_path / "state",
                "livekit_url": livekit.config.url,
                "livekit_api_key": livekit.config.api_key,
                "livekit_api_secret": livekit.config.api_secret,
                "livekit_probe_interval": PROBE_INTERVAL,
                "livekit_timeout": 1.0,
            }
        )
        client = await aiohttp_client(create_app(settings), server_kwargs={"port": port})
        assert client is not None
        before = await create_ready_session(client)

        await livekit.kill()
        reason = livekit_problem(await wait_for_health(client, 503))
        assert reason.startswith("LiveKit unreachable"), reason
        assert str(livekit.config.port) not in reason  # no internal address in what callers read
        refused = await client.post(
            "/api/v1/create-session", json={"user_identity": "u", "required_services": []}
        )
        assert refused.status == 503
        assert_envelope(await refused.json(), "LiveKitUnavailable")

        await livekit.start()  # same ports, same key pair
        await wait_for_health(client, 200)
        # The new LiveKit has none of the old rooms: the session of before the outage is over.
        ended = await wait_for_status(client, before["session_id"], "Terminated")
        assert "LiveKit" in ended["reason"], ended
        await create_ready_session(client)
    finally:
        if client is not None:
            await client.close()  # before LiveKit stops, so the manager's shutdown can use it
        await livekit.stop()
