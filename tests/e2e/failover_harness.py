"""Helpers for the failover end-to-end tests: a real `session-manager` (with its managed
livekit-server) on random free ports, real pong instances, the manager's HTTP API, and polling
with deadlines. Processes are started and cleaned up by tests.e2e.processes, as in
test_ping_pong. `pongs_for` gives the same pongs to a manager the test runs in-process.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from tests.e2e.processes import (
    POLL_INTERVAL,
    REPO_ROOT,
    ChildProcess,
    Children,
    NotHealthy,
    session_manager_child,
    session_manager_command,
)
from tests.e2e.processes import require_netns as require_netns  # test_failover's, re-exported

T = TypeVar("T")
JsonDict = dict[str, Any]

REGISTRATION_TIMEOUT = 20.0
HTTP_TIMEOUT = 30.0


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def manager_flags(port: int, **settings: float | int | str) -> list[str]:
    """Flags for a manager on `port` with its LiveKit on free ports and an in-memory store;
    `settings` (snake_case names) become further `--flag value` pairs."""
    flags = {
        "port": port,
        "livekit_port": free_port(),
        "livekit_rtc_tcp_port": free_port(),
        "livekit_rtc_udp_port": free_port(socket.SOCK_DGRAM),
        "store": "memory",
        "shutdown_timeout": 5,
        **settings,
    }
    return settings_flags(flags)


def settings_flags(settings: Mapping[str, object]) -> list[str]:
    """Settings (snake_case names) as the manager's `--flag value` pairs."""
    argv: list[str] = []
    for name, value in settings.items():
        argv.append(f"--{name.replace('_', '-')}={value}")  # "=": a value may start with "-"
    return argv


def pong_command(service_id: str, port: int, manager_url: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "examples.pong",
        "--service-id",
        service_id,
        "--port",
        str(port),
        "--manager-url",
        manager_url,
        "--type",
        "PONG",
    ]


# ------------------------------------------------------------------------------------- polling


async def poll(
    fetch: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout: float, what: str
) -> T:
    """Call `fetch` until `done` accepts its result; fail with the last result at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = await fetch()
        if done(value):
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"{what} not reached within {timeout} s; last seen: {value!r}")
        await asyncio.sleep(POLL_INTERVAL)


# ----------------------------------------------------------------------------------- HTTP API


@dataclass
class Api:
    http: aiohttp.ClientSession
    base_url: str

    async def call(
        self, method: str, path: str, body: JsonDict | None = None
    ) -> tuple[int, JsonDict]:
        async with self.http.request(method, self.base_url + path, json=body) as response:
            answer: JsonDict = await response.json(content_type=None)
            return response.status, answer

    async def ok(self, method: str, path: str, body: JsonDict | None = None) -> JsonDict:
        status, answer = await self.call(method, path, body)
        assert status == 200, f"{method} {path}: HTTP {status}: {answer}"
        return answer

    async def session(self, session_id: str) -> JsonDict:
        return await self.ok("GET", f"/api/v1/sessions/{session_id}")

    async def microservice(self, service_id: str) -> JsonDict:
        return await self.ok("GET", f"/api/v1/microservices/{service_id}")

    async def create_session(self, user_identity: str, required: list[str]) -> JsonDict:
        body = {
            "user_identity": user_identity,
            "required_services": required,
            "wait_until_ready": True,
        }
        return await self.ok("POST", "/api/v1/create-session", body)

    async def wait_for_status(self, session_id: str, status: str, timeout: float) -> JsonDict:
        return await poll(
            lambda: self.session(session_id),
            lambda view: view["status"] == status,
            timeout,
            f"session {session_id} {status}",
        )


async def check_healthy(api: Api) -> None:
    status, body = await api.call("GET", "/health")
    if status != 200 or body.get("status") != "healthy":
        raise NotHealthy(f"HTTP {status}: {body}")


# ------------------------------------------------------------------------------ the processes


@dataclass
class Pong:
    service_id: str
    url: str
    child: ChildProcess

    async def health(self, http: aiohttp.ClientSession) -> JsonDict:
        async with http.get(f"{self.url}/health") as response:
            assert response.status == 200, await response.text()
            body: JsonDict = await response.json()
            return body


async def start_pong(
    children: Children,
    api: Api,
    service_id: str,
    *extra: str,
    name: str | None = None,
    port: int | None = None,
) -> Pong:
    """A pong process registering itself as `service_id` with the manager behind `api`, on
    `port` (default: a free one), with pong's `extra` flags; returns once the manager lists it
    Healthy. `name` (default: the service id) names its log file, for a service id started more
    than once."""
    port = port or free_port()
    command = pong_command(service_id, port, api.base_url) + list(extra)
    child = await children.start(name or service_id, command, REPO_ROOT)
    pong = Pong(service_id, f"http://127.0.0.1:{port}", child)

    async def registration() -> str | None:
        if not child.running:
            pytest.fail(f"{service_id} exited with {child.process.returncode}")
        status, body = await api.call("GET", f"/api/v1/microservices/{service_id}")
        return str(body["status"]) if status == 200 else None

    await poll(
        registration,
        lambda status: status == "Healthy",
        REGISTRATION_TIMEOUT,
        f"{service_id} registered and Healthy",
    )
    return pong


@dataclass
class Stack:
    """A running manager and the pongs started against it."""

    api: Api
    children: Children
    manager: ChildProcess | None  # None: the test runs the manager in-process
    pongs: dict[str, Pong]

    async def start_pong(
        self, service_id: str, *extra: str, name: str | None = None, port: int | None = None
    ) -> Pong:
        pong = await start_pong(self.children, self.api, service_id, *extra, name=name, port=port)
        self.pongs[service_id] = pong
        return pong


@asynccontextmanager
async def pongs_for(manager_url: str, log_dir: Path) -> AsyncIterator[Stack]:
    """Pongs (and any other child) for a manager running in this test process at
    `manager_url`: every child is stopped when the block ends, passed or failed (and dies with
    this process if it is killed); on failure each child's log tail is printed."""
    require_netns()
    children = Children(log_dir)
    # No kept-alive connections: the test may restart the manager on the same port.
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        try:
            yield Stack(Api(http, manager_url.rstrip("/")), children, None, {})
        except BaseException:
            await children.stop_all()
            children.print_log_tails()
            raise
        await children.stop_all()


@asynccontextmanager
async def running_manager(tmp_path: Path, **settings: float | int | str) -> AsyncIterator[Stack]:
    """Start `session-manager` with `settings` as flags; on exit stop every child (manager last),
    check the manager exited 0 and left no livekit-server, and print log tails on failure."""
    require_netns()
    port = free_port()
    command = session_manager_command() + manager_flags(port, **settings)
    async with (
        session_manager_child(tmp_path, command) as manager,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT)) as http,
    ):
        api = Api(http, f"http://127.0.0.1:{port}")
        errors = (aiohttp.ClientError, TimeoutError, ValueError)
        await manager.wait_for_health(lambda: check_healthy(api), expected="healthy", errors=errors)
        manager.find_livekit()
        yield Stack(api, manager.children, manager.child, {})
