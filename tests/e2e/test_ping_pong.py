"""End to end, as a user would do it: the real `session-manager` with its embedded defaults (and
its managed livekit-server), the pong example as a real microservice, the API document's curl
examples run verbatim, and a LiveKit client that pings and must get pong back from the service.

The examples are read from tests/data/session-manager-api.md, a verbatim copy of the user's API
document (shared/spec/session-manager-api.md beside the repository), kept in step by
test_the_contract_copy_is_the_shared_spec.

Needs the private network namespace of scripts/test.sh: WebRTC ignores loopback candidates.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from livekit import rtc

from session_manager.livekit.server import die_with_parent
from tests.e2e.processes import (
    POLL_INTERVAL,
    REPO_ROOT,
    ChildProcess,
    NotHealthy,
    child_environment,
    require_netns,
    session_manager_child,
    session_manager_command,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

# The contract's examples, kept in the repository; SHARED_SPEC_PATH is the user's document they
# are copied from (shared/ beside the repository, as in CI: `bash .ci/run` in a fresh clone).
SPEC_PATH = REPO_ROOT / "tests" / "data" / "session-manager-api.md"
SHARED_SPEC_PATH = REPO_ROOT.parent / "shared" / "spec" / "session-manager-api.md"
SHELL_TIMEOUT = 30.0
MANAGER_URL = "http://127.0.0.1:8080"  # the manager's default listen address
PONG_PORT = 8001  # the spec's example endpoint is http://localhost:8001
SPEC_SERVICE_ID = "asr-service-1"  # registered by the spec's curl example, pointing at pong
PONG_SERVICE_ID = "pong-service-1"  # what pong registers itself as

REGISTRATION_TIMEOUT = 20.0
PING_PONG_TIMEOUT = 20.0
ACTIVE_TIMEOUT = 10.0
PING_INTERVAL = 0.3
PING = b"ping"
PONG = b"pong"

CREATE_ANSWER_FIELDS = {"session_id", "room_name", "access_token", "livekit_url", "status"}


# --------------------------------------------------------------------------- the spec's examples


def usage_example_commands(spec: Path) -> list[str]:
    """The two ```bash blocks of the spec's "使用示例" section, exactly as written there."""
    if not spec.is_file():
        pytest.fail(f"the user's API document is missing: expected it at {spec}")
    text = spec.read_text(encoding="utf-8")
    section = re.search(r"^## 使用示例[^\n]*\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if section is None:
        pytest.fail(f'no "## 使用示例" section in {spec}')
    blocks = re.findall(r"^```bash[^\n]*\n(.*?)^```", section.group(1), re.M | re.S)
    if len(blocks) != 2:
        pytest.fail(f'expected 2 bash blocks in "使用示例" of {spec}, found {len(blocks)}')
    return [str(block) for block in blocks]


async def run_shell_json(command: str, env: dict[str, str]) -> dict[str, Any]:
    """Run `command` with `bash -c` and parse what it prints as one JSON object.

    bash runs in a process group of its own: when it does not finish in time (or the test is
    cancelled) that whole group, the curl it started included, is killed."""
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=SHELL_TIMEOUT)
    except TimeoutError:
        pytest.fail(f"command did not finish within {SHELL_TIMEOUT} s: {command}")
    finally:
        if process.returncode is None:  # timed out or cancelled: bash and the curl it runs
            kill_process_group(process.pid)
            await process.wait()
    assert process.returncode == 0, (
        f"command failed ({process.returncode}): {command}\n{stderr.decode(errors='replace')}"
    )
    try:
        answer = json.loads(stdout)
    except ValueError:
        pytest.fail(f"not JSON from {command!r}: {stdout.decode(errors='replace')!r}")
    assert isinstance(answer, dict), answer
    return answer


def kill_process_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is gone: nothing is left of it


# ------------------------------------------------------------------------------- child processes


def pong_command() -> list[str]:
    return [
        sys.executable,
        "-m",
        "examples.pong",
        "--service-id",
        PONG_SERVICE_ID,
        "--port",
        str(PONG_PORT),
        "--manager-url",
        MANAGER_URL,
    ]


# ------------------------------------------------------------------------------------ waiting


async def get_health(http: aiohttp.ClientSession) -> dict[str, Any]:
    async with http.get(f"{MANAGER_URL}/health") as response:
        if response.status != 200:
            raise NotHealthy(f"HTTP {response.status}")
        body: dict[str, Any] = await response.json()
        return body


async def wait_for_log_line(child: ChildProcess, needle: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in child.log_text():
            return
        if not child.running:
            pytest.fail(f"{child.name} exited with {child.process.returncode} before {needle!r}")
        await asyncio.sleep(POLL_INTERVAL)
    pytest.fail(f"{child.name} did not log {needle!r} within {timeout} s")


async def get_session(http: aiohttp.ClientSession, session_id: str) -> dict[str, Any]:
    async with http.get(f"{MANAGER_URL}/api/v1/sessions/{session_id}") as response:
        assert response.status == 200, await response.text()
        view: dict[str, Any] = await response.json()
        return view


async def wait_for_status(
    http: aiohttp.ClientSession, session_id: str, status: str, timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    view = await get_session(http, session_id)
    while view["status"] != status:
        if time.monotonic() >= deadline:
            pytest.fail(f"session {session_id} not {status} within {timeout} s; last view {view}")
        await asyncio.sleep(POLL_INTERVAL)
        view = await get_session(http, session_id)
    return view


# ------------------------------------------------------------------------------- LiveKit client


@dataclass
class Client:
    room: rtc.Room
    packets: asyncio.Queue[rtc.DataPacket]


@asynccontextmanager
async def connected_client(livekit_url: str, token: str) -> AsyncIterator[Client]:
    room = rtc.Room()
    packets: asyncio.Queue[rtc.DataPacket] = asyncio.Queue()
    room.on("data_received", packets.put_nowait)
    try:
        await asyncio.wait_for(room.connect(livekit_url, token), timeout=15)
        yield Client(room, packets)
    finally:
        await room.disconnect()


async def send_pings(room: rtc.Room) -> None:
    """A service subscribes to data only once it has joined, so early pings may go unheard."""
    while True:
        await room.local_participant.publish_data(PING, reliable=True)
        await asyncio.sleep(PING_INTERVAL)


async def first_pong_sender(client: Client) -> str:
    """Identity of the first participant known to the client that answers b"pong".

    LiveKit may tell the client about a data-only participant seconds after its packets already
    flow; a pong from a still unknown sender is skipped and the next one awaited.
    """
    while True:
        packet = await client.packets.get()
        if packet.data == PONG and packet.participant is not None:
            return packet.participant.identity


async def ping_until_pong(client: Client) -> str:
    """Ping until a pong comes back; the identity of the participant that answered."""
    pinger = asyncio.create_task(send_pings(client.room), name="pinger")
    listener = asyncio.create_task(first_pong_sender(client), name="pong listener")
    try:
        done, _ = await asyncio.wait(
            {pinger, listener}, timeout=PING_PONG_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        if listener in done:
            return listener.result()
        if pinger in done:
            pinger.result()  # raises why sending failed
        pytest.fail(f"no pong from a known participant within {PING_PONG_TIMEOUT} s")
    finally:
        for task in (pinger, listener):
            task.cancel()
        await asyncio.gather(pinger, listener, return_exceptions=True)


# ------------------------------------------------------------------------------------ checks


def assert_create_answer(answer: dict[str, Any], allowed_status: set[str]) -> None:
    assert set(answer) == CREATE_ANSWER_FIELDS, answer
    session_id = answer["session_id"]
    parsed = uuid.UUID(session_id)
    assert parsed.version == 4 and str(parsed) == session_id, session_id
    assert answer["room_name"] == f"room-{session_id}"
    assert answer["livekit_url"].startswith(("ws://", "wss://")), answer["livekit_url"]
    assert answer["access_token"].count(".") == 2, "access_token is not a JWT"
    assert answer["status"] in allowed_status, answer["status"]


def assert_service_joined(view: dict[str, Any], service_id: str) -> None:
    slots = [slot for slot in view["services"] if slot["service_id"] == service_id]
    assert len(slots) == 1, view["services"]
    slot = slots[0]
    assert slot["state"] == "joined", slot
    join_ms = slot["join_ms"]
    assert isinstance(join_ms, int | float) and not isinstance(join_ms, bool), slot
    assert join_ms >= 0, slot


async def create_session_waiting(
    http: aiohttp.ClientSession, user_identity: str, service_id: str
) -> dict[str, Any]:
    body = {
        "user_identity": user_identity,
        "required_services": [service_id],
        "wait_until_ready": True,
    }
    async with http.post(f"{MANAGER_URL}/api/v1/create-session", json=body) as response:
        text = await response.text()
        assert response.status == 200, f"HTTP {response.status}: {text}"
        answer: dict[str, Any] = json.loads(text)
        return answer


# ------------------------------------------------------------------------------------ the test


async def spec_walkthrough(http: aiohttp.ClientSession) -> None:
    register_example, create_example = usage_example_commands(SPEC_PATH)
    env = child_environment()

    registered = await run_shell_json(register_example, env)
    assert registered["success"] is True, registered
    assert registered["service_id"] == SPEC_SERVICE_ID, registered
    assert isinstance(registered.get("message"), str), registered

    started = time.monotonic()
    created = await run_shell_json(create_example, env)
    assert_create_answer(created, {"WaitingForServices", "Ready"})
    session_id = created["session_id"]

    async with connected_client(created["livekit_url"], created["access_token"]) as client:
        assert await ping_until_pong(client) == SPEC_SERVICE_ID
        pong_after = time.monotonic() - started
        view = await wait_for_status(http, session_id, "Active", ACTIVE_TIMEOUT)
        assert_service_joined(view, SPEC_SERVICE_ID)
        assert view["client"]["joined"] is True, view["client"]
        assert view["user_name"] == "张三", view["user_name"]
        assert view["user_identity"] == "user123", view["user_identity"]
        print(
            f"spec session: created {created['status']}, ready_ms={view['ready_ms']}, "
            f"join_ms={view['services'][0]['join_ms']}, first pong after {pong_after:.2f} s"
        )


async def waiting_create_walkthrough(http: aiohttp.ClientSession) -> None:
    started = time.monotonic()
    created = await create_session_waiting(http, "user456", PONG_SERVICE_ID)
    ready_after = time.monotonic() - started
    assert_create_answer(created, {"Ready"})
    async with connected_client(created["livekit_url"], created["access_token"]) as client:
        assert await ping_until_pong(client) == PONG_SERVICE_ID
        pong_after = time.monotonic() - started
    print(
        f"waiting create: Ready answered after {ready_after:.2f} s, "
        f"first pong after {pong_after:.2f} s"
    )


def test_the_contract_copy_is_the_shared_spec() -> None:
    """tests/data/session-manager-api.md is byte for byte the user's document beside the
    repository; CI runs with shared/ there, so its absence is a failure, not a skip."""
    if not SHARED_SPEC_PATH.is_file():
        pytest.fail(
            f"the user's API document is missing at {SHARED_SPEC_PATH}: the suite runs with "
            "shared/ beside the repository (as CI does), so the copy in tests/data cannot be "
            "checked against it"
        )
    copy = SPEC_PATH.read_bytes()
    assert copy == SHARED_SPEC_PATH.read_bytes(), (
        f"{SPEC_PATH} differs from {SHARED_SPEC_PATH}: copy the document again (verbatim)"
    )


async def test_spec_examples_ping_pong_end_to_end(tmp_path: Path) -> None:
    require_netns()
    usage_example_commands(SPEC_PATH)  # a missing document fails before anything starts

    async with (
        session_manager_child(tmp_path, session_manager_command()) as manager,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
    ):
        health = await manager.wait_for_health(lambda: get_health(http), expected="200")
        assert health["status"] == "healthy", health
        manager.find_livekit()

        pong = await manager.children.start("pong", pong_command(), REPO_ROOT)
        await wait_for_log_line(pong, "registered with the session manager", REGISTRATION_TIMEOUT)

        await spec_walkthrough(http)
        await waiting_create_walkthrough(http)
