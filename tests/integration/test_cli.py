"""The `session-manager` command as a real process: the operator's subcommands against a live
manager (tables and --json), and `serve`, also as the default without a subcommand."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from session_manager.client import SessionManagerClient
from tests.conftest import LiveKitUnderTest, free_port
from tests.fake_services import ScriptedService, accept_without_joining

pytestmark = pytest.mark.integration

COMMAND = str(Path(sys.executable).with_name("session-manager"))


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


async def cli(*args: str, env: dict[str, str] | None = None) -> Run:
    process = await asyncio.create_subprocess_exec(
        COMMAND,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


def url_of(manager: Any) -> str:
    return str(manager.make_url("")).rstrip("/")


async def test_sessions_create_list_show_delete(manager: Any) -> None:
    url = url_of(manager)
    created = await cli("create-session", "--user", "alice", "--url", url, "--json")
    assert created.code == 0, created.err
    session_id = created.json()["session_id"]
    assert created.json()["status"] == "Ready"
    table = await cli("create-session", "--user", "bob", "--name", "Bob", "--url", url)
    assert table.code == 0, table.err
    assert "session_id" in table.out and "access_token" in table.out

    # The URL from the environment this time.
    listed = await cli("sessions", "list", env={"SESSION_MANAGER_URL": url})
    assert listed.code == 0, listed.err
    header, *rows = listed.out.splitlines()
    assert header.split() == ["SESSION", "STATUS", "USER", "SERVICES", "CREATED"]
    assert len(rows) == 2
    assert any(row.split()[:3] == [session_id, "Ready", "alice"] for row in rows)
    as_json = (await cli("sessions", "list", "--json", "--url", url)).json()
    assert {s["user_identity"] for s in as_json} == {"alice", "bob"}
    assert len((await cli("sessions", "list", "--limit", "1", "--json", "--url", url)).json()) == 1

    shown = await cli("sessions", "show", session_id, "--url", url)
    assert shown.code == 0, shown.err
    assert ["status", "Ready"] in [line.split() for line in shown.out.splitlines()]
    assert (await cli("sessions", "show", session_id, "--json", "--url", url)).json()[
        "session_id"
    ] == session_id

    deleted = await cli("sessions", "delete", session_id, "--json", "--url", url)
    assert deleted.code == 0, deleted.err
    assert deleted.json()["status"] == "Terminated"

    missing = await cli("sessions", "show", "no-such-session", "--url", url)
    assert missing.code == 1
    assert "HTTP 404 NotFound" in missing.err


async def test_services_list_show_drain_delete(manager: Any) -> None:
    url = url_of(manager)
    async with (
        ScriptedService(accept_without_joining).running() as service,
        SessionManagerClient(url) as client,
    ):
        await client.register_service("svc-cli", service.endpoint, {"type": "ASR"})

        listed = await cli("services", "list", "--url", url)
        assert listed.code == 0, listed.err
        header, row = listed.out.splitlines()
        assert header.split() == ["SERVICE", "STATUS", "DRAINING", "SESSIONS", "TYPE", "ENDPOINT"]
        assert row.split()[0] == "svc-cli" and row.split()[-2:] == ["ASR", service.endpoint]
        assert [
            s["service_id"] for s in (await cli("services", "list", "--json", "--url", url)).json()
        ] == ["svc-cli"]

        shown = await cli("services", "show", "svc-cli", "--url", url)
        assert ["endpoint", service.endpoint] in [line.split() for line in shown.out.splitlines()]
        drained = await cli("services", "drain", "svc-cli", "--json", "--url", url)
        assert drained.code == 0, drained.err
        assert drained.json()["draining"] is True
        assert (await client.get_service("svc-cli")).draining

        gone = await cli("services", "delete", "svc-cli", "--url", url)
        assert gone.code == 0, gone.err
        assert gone.out.startswith("svc-cli: ")
        assert await client.list_services() == []


async def test_events_tail(manager: Any) -> None:
    url = url_of(manager)
    async with SessionManagerClient(url) as client:
        created = await client.create_session("carol", [])
        await client.create_session("dan", [])
        await client.delete_session(created.session_id)

    tail = await cli(
        "events", "tail", "--session", created.session_id, "--since", "0", "--count", "3",
        "--json", "--url", url,
    )  # fmt: skip
    assert tail.code == 0, tail.err
    events = [json.loads(line) for line in tail.out.splitlines()]
    assert [e["session_id"] for e in events] == [created.session_id] * 3
    assert events[0]["type"] == "SessionCreated"
    assert [e["id"] for e in events] == sorted({e["id"] for e in events})

    table = await cli(
        "events", "tail", "--type", "SessionTerminated", "--since", "0", "--count", "1",
        "--url", url,
    )  # fmt: skip
    assert table.code == 0, table.err
    header, line = table.out.splitlines()
    assert header.split() == ["ID", "TIMESTAMP", "TYPE", "SESSION", "SERVICE", "DATA"]
    assert line.split()[2:4] == ["SessionTerminated", created.session_id]


async def test_a_live_tail_prints_events_as_they_happen(manager: Any) -> None:
    url = url_of(manager)
    process = await asyncio.create_subprocess_exec(
        COMMAND, "events", "tail", "--json", "--url", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        async with SessionManagerClient(url) as client:
            # The tail subscribes from now: create until its first event shows.
            line, created = b"", set()
            for _ in range(50):
                created.add((await client.create_session("erin", [])).session_id)
                try:
                    line = await asyncio.wait_for(process.stdout.readline(), 0.5)
                    break
                except TimeoutError:
                    continue
        event = json.loads(line)
        assert event["session_id"] in created and event["type"].startswith("Session")
    finally:
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 10) in (0, 130)


@pytest.mark.parametrize("subcommand", [[], ["serve"]], ids=["no-subcommand", "serve"])
async def test_serve_with_and_without_the_subcommand(
    subcommand: list[str], livekit: LiveKitUnderTest, tmp_path: Path
) -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        COMMAND,
        *subcommand,
        "--port", str(port),
        "--data-dir", str(tmp_path / "state"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={
            **os.environ,
            "LIVEKIT_URL": livekit.url,
            "LIVEKIT_API_KEY": livekit.api_key,
            "LIVEKIT_API_SECRET": livekit.api_secret,
        },
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/health") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert process.returncode is None, "session-manager exited"
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("session-manager never answered /health")
        listed = await cli("sessions", "list", "--json", "--url", f"http://127.0.0.1:{port}")
        assert (listed.code, listed.json()) == (0, [])
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 20)
    assert code == 0
