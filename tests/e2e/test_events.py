"""The event system end to end: a real LiveKit, a microservice built with the SDK, a LiveKit
client, an SSE subscriber that disconnects and resumes, and a webhook receiver that fails twice.

Runs inside the private network namespace of scripts/test.sh (the client needs WebRTC).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from livekit import rtc
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from examples.pong.pong import PongHandler
from session_manager.events import ID_HEADER, as_whsec
from session_manager.sdk import MicroserviceRunner
from tests.conftest import require_netns
from tests.fake_services import wait_for_status

SECRET = "webhook-test-secret"  # a plain string: receivers verify with its whsec_ form
LIFE_IN_ORDER = [
    ("SessionCreated", None),
    ("MicroserviceDispatched", None),
    ("MicroserviceJoined", None),
    ("SessionReady", None),
    ("ClientJoined", None),
    ("SessionStatusChanged", "Active"),
    ("SessionTerminated", None),
]


@dataclass
class SseEvent:
    id: int
    type: str
    data: dict[str, Any]


async def read_sse(response: aiohttp.ClientResponse, limit: int | None = None) -> list[SseEvent]:
    """Events of an SSE stream until it ends (or `limit` events were read)."""
    events: list[SseEvent] = []
    fields: dict[str, str] = {}
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith(":"):
            continue  # keep-alive comment
        if line:
            name, _, value = line.partition(": ")
            fields[name] = value
            continue
        if "data" in fields:
            payload = orjson.loads(fields["data"])  # the whole event; its own `data` inside
            assert payload["id"] == int(fields["id"]) and payload["type"] == fields["event"]
            events.append(SseEvent(payload["id"], payload["type"], payload["data"]))
            if limit is not None and len(events) >= limit:
                break
        fields = {}
    return events


def in_order(events: list[SseEvent], wanted: list[tuple[str, str | None]]) -> bool:
    """Whether `wanted` appears in `events` as a subsequence."""
    position = 0
    for event in events:
        kind, new_status = wanted[position]
        if event.type == kind and (new_status is None or event.data.get("new") == new_status):
            position += 1
            if position == len(wanted):
                return True
    return False


@dataclass
class FlakyReceiver:
    """A webhook receiver that answers the first `failures` POSTs with 500."""

    failures: int = 2
    posts: int = 0
    accepted: list[dict[str, Any]] = field(default_factory=list)
    bad_signatures: int = 0
    url: str = ""

    async def receive(self, request: web.Request) -> web.Response:
        self.posts += 1
        body = await request.read()
        if self.posts <= self.failures:
            return web.Response(status=500)
        try:  # as the README tells a receiver to: Standard Webhooks, on the raw body
            Webhook(as_whsec(SECRET)).verify(body, dict(request.headers))
        except WebhookVerificationError:
            self.bad_signatures += 1
            return web.Response(status=401)
        event = orjson.loads(body)
        assert int(request.headers[ID_HEADER]) == event["id"]
        self.accepted.append(event)
        return web.Response(status=204)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[FlakyReceiver]:
        app = web.Application()
        app.router.add_post("/hook", self.receive)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
        try:
            yield self
        finally:
            await runner.cleanup()


async def test_a_session_streamed_resumed_and_delivered(start_manager: Any) -> None:
    require_netns()
    async with FlakyReceiver().running() as receiver:
        manager = await start_manager(
            webhooks=[receiver.url],
            webhook_secret=SECRET,
            webhook_backoff=0.05,
            webhook_max_backoff=0.2,
            webhook_concurrency=1,
            event_keepalive=0.5,
        )
        manager_url = str(manager.make_url("")).rstrip("/")
        async with MicroserviceRunner("pong-ev", PongHandler(), manager_url=manager_url):
            created = await (
                await manager.post(
                    "/api/v1/create-session",
                    json={"user_identity": "eve", "required_services": ["pong-ev"]},
                )
            ).json()
            sid = created["session_id"]
            stream_url = f"/api/v1/sessions/{sid}/events"
            headers = {"Accept": "text/event-stream"}

            # A whole-life subscriber, and one that leaves after two events and resumes.
            whole = await manager.get(stream_url, headers=headers)
            assert whole.status == 200
            assert whole.headers["Content-Type"].startswith("text/event-stream")
            whole_reader = asyncio.create_task(read_sse(whole))
            first = await manager.get(stream_url, headers=headers)
            early = await read_sse(first, limit=2)
            first.close()

            await wait_for_status(manager, sid, "Ready")
            room = rtc.Room()
            await asyncio.wait_for(
                room.connect(created["livekit_url"], created["access_token"]), 15
            )
            try:
                await wait_for_status(manager, sid, "Active")
            finally:
                await room.disconnect()
            deleted = await manager.delete(f"/api/v1/sessions/{sid}")
            assert deleted.status == 200

            life = await asyncio.wait_for(whole_reader, 10)  # the stream ends by itself
            assert in_order(life, LIFE_IN_ORDER), [(e.type, e.data.get("new")) for e in life]
            assert life[-1].type == "SessionTerminated"
            assert life[-1].data["reason"] == "terminated by request"
            ids = [e.id for e in life]
            assert ids == sorted(ids) and len(set(ids)) == len(ids)

            resumed = await manager.get(
                stream_url, headers={**headers, "Last-Event-ID": str(early[-1].id)}
            )
            rest = await asyncio.wait_for(read_sse(resumed), 10)
            assert [e.id for e in early + rest] == ids  # nothing lost, nothing repeated

            polled = await (await manager.get(f"/api/v1/events?session_id={sid}&since=0")).json()
            assert [e["id"] for e in polled["events"]] == ids

        # Every event of the session reaches the webhook despite two failures, signed, in order.
        async def delivered() -> list[int]:
            return [e["id"] for e in receiver.accepted if e["session_id"] == sid]

        for _ in range(100):
            if await delivered() == ids:
                break
            await asyncio.sleep(0.05)
        assert await delivered() == ids
        assert receiver.bad_signatures == 0
        assert receiver.posts >= len(receiver.accepted) + 2
        text = orjson.dumps(receiver.accepted).decode()
        assert created["access_token"] not in text
