"""End to end, as a user would do it: the real `session-manager` with its embedded defaults (and
its managed livekit-server), the pong example as a real microservice, the API document's curl
examples run verbatim, and a LiveKit client that pings and must get pong back from the service.

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
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from livekit import rtc

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

REPO_ROOT = Path(__file__).resolve().parents[2]
SPEC_PATH = Path(__file__).resolve().parents[3] / "shared/spec/session-manager-api.md"
MANAGER_URL = "http://127.0.0.1:8080"  # the manager's default listen address
PONG_PORT = 8001  # the spec's example endpoint is http://localhost:8001
SPEC_SERVICE_ID = "asr-service-1"  # registered by the spec's curl example, pointing at pong
PONG_SERVICE_ID = "pong-service-1"  # what pong registers itself as

HEALTH_TIMEOUT = 60.0
REGISTRATION_TIMEOUT = 20.0
PING_PONG_TIMEOUT = 20.0
ACTIVE_TIMEOUT = 10.0
STOP_TIMEOUT = 30.0  # the manager's shutdown has several stages of up to 10 s each
POLL_INTERVAL = 0.1
PING_INTERVAL = 0.3
PING = b"ping"
PONG = b"pong"
LOG_TAIL_LINES = 80

CREATE_ANSWER_FIELDS = {"session_id", "room_name", "access_token", "livekit_url", "status"}
# Settings a developer's shell may carry; the manager must run on its embedded defaults here.
_SETTING_ENV_PREFIXES = ("SESSION_MANAGER_", "LIVEKIT_")
_KEPT_ENV = frozenset({"SESSION_MANAGER_NETNS"})


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
    """Run `command` with `bash -c` and parse what it prints as one JSON object."""
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, (
        f"command failed ({process.returncode}): {command}\n{stderr.decode(errors='replace')}"
    )
    try:
        answer = json.loads(stdout)
    except ValueError:
        pytest.fail(f"not JSON from {command!r}: {stdout.decode(errors='replace')!r}")
    assert isinstance(answer, dict), answer
    return answer


# ------------------------------------------------------------------------------- child processes


def child_environment() -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key in _KEPT_ENV or not key.startswith(_SETTING_ENV_PREFIXES)
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


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

    async def start(self, name: str, argv: list[str], cwd: Path) -> ChildProcess:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log_file:  # the child keeps its own copy of the descriptor
            process = await asyncio.create_subprocess_exec(
                *argv,
                cwd=cwd,
                env=child_environment(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
            )
        child = ChildProcess(name, process, log_path)
        self.started.append(child)
        return child

    async def stop_all(self) -> None:
        """SIGTERM each child, last started first; SIGKILL one that outlives STOP_TIMEOUT."""
        for child in reversed(self.started):
            await stop_process(child)

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


def session_manager_command() -> list[str]:
    script = Path(sys.executable).with_name("session-manager")
    if not script.exists():
        script = REPO_ROOT / ".venv" / "bin" / "session-manager"
    if not script.exists():
        pytest.fail(
            "the session-manager console script is not installed (run scripts/bootstrap.sh)"
        )
    return [str(script)]


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


async def wait_for_health(http: aiohttp.ClientSession, manager: ChildProcess) -> dict[str, Any]:
    deadline = time.monotonic() + HEALTH_TIMEOUT
    last_error = "no attempt yet"
    while time.monotonic() < deadline:
        if not manager.running:
            pytest.fail(f"session-manager exited with {manager.process.returncode} before /health")
        try:
            async with http.get(f"{MANAGER_URL}/health") as response:
                if response.status == 200:
                    body: dict[str, Any] = await response.json()
                    return body
                last_error = f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError) as error:
            last_error = repr(error)
        await asyncio.sleep(POLL_INTERVAL)
    pytest.fail(f"GET /health did not answer 200 within {HEALTH_TIMEOUT} s: {last_error}")


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


async def test_spec_examples_ping_pong_end_to_end(tmp_path: Path) -> None:
    if os.environ.get("SESSION_MANAGER_NETNS") != "1":
        pytest.fail("run through scripts/test.sh: this test needs the private network namespace")
    usage_example_commands(SPEC_PATH)  # a missing document fails before anything starts

    manager_cwd = tmp_path / "manager-cwd"  # its SQLite store lands under ./var here
    manager_cwd.mkdir()
    children = Children(tmp_path)
    manager = await children.start("session-manager", session_manager_command(), manager_cwd)
    livekit_pids: set[int] = set()
    try:
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
                health = await wait_for_health(http, manager)
                assert health["status"] == "healthy", health
                livekit_pids = livekit_children(manager.pid)
                assert livekit_pids, "the manager started no livekit-server child"

                pong = await children.start("pong", pong_command(), REPO_ROOT)
                await wait_for_log_line(
                    pong, "registered with the session manager", REGISTRATION_TIMEOUT
                )

                await spec_walkthrough(http)
                await waiting_create_walkthrough(http)
        finally:
            await children.stop_all()
        assert manager.process.returncode == 0, (
            f"session-manager exited with {manager.process.returncode}"
        )
        left = {pid for pid in livekit_pids if is_alive(pid)}
        kill_leftovers(left)
        assert not left, f"livekit-server processes left running after the manager: {left}"
    except BaseException:
        children.print_log_tails()
        raise
