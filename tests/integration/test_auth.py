"""API keys, ownership and limits on a real livekit-server, through HTTP (issue 9, parts 1, 2, 3
and 6); and the loopback rule on the real command line, in the test namespace where 10.77.0.1
exists and is not loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from session_manager.livekit.server import die_with_parent
from tests.conftest import LiveKitUnderTest, free_port, require_netns

pytestmark = pytest.mark.integration

ADMIN_KEY = "admin-key-5f1c0e7d9a2b4c6e"
ANN_KEY = "client-key-8d3a6b1f0e9c2d4a"
BOB_KEY = "client-key-2b7e4d9c1a0f3e5b"
SVC_A_KEY = "service-key-4c9e2a7d1b0f6e3a"
SVC_B_KEY = "service-key-7a1d3f5b9c2e4a6d"
KEYS = [
    f"{ADMIN_KEY} admin",
    f"{ANN_KEY} client",
    f"{BOB_KEY} client",
    f"{SVC_A_KEY} service",
    f"{SVC_B_KEY} service",
]
NOT_LOOPBACK = "10.77.0.1"  # scripts/netns-run.sh's veth end: exists only in the test namespace


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def error_of(response: Any, status: int) -> str:
    # An answer that is not the refusal may be an event stream that never ends: not read.
    assert response.status == status, (response.status, response.content_type)
    body = await response.json()
    assert set(body) == {"error", "message", "timestamp"}, body
    return str(body["error"])


async def create(manager: Any, key: str, user: str = "user123") -> dict[str, Any]:
    response = await manager.post(
        "/api/v1/create-session",
        json={"user_identity": user, "required_services": []},
        headers=bearer(key),
    )
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def listed(manager: Any, key: str) -> set[str]:
    response = await manager.get("/api/v1/sessions", headers=bearer(key))
    assert response.status == 200, await response.text()
    return {view["session_id"] for view in (await response.json())["sessions"]}


async def test_a_client_cannot_see_list_or_delete_another_clients_session(
    start_manager: Any,
) -> None:
    manager = await start_manager(api_keys=KEYS)
    sid = (await create(manager, ANN_KEY))["session_id"]
    theirs = f"/api/v1/sessions/{sid}"
    for method, path, body in (
        ("GET", theirs, None),
        ("DELETE", theirs, None),
        ("POST", f"{theirs}/services", {"service": "type:x"}),
        ("DELETE", f"{theirs}/services/x", None),
        ("GET", f"{theirs}/events", None),
    ):
        response = await manager.request(method, path, json=body, headers=bearer(BOB_KEY))
        assert await error_of(response, 404) == "NotFound", (method, path)
    assert sid not in await listed(manager, BOB_KEY)
    assert sid in await listed(manager, ANN_KEY)
    assert sid in await listed(manager, ADMIN_KEY)
    mine = await manager.get(theirs, headers=bearer(ANN_KEY))
    assert mine.status == 200 and (await mine.json())["status"] != "Terminated"
    assert (await manager.get(theirs, headers=bearer(ADMIN_KEY))).status == 200
    deleted = await manager.delete(theirs, headers=bearer(ANN_KEY))
    assert deleted.status == 200 and (await deleted.json())["status"] == "Terminated"


async def test_a_service_cannot_repoint_another_services_registration(
    start_manager: Any,
) -> None:
    manager = await start_manager(api_keys=KEYS, health_interval=3600.0)
    endpoint = f"http://127.0.0.1:{free_port()}"
    registration = {"service_id": "svc-a", "endpoint": endpoint, "metadata": {"type": "asr"}}
    response = await manager.post(
        "/api/v1/microservices/register", json=registration, headers=bearer(SVC_A_KEY)
    )
    assert response.status == 200, await response.text()
    attacker = {"endpoint": "http://127.0.0.1:6666"}
    path = "/api/v1/microservices/svc-a"
    for method, target, body in (
        ("PUT", path, attacker),
        ("DELETE", path, None),
        ("POST", f"{path}/drain", None),
        ("GET", path, None),
    ):
        refused = await manager.request(method, target, json=body, headers=bearer(SVC_B_KEY))
        assert await error_of(refused, 403) == "Forbidden", (method, target)
    view = await (await manager.get(path, headers=bearer(ADMIN_KEY))).json()
    assert view["endpoint"] == endpoint and view["draining"] is False
    elsewhere = f"http://127.0.0.1:{free_port()}"
    moved = await manager.put(path, json={"endpoint": elsewhere}, headers=bearer(SVC_A_KEY))
    assert moved.status == 200 and (await moved.json())["endpoint"] == elsewhere
    # Taking the id over by registering it again is no way round either.
    again = await manager.post(
        "/api/v1/microservices/register",
        json={**registration, "endpoint": "http://127.0.0.1:6666"},
        headers=bearer(SVC_B_KEY),
    )
    assert await error_of(again, 400) == "InvalidRequest"


async def test_past_max_live_sessions_a_create_is_503_with_retry_after(
    start_manager: Any,
) -> None:
    manager = await start_manager(max_live_sessions=1)
    first = await manager.post(
        "/api/v1/create-session", json={"user_identity": "u1", "required_services": []}
    )
    assert first.status == 200, await first.text()
    refused = await manager.post(
        "/api/v1/create-session", json={"user_identity": "u2", "required_services": []}
    )
    assert await error_of(refused, 503) == "AtCapacity"
    assert int(refused.headers["Retry-After"]) >= 1


async def test_past_max_sessions_per_user_a_create_is_429_with_retry_after(
    start_manager: Any,
) -> None:
    manager = await start_manager(api_keys=KEYS, max_sessions_per_user=1)
    await create(manager, ANN_KEY, user="ann")
    refused = await manager.post(
        "/api/v1/create-session",
        json={"user_identity": "ann", "required_services": []},
        headers=bearer(BOB_KEY),  # the limit is per user, whoever asks
    )
    assert await error_of(refused, 429) == "TooManyRequests"
    assert int(refused.headers["Retry-After"]) >= 1
    await create(manager, BOB_KEY, user="bob")


async def test_an_idempotency_key_of_another_api_key_is_another_key(start_manager: Any) -> None:
    manager = await start_manager(api_keys=KEYS)
    body = {"user_identity": "same", "required_services": []}
    headers = {"Idempotency-Key": "k-1"}
    ann = await manager.post(
        "/api/v1/create-session", json=body, headers={**headers, **bearer(ANN_KEY)}
    )
    bob = await manager.post(
        "/api/v1/create-session", json=body, headers={**headers, **bearer(BOB_KEY)}
    )
    assert ann.status == bob.status == 200
    assert (await ann.json())["session_id"] != (await bob.json())["session_id"]


# --- the command line: open only on loopback ------------------------------------------------------


def manager_env() -> dict[str, str]:
    kept = {"SESSION_MANAGER_NETNS"}
    env = {
        key: value
        for key, value in os.environ.items()
        if key in kept or not key.startswith(("SESSION_MANAGER_", "LIVEKIT_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def run_manager(tmp_path: Path, *args: str) -> asyncio.subprocess.Process:
    log = (tmp_path / "manager.log").open("wb")
    with log:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "session_manager",
            *args,
            cwd=tmp_path,  # no config file of the checkout
            env=manager_env(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )


async def test_a_host_that_is_not_loopback_does_not_start_without_keys(tmp_path: Path) -> None:
    require_netns()
    process = await run_manager(tmp_path, "--host", NOT_LOOPBACK, "--port", str(free_port()))
    try:
        assert await asyncio.wait_for(process.wait(), 60) == 2
    finally:
        if process.returncode is None:  # it started: the failure is above; leave nothing
            process.kill()
            await process.wait()
    lines = (tmp_path / "manager.log").read_text().splitlines()
    assert len(lines) == 1 and "api_keys" in lines[0], lines


async def test_with_allow_unauthenticated_it_starts_and_warns(
    tmp_path: Path, livekit: LiveKitUnderTest
) -> None:
    port = free_port()
    process = await run_manager(
        tmp_path,
        *("--host", NOT_LOOPBACK, "--port", str(port), "--allow-unauthenticated", "true"),
        *("--store", "memory", "--livekit-url", livekit.url),
        f"--livekit-api-key={livekit.api_key}",
        f"--livekit-api-secret={livekit.api_secret}",
    )
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(60):
            while True:
                assert process.returncode is None, (tmp_path / "manager.log").read_text()
                try:
                    async with http.get(f"http://{NOT_LOOPBACK}:{port}/health") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    output = (tmp_path / "manager.log").read_text()
    warnings = [line for line in output.splitlines() if "serving without API keys" in line]
    assert len(warnings) == 1 and "WARN" in warnings[0], output


async def test_an_sdk_service_with_a_service_key_registers_and_serves_and_without_one_cannot(
    start_manager: Any,
) -> None:
    from examples.pong.pong import PongHandler
    from session_manager.sdk import MicroserviceRunner, RegistrationError

    manager = await start_manager(api_keys=KEYS)
    url = str(manager.make_url("")).rstrip("/")
    async with MicroserviceRunner("pong-keyed", PongHandler(), manager_url=url, api_key=SVC_A_KEY):
        mine = await manager.get("/api/v1/microservices/pong-keyed", headers=bearer(SVC_A_KEY))
        assert mine.status == 200
        assert (await mine.json())["status"] == "Healthy"
        response = await manager.post(
            "/api/v1/create-session",
            json={"user_identity": "ann", "required_services": ["pong-keyed"]},
            headers=bearer(ANN_KEY),
        )
        assert response.status == 200, await response.text()

    keyless = MicroserviceRunner(
        "pong-keyless",
        PongHandler(),
        manager_url=url,
        registration_backoff=None,
    )
    with pytest.raises(RegistrationError, match="401"):
        await asyncio.wait_for(keyless.start(), 30)
    await keyless.aclose()
