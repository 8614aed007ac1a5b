"""session_manager.client against a live manager on the real livekit-server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from examples.pong.pong import PongHandler
from session_manager.client import ApiError, Event, SessionManagerClient
from session_manager.sdk import MicroserviceRunner
from tests.fake_services import ScriptedService, accept_without_joining, wait_until

pytestmark = pytest.mark.integration

ADMIN_KEY = "client-test-admin-key-0123456789"


def url_of(manager: Any) -> str:
    return str(manager.make_url("")).rstrip("/")


@pytest.fixture
async def client(manager: Any) -> AsyncIterator[SessionManagerClient]:
    async with SessionManagerClient(url_of(manager), timeout=10) as client:
        yield client


async def test_sessions_create_page_show_delete(client: SessionManagerClient) -> None:
    created = [await client.create_session(f"user-{i}", []) for i in range(3)]
    assert {c.status for c in created} == {"Ready"}
    assert created[0].access_token not in repr(created[0])

    first = await client.list_sessions(limit=2)
    assert len(first.sessions) == 2 and first.next_cursor is not None
    second = await client.list_sessions(limit=2, cursor=first.next_cursor)
    assert second.next_cursor is None
    paged = [s.session_id for s in first.sessions + second.sessions]
    assert sorted(paged) == sorted(c.session_id for c in created)
    assert [s.session_id async for s in client.iter_sessions(page_size=1)] == paged
    mine = await client.list_sessions(user_identity="user-1")
    assert [s.session_id for s in mine.sessions] == [created[1].session_id]

    shown = await client.get_session(created[0].session_id)
    assert (shown.status, shown.user_identity, shown.services) == ("Ready", "user-0", [])
    assert shown.client.joined is False

    deleted = await client.delete_session(created[0].session_id)
    assert deleted.status == "Terminated"
    assert (await client.get_session(created[0].session_id)).status == "Terminated"


async def test_add_and_remove_a_service(manager: Any, client: SessionManagerClient) -> None:
    async with MicroserviceRunner("pong-client", PongHandler(), manager_url=url_of(manager)):
        created = await client.create_session("alice", [])
        added = await client.add_service(created.session_id, "pong-client")
        assert [slot.service_id for slot in added.services] == ["pong-client"]
        joined = await wait_until(
            lambda: client.get_session(created.session_id),
            lambda s: s.services[0].state == "joined",
            "pong-client joined",
        )
        assert joined.services[0].endpoint == (await client.get_service("pong-client")).endpoint

        removed = await client.remove_service(created.session_id, "pong-client")
        assert all(s.service_id != "pong-client" or s.state != "joined" for s in removed.services)
        with pytest.raises(ApiError) as raised:
            await client.add_service(created.session_id, "not-registered")
        assert (raised.value.status, raised.value.error) == (400, "InvalidRequest")


async def test_register_update_drain_rotate_deregister(client: SessionManagerClient) -> None:
    async with ScriptedService(accept_without_joining).running() as service:
        registered = await client.register_service("svc-c", service.endpoint, {"type": "ASR"})
        assert registered.success and registered.signing_secret.startswith("whsec_")
        assert registered.signing_secret not in repr(registered)

        shown = await client.get_service("svc-c")
        assert (shown.endpoint, shown.metadata["type"], shown.draining) == (
            service.endpoint,
            "ASR",
            False,
        )
        assert [s.service_id for s in await client.list_services(type="ASR")] == ["svc-c"]
        assert await client.list_services(type="TTS") == []

        assert (await client.drain_service("svc-c")).draining is True
        updated = await client.update_service("svc-c", draining=False, metadata={"type": "ASR2"})
        assert (updated.draining, updated.metadata["type"]) == (False, "ASR2")

        rotated = await client.rotate_secret("svc-c")
        assert rotated.signing_secret.startswith("whsec_")
        assert rotated.signing_secret != registered.signing_secret

        gone = await client.deregister_service("svc-c")
        assert (gone.success, gone.service_id) == (True, "svc-c")
        with pytest.raises(ApiError) as raised:
            await client.get_service("svc-c")
        assert raised.value.status == 404 and raised.value.error == "NotFound"


async def test_errors_are_the_envelope(client: SessionManagerClient) -> None:
    with pytest.raises(ApiError) as raised:
        await client.get_session("no-such-session")
    assert (raised.value.status, raised.value.error) == (404, "NotFound")
    assert raised.value.message and "HTTP 404 NotFound" in str(raised.value)

    with pytest.raises(ApiError) as raised:
        await client.create_session("bob", ["never-registered"])
    assert (raised.value.status, raised.value.error) == (400, "InvalidRequest")
    assert "never-registered" in raised.value.message


async def test_unreachable_and_timeout_are_api_errors(manager: Any) -> None:
    async with SessionManagerClient("http://127.0.0.1:1", timeout=2) as client:
        with pytest.raises(ApiError) as raised:
            await client.health()
        assert (raised.value.status, raised.value.error) == (0, "Unreachable")

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with SessionManagerClient(f"http://127.0.0.1:{port}", timeout=0.3) as client:
            with pytest.raises(ApiError) as raised:
                await client.get_session("x")
            assert (raised.value.status, raised.value.error) == (0, "Timeout")
    finally:
        server.close()


async def test_api_key_is_sent_as_bearer(start_manager: Any) -> None:
    manager = await start_manager(api_keys=[f"{ADMIN_KEY} admin"])
    async with SessionManagerClient(url_of(manager), api_key=ADMIN_KEY) as client:
        assert (await client.health()).status == "healthy"
        created = await client.create_session("carol", [])
        assert (await client.get_session(created.session_id)).owner is not None
    async with SessionManagerClient(url_of(manager)) as anonymous:
        with pytest.raises(ApiError) as raised:
            await anonymous.list_sessions()
        assert (raised.value.status, raised.value.error) == (401, "Unauthorized")


class CuttableProxy:
    """A TCP proxy in front of the manager whose open connections can be cut at once."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.connections = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()


