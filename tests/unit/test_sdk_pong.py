"""The pong example: what it answers, to whom, and that it runs as a real process."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from livekit import rtc

from session_manager.sdk import JoinedSession

REPO_ROOT = Path(__file__).resolve().parents[2]
# `examples` is a top-level package of the repository, not installed: make it importable even
# when pytest is started some other way than `python -m pytest` from the repository root.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from examples.pong.pong import PongHandler, parse_args  # noqa: E402
from tests.polling import eventually as wait_until  # noqa: E402


@dataclass
class FakeParticipant:
    identity: str


@dataclass
class FakeLocalParticipant:
    sent: list[dict[str, Any]] = field(default_factory=list)
    fail_next: bool = False

    async def publish_data(
        self,
        payload: bytes | str,
        *,
        reliable: bool = True,
        destination_identities: list[str] | None = None,
        topic: str = "",
    ) -> None:
        if self.fail_next:
            self.fail_next = False
            raise rtc.participant.PublishDataError("participant left")
        self.sent.append(
            {
                "payload": payload,
                "reliable": reliable,
                "destination_identities": list(destination_identities or []),
                "topic": topic,
            }
        )


class FakeRoom:
    def __init__(self) -> None:
        self.local_participant = FakeLocalParticipant()
        self.listeners: dict[str, list[Callable[..., Any]]] = {}

    def on(self, event: str, callback: Callable[..., Any]) -> Callable[..., Any]:
        self.listeners.setdefault(event, []).append(callback)
        return callback

    def off(self, event: str, callback: Callable[..., Any]) -> None:
        self.listeners[event].remove(callback)

    def emit(self, event: str, *args: Any) -> None:
        for callback in list(self.listeners.get(event, [])):
            callback(*args)


def packet(data: bytes, sender: str | None, topic: str = "") -> rtc.DataPacket:
    return rtc.DataPacket(
        data=data,
        kind=rtc.DataPacketKind.KIND_RELIABLE,
        participant=FakeParticipant(sender) if sender else None,  # type: ignore[arg-type]
        topic=topic,
    )


def pong_to(identity: str, topic: str = "") -> dict[str, Any]:
    return {
        "payload": b"pong",
        "reliable": True,
        "destination_identities": [identity],
        "topic": topic,
    }


async def test_ping_is_answered_with_pong_to_the_sender_only() -> None:
    room = FakeRoom()

    replied = await PongHandler().answer(room, packet(b"ping", "alice"))  # type: ignore[arg-type]

    assert replied
    assert room.local_participant.sent == [pong_to("alice")]


@pytest.mark.parametrize("data", [b"PING", b"ping\n", b"pingping", b"pong", b""])
async def test_anything_but_ping_is_ignored(data: bytes) -> None:
    room = FakeRoom()

    replied = await PongHandler().answer(room, packet(data, "alice"))  # type: ignore[arg-type]

    assert not replied
    assert room.local_participant.sent == []


async def test_ping_from_a_not_yet_announced_sender_is_answered_to_the_room() -> None:
    room = FakeRoom()

    replied = await PongHandler().answer(room, packet(b"ping", None))  # type: ignore[arg-type]

    assert replied
    assert room.local_participant.sent == [{**pong_to("alice"), "destination_identities": []}]


async def test_on_join_answers_packets_from_the_room_until_cancelled() -> None:
    room = FakeRoom()
    session = JoinedSession(
        session_id="s",
        room_name="r",
        service_id="pong-service-1",
        service_identity="pong",
        livekit_url="ws://127.0.0.1:7880",
        room=room,  # type: ignore[arg-type]
    )
    serving = asyncio.create_task(PongHandler().on_join(session))
    await asyncio.sleep(0)  # let on_join subscribe

    room.emit("data_received", packet(b"ping", "alice"))
    room.emit("data_received", packet(b"hello", "bob"))
    room.emit("data_received", packet(b"ping", "bob", topic="game"))
    await wait_until(lambda: len(room.local_participant.sent) >= 2)

    assert room.local_participant.sent == [pong_to("alice"), pong_to("bob", topic="game")]

    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert room.listeners["data_received"] == []  # no callback left behind after the session


async def test_a_failed_reply_does_not_stop_the_session() -> None:
    room = FakeRoom()
    session = JoinedSession("s", "r", "pong-service-1", "pong", "ws://x", room)  # type: ignore[arg-type]
    serving = asyncio.create_task(PongHandler().on_join(session))
    await asyncio.sleep(0)

    room.local_participant.fail_next = True
    room.emit("data_received", packet(b"ping", "gone"))
    room.emit("data_received", packet(b"ping", "alice"))
    await wait_until(lambda: bool(room.local_participant.sent))

    assert room.local_participant.sent == [pong_to("alice")]
    assert not serving.done()
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving


def test_command_line_defaults() -> None:
    args = parse_args([])

    assert args.service_id == "pong-service-1"
    assert args.host == "127.0.0.1"
    assert args.port == 8001
    assert args.manager_url == "http://127.0.0.1:8080"
    assert args.type == "PONG"
    assert args.log_level == "INFO"
    assert args.trust_livekit_url == []  # only the LiveKit the manager reports


@pytest.fixture
async def fake_manager() -> AsyncIterator[tuple[str, asyncio.Queue[dict[str, Any]]]]:
    registrations: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def register(request: web.Request) -> web.Response:
        body = await request.json()
        await registrations.put(body)
        return web.json_response(
            {
                "success": True,
                "service_id": body["service_id"],
                "message": "registered",
                "signing_secret": "whsec_" + base64.b64encode(b"pong-test-secret" * 2).decode(),
                "livekit_url": "ws://127.0.0.1:7880",
            }
        )

    app = web.Application()
    app.router.add_post("/api/v1/microservices/register", register)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{site.port}", registrations
    await runner.cleanup()


@pytest.mark.parametrize(
    "command",
    [["-m", "examples.pong"], [str(REPO_ROOT / "examples" / "pong" / "pong.py")]],
    ids=["module", "script"],
)
async def test_pong_process_registers_serves_health_and_stops_on_sigterm(
    fake_manager: tuple[str, asyncio.Queue[dict[str, Any]]], command: list[str]
) -> None:
    manager_url, registrations = fake_manager
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *command,
        "--port",
        "0",
        "--manager-url",
        manager_url,
        "--service-id",
        "pong-test",
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        registration = await asyncio.wait_for(registrations.get(), 30)
        assert registration["service_id"] == "pong-test"
        assert registration["metadata"] == {"type": "PONG"}
        assert registration["endpoint"].startswith("http://127.0.0.1:")
        async with (
            aiohttp.ClientSession() as http,
            http.get(registration["endpoint"] + "/health") as response,
        ):
            assert response.status == 200
            assert await response.json() == {
                "status": "healthy",
                "service_id": "pong-test",
                "sessions": 0,
            }
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 15)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert process.returncode == 0, stderr.decode()
    assert b"microservice stopped" in stderr
