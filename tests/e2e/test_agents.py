"""End to end, `agent:NAME` in required_services (issue 11, part 1): the real `session-manager`
with its managed livekit-server, the `examples.agent_pong` livekit-agents worker as real
processes registered with that LiveKit, the HTTP pong beside it, and a LiveKit client that pings.

Needs the private network namespace of scripts/test.sh: WebRTC ignores loopback candidates.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.failover_harness import JsonDict, Stack, free_port, poll, running_manager
from tests.e2e.processes import REPO_ROOT, ChildProcess, require_netns
from tests.e2e.test_failover import FAST_SETTINGS, Timeline, pinging, pong_from
from tests.e2e.test_ping_pong import PONG, Client, connected_client

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

API_KEY = "agentskey"
WORKER_START_TIMEOUT = 60.0  # importing livekit-agents and registering with LiveKit
PONG_TIMEOUT = 30.0
# LiveKit reports a SIGKILLed agent gone only after ~21 s; then a new dispatch and its join.
FAILOVER_TIMEOUT = 90.0
ACTIVE_TIMEOUT = 15.0
AGENT_IDENTITY = re.compile(r"agent-AJ_\w+")


@dataclass
class Agents:
    """A running manager, and what a livekit-agents worker needs to register with its LiveKit."""

    stack: Stack
    livekit_url: str
    secret: str

    async def start_workers(self, count: int) -> list[ChildProcess]:
        """`count` agent_pong workers registered as "pong", each with its own health port and
        in a process group of its own (killed whole by the test, its job processes with it);
        returns once each has registered with LiveKit."""
        started = []
        for _ in range(count):
            env = {
                "LIVEKIT_URL": self.livekit_url,
                "LIVEKIT_API_KEY": API_KEY,
                "LIVEKIT_API_SECRET": self.secret,
                "AGENT_PONG_HEALTH_PORT": str(free_port()),
            }
            argv = [sys.executable, "-m", "examples.agent_pong", "start"]
            name = f"agent-pong-{len(self.workers)}"
            child = await self.stack.children.start(
                name, argv, REPO_ROOT, env=env, new_session=True
            )
            self.workers.append(child)
            started.append(child)
        for child in started:
            await poll(
                lambda child=child: registered(child),  # type: ignore[misc]
                bool,
                WORKER_START_TIMEOUT,
                f"{child.name} registered with LiveKit",
            )
        return started

    workers: list[ChildProcess] = field(default_factory=list)


async def registered(child: ChildProcess) -> bool:
    if not child.running:
        pytest.fail(f"{child.name} exited with {child.process.returncode}")
    return "registered worker" in child.log_text()


@asynccontextmanager
async def agents_manager(tmp_path: Path, **settings: float | int | str) -> AsyncIterator[Agents]:
    """The manager with a LiveKit whose port and key pair the workers are told; the workers
    are SIGKILLed (whole process groups) before the manager stops."""
    secret = secrets.token_urlsafe(32)
    port = free_port()
    all_settings: dict[str, float | int | str] = {
        **FAST_SETTINGS,
        "livekit_port": port,
        "livekit_api_key": API_KEY,
        "livekit_api_secret": secret,
        **settings,
    }
    async with running_manager(tmp_path, **all_settings) as stack:
        agents = Agents(stack, f"ws://127.0.0.1:{port}", secret)
        try:
            yield agents
        finally:
            for child in agents.workers:
                kill_group(child)
                with suppress(ProcessLookupError):
                    await child.process.wait()


def kill_group(child: ChildProcess) -> None:
    with suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)


async def pong_from_agent(client: Client, timeout: float, not_from: str | None = None) -> str:
    """The identity of the first livekit-agents participant (other than `not_from`) that
    answers b"pong"."""

    async def listen() -> str:
        while True:
            packet = await client.packets.get()
            sender = packet.participant.identity if packet.participant is not None else ""
            if packet.data == PONG and AGENT_IDENTITY.fullmatch(sender) and sender != not_from:
                return sender

    try:
        return await asyncio.wait_for(listen(), timeout)
    except TimeoutError:
        pytest.fail(f"no pong from an agent within {timeout} s")


def agent_slot(view: JsonDict) -> JsonDict:
    (slot,) = (s for s in view["services"] if s["requirement"] == "agent:pong")
    return slot  # type: ignore[no-any-return]


def job_lines(worker: ChildProcess, session_id: str) -> list[str]:
    return [
        line
        for line in worker.log_text().splitlines()
        if "agent_pong job" in line and f"session_id={session_id}" in line
    ]


# ------------------------------------------------------------------------------------ the tests


async def test_an_agent_session_turns_ready_and_the_agent_answers(tmp_path: Path) -> None:
    require_netns()
    async with agents_manager(tmp_path) as agents:
        [worker] = await agents.start_workers(1)
        api = agents.stack.api
        body = {
            "user_identity": "agent-user",
            "required_services": ["agent:pong"],
            "metadata": {"language": "fr", "robot": "r2"},
            "wait_until_ready": True,
        }
        created = await api.ok("POST", "/api/v1/create-session", body)
        assert created["status"] == "Ready", created
        session_id = created["session_id"]
        view = await api.session(session_id)
        slot = agent_slot(view)
        assert slot["state"] == "joined" and slot["joined_at"] is not None, slot
        assert slot["dispatch_id"], slot
        # The worker got the job with the session's metadata.
        [line] = job_lines(worker, session_id)
        assert 'metadata={"language": "fr", "robot": "r2"}' in line, line

        async with connected_client(created["livekit_url"], created["access_token"]) as client:
            async with pinging(client):
                await pong_from_agent(client, PONG_TIMEOUT)
            await api.wait_for_status(session_id, "Active", ACTIVE_TIMEOUT)
            ended = await api.ok("DELETE", f"/api/v1/sessions/{session_id}")
            assert ended["status"] == "Terminated", ended


async def test_a_killed_agent_is_dispatched_again(tmp_path: Path) -> None:
    require_netns()
    async with agents_manager(tmp_path) as agents:
        workers = await agents.start_workers(2)
        api = agents.stack.api
        created = await api.create_session("agent-failover-user", ["agent:pong"])
        assert created["status"] == "Ready", created
        session_id = created["session_id"]
        first_dispatch = agent_slot(await api.session(session_id))["dispatch_id"]
        [serving] = [w for w in workers if job_lines(w, session_id)]

        async with connected_client(created["livekit_url"], created["access_token"]) as client:
            async with pinging(client):
                first = await pong_from_agent(client, PONG_TIMEOUT)
                await api.wait_for_status(session_id, "Active", ACTIVE_TIMEOUT)

                timeline = Timeline()
                kill_group(serving)
                await api.wait_for_status(session_id, "WaitingForServices", FAILOVER_TIMEOUT)
                timeline.mark("session WaitingForServices")
                second = await pong_from_agent(client, FAILOVER_TIMEOUT, not_from=first)
                timeline.mark("pong from the new agent")
                view = await api.wait_for_status(session_id, "Active", ACTIVE_TIMEOUT)
                print(f"agent failover after SIGKILL: {timeline.report()}")
        assert second != first
        slot = agent_slot(view)
        assert slot["state"] == "joined" and slot["redispatches"] == 1, slot
        assert slot["dispatch_id"] != first_dispatch, slot
        [other] = [w for w in workers if w is not serving]
        assert job_lines(other, session_id), "the new dispatch went to the other worker"
        changes = await api.ok("GET", f"/api/v1/events?session_id={session_id}&since=0&limit=1000")
        statuses = [
            e["data"]["new"] for e in changes["events"] if e["type"] == "SessionStatusChanged"
        ]
        up = ["WaitingForServices", "Ready", "Active"]
        assert statuses == up + up, statuses


async def test_an_agent_and_an_http_service_in_one_session(tmp_path: Path) -> None:
    require_netns()
    async with agents_manager(tmp_path) as agents:
        await agents.start_workers(1)
        await agents.stack.start_pong("pong-http")
        api = agents.stack.api
        created = await api.create_session("mixed-user", ["pong-http", "agent:pong"])
        assert created["status"] == "Ready", created
        view = await api.session(created["session_id"])
        assert {(s["requirement"], s["state"]) for s in view["services"]} == {
            ("pong-http", "joined"),
            ("agent:pong", "joined"),
        }, view["services"]
        async with connected_client(created["livekit_url"], created["access_token"]) as client:
            async with pinging(client):
                await pong_from(client, "pong-http", PONG_TIMEOUT)
                await pong_from_agent(client, PONG_TIMEOUT)


async def test_no_worker_ends_the_session_saying_so(tmp_path: Path) -> None:
    require_netns()
    async with agents_manager(tmp_path, join_timeout=5) as agents:
        api = agents.stack.api
        body = {"user_identity": "lonely-user", "required_services": ["agent:nobody"]}
        created = await api.ok("POST", "/api/v1/create-session", body)
        assert created["status"] == "WaitingForServices", created
        view = await api.wait_for_status(created["session_id"], "Terminated", 20)
        assert view["reason"] == (
            "Timeout waiting for microservices to join: no agent worker nobody joined"
        ), view