async def test_events_resume_after_a_dropped_connection_without_a_gap(
    manager: Any, client: SessionManagerClient
) -> None:
    proxy = CuttableProxy(manager.server.port)
    proxied = SessionManagerClient(await proxy.start())
    stream = proxied.events(last_event_id=0, retry_delay=0.05)
    seen: list[Event] = []

    async def read_until(kind: str, session_id: str) -> None:
        while True:
            event = await asyncio.wait_for(anext(stream), 10)
            seen.append(event)
            if event.type == kind and event.session_id == session_id:
                return

    try:
        first = await client.create_session("dave", [])
        await read_until("SessionReady", first.session_id)
        proxy.cut()
        # Made while the stream is down: the reconnect's Last-Event-ID brings them.
        second = await client.create_session("erin", [])
        await client.delete_session(first.session_id)
        await read_until("SessionReady", second.session_id)
        await read_until("SessionTerminated", first.session_id)
    finally:
        await stream.aclose()
        await proxied.aclose()
        await proxy.close()

    assert proxy.connections >= 2  # it did reconnect
    polled = await client.request("GET", "/api/v1/events", params={"since": "0", "limit": "1000"})
    expected = [e["id"] for e in polled["events"] if e["id"] <= seen[-1].id]
    assert [e.id for e in seen] == expected  # none missed, none repeated


async def test_session_events_end_after_termination(client: SessionManagerClient) -> None:
    created = await client.create_session("frank", [])
    await client.delete_session(created.session_id)
    events = [e async for e in client.events(session_id=created.session_id, follow_session=True)]
    assert events[0].type == "SessionCreated"
    assert events[-1].type == "SessionTerminated"
    assert {e.session_id for e in events} == {created.session_id}
