"""Signed dispatch and the SSRF guard, without LiveKit:

- the manager's side: join-room, leave-room and health signed (Standard Webhooks) with the
  registration's secret, never following a redirect, reading at most 64 KiB, calling only
  addresses endpoint_allow allows (host names checked again as they resolve), failing with
  generic errors; the secret stored, rotated, handed out once and never shown;
- the SDK's side: unsigned, badly signed, old and replayed calls answered 401, a LiveKit it does
  not trust 403, without touching a room.

Every server here is on 127.0.0.1; other addresses only ever reach the guard's name table.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from session_manager.api.app import create_app
from session_manager.api.routes import DAEMON
from session_manager.config import Settings
from session_manager.dispatch import (
    DispatchPolicy,
    JoinRoomRequest,
    MicroserviceClient,
    SigningSecrets,
)
from session_manager.egress import DEFAULT_ENDPOINT_ALLOW, EndpointAllow, EndpointGuard
from session_manager.events.signing import ID_HEADER, SIGNATURE_HEADER, sign_headers
from session_manager.registry import Registry
from session_manager.registry.health import HealthMonitor
from session_manager.sdk import CallVerifier, MicroserviceRunner
from session_manager.store import MemoryStore
from tests.conftest import free_port
from tests.polling import eventually as until
from tests.unit.test_egress import NameTable
from tests.unit.test_sdk import LIVEKIT_URL, FakeRooms, RecordingHandler, join_body

SECRET = "whsec_" + base64.b64encode(b"signed-dispatch-test-secret-0001").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"signed-dispatch-test-secret-0002").decode()
REQUEST = JoinRoomRequest("sid", "room-sid", "asr-1", "secret-token", "ws://127.0.0.1:7880")
OK_BODY = {"success": True, "message": "joined", "session_id": "sid", "service_id": "asr-1"}

Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]


def verifies(secret: str, call: Call) -> bool:
    """Whether `call` verifies with `secret`, as the README tells a service to check (without
    parsing the body: a health check's is empty)."""
    try:
        Webhook(secret).verify(call.body, call.headers, json_parse=False)
    except WebhookVerificationError:
        return False
    return True


@dataclass
class Call:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Service:
    """A microservice endpoint on loopback that records every call; `answers[path]` (if any)
    answers it, else 200 with a join-room success."""

    url: str = ""
    calls: list[Call] = field(default_factory=list)
    answers: dict[str, Answer] = field(default_factory=dict)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        call = Call(request.method, request.path, dict(request.headers), await request.read())
        self.calls.append(call)
        answer = self.answers.get(request.path.lstrip("/"))
        return await answer(request) if answer else web.json_response(OK_BODY)


@asynccontextmanager
async def serving(service: Service) -> AsyncIterator[Service]:
    app = web.Application()
    for path in ("/join-room", "/leave-room"):
        app.router.add_post(path, service.handle)
    app.router.add_get("/health", service.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    service.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield service
    finally:
        await runner.cleanup()


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    async with serving(Service()) as started:
        yield started


def only(secret: str, service_id: str = "asr-1") -> SigningSecrets:
    return lambda sid, endpoint: [secret] if sid == service_id else []


@asynccontextmanager
async def client_for(
    secrets: SigningSecrets,
    *,
    allow: list[str] | tuple[str, ...] = DEFAULT_ENDPOINT_ALLOW,
    names: NameTable | None = None,
) -> AsyncIterator[MicroserviceClient]:
    """A client wired as the daemon wires it: the guard's resolver in its connector. Here
    without a DNS cache or kept-alive connections, so that every call connects anew and
    resolves the name again (in the daemon a kept connection, or a cached answer, is to an
    address checked when it was made)."""
    guard = EndpointGuard(EndpointAllow.parse(allow), lookup=names or NameTable())
    connector = aiohttp.TCPConnector(resolver=guard.resolver, use_dns_cache=False, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        yield MicroserviceClient(
            http,
            DispatchPolicy(timeout=2.0, attempts=2, backoff=0.01),
            guard=guard,
            secrets=secrets,
        )


# the manager signs ---------------------------------------------------------------------------


async def test_join_leave_and_health_carry_standard_webhooks_signatures(
    service: Service,
) -> None:
    async with client_for(only(SECRET)) as client:
        assert (await client.join_room(service.url, REQUEST)).ok
        assert await client.leave_room(service.url, "sid", "room-sid", service_id="asr-1") is None
        assert await client.check_health(service.url, 2.0, service_id="asr-1") is None

    join, leave, health = service.calls
    assert (join.path, leave.path, health.path) == ("/join-room", "/leave-room", "/health")
    assert orjson.loads(join.body)["access_token"] == "secret-token"  # the body, unchanged
    assert health.method == "GET" and health.body == b""  # a GET signs the empty body
    for call in service.calls:
        assert verifies(SECRET, call), call.path
        assert not verifies(OTHER_SECRET, call), call.path
        assert call.headers[SIGNATURE_HEADER].startswith("v1,")
    assert len({call.headers[ID_HEADER] for call in service.calls}) == 3


async def test_a_retry_is_a_new_message_so_it_is_not_taken_for_a_replay(
    service: Service,
) -> None:
    async def warming_up(request: web.Request) -> web.StreamResponse:
        if len(service.calls) == 1:
            return web.json_response({"message": "warming up"}, status=500)
        return web.json_response(OK_BODY)

    service.answers["join-room"] = warming_up
    async with client_for(only(SECRET)) as client:
        outcome = await client.join_room(service.url, REQUEST)
    assert outcome.ok and outcome.attempts == 2
    first, second = service.calls
    assert first.headers[ID_HEADER] != second.headers[ID_HEADER]
    assert verifies(SECRET, first) and verifies(SECRET, second)


async def test_a_service_without_a_secret_gets_the_calls_it_always_got(service: Service) -> None:
    async with client_for(lambda sid, endpoint: []) as client:
        assert (await client.join_room(service.url, REQUEST)).ok
    [call] = service.calls
    assert SIGNATURE_HEADER not in call.headers
    assert call.headers["Content-Type"] == "application/json"


async def test_a_call_is_signed_with_the_secret_of_every_registration_at_its_endpoint(
    service: Service,
) -> None:
    registry = Registry(MemoryStore())
    port = service.url.rsplit(":", 1)[1]
    own = registry.register("pong-1", f"http://127.0.0.1:{port}", {})  # the process itself
    alias = registry.register("asr-service-1", f"http://localhost:{port}/", {})  # the spec's
    elsewhere = registry.register("other", "http://127.0.0.1:9", {})

    secrets = registry.signing_secrets("asr-service-1", alias.endpoint)
    assert secrets == [alias.signing_secret, own.signing_secret]
    assert registry.signing_secrets("other", elsewhere.endpoint) == [elsewhere.signing_secret]
    async with client_for(registry.signing_secrets, names=NameTable(localhost=["127.0.0.1"])) as c:
        assert await c.check_health(alias.endpoint, 2.0, service_id="asr-service-1") is None
    [call] = service.calls
    # The process registered as pong-1 verifies the call made for asr-service-1 with its own
    # secret; the one elsewhere learns nothing and its secret signs nothing here.
    assert verifies(own.signing_secret, call) and verifies(alias.signing_secret, call)
    assert not verifies(elsewhere.signing_secret, call)

    registry.update("asr-service-1", endpoint="http://127.0.0.1:9")  # moved away
    assert registry.signing_secrets("pong-1", own.endpoint) == [own.signing_secret]
    registry.deregister("other")
    assert registry.signing_secrets("asr-service-1", "http://127.0.0.1:9") == [alias.signing_secret]


# never a redirect, never more than 64 KiB ----------------------------------------------------


async def test_a_redirect_is_never_followed(service: Service) -> None:
    async with serving(Service()) as target:

        async def redirect(request: web.Request) -> web.StreamResponse:
            raise web.HTTPTemporaryRedirect(f"{target.url}{request.path}")

        for path in ("join-room", "leave-room", "health"):
            service.answers[path] = redirect
        async with client_for(only(SECRET)) as client:
            outcome = await client.join_room(service.url, REQUEST)
            left = await client.leave_room(service.url, "sid", "room-sid", service_id="asr-1")
            health = await client.check_health(service.url, 2.0, service_id="asr-1")

    assert not outcome.ok and outcome.attempts == 1  # a 3xx is final
    assert outcome.error == "join-room answered HTTP 307"
    assert left == "leave-room answered HTTP 307"
    assert health == "health answered HTTP 307"
    assert len(service.calls) == 3
    assert target.calls == []  # the token went nowhere else


async def test_at_most_64_kib_of_an_answer_is_read(service: Service) -> None:
    async def too_long(request: web.Request) -> web.StreamResponse:
        return web.json_response({**OK_BODY, "padding": "x" * 65536})

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # chunked: no Content-Length to judge it by
        await response.prepare(request)
        for _ in range(64):  # 1 MiB in all, if anyone read it
            await response.write(b"x" * 16384)
        return response

    service.answers.update({"join-room": too_long, "health": endless})
    async with client_for(only(SECRET)) as client:
        outcome = await client.join_room(service.url, REQUEST)
        health = await client.check_health(service.url, 2.0, service_id="asr-1")
    assert not outcome.ok and outcome.attempts == 1
    assert outcome.error == "join-room answered with more than 64 KiB"
    assert health == "health answered with more than 64 KiB"


# only where endpoint_allow lets it -----------------------------------------------------------


async def test_an_address_outside_endpoint_allow_is_never_contacted(service: Service) -> None:
    async with client_for(only(SECRET), allow=["10.0.0.0/8"]) as client:
        outcome = await client.join_room(service.url, REQUEST)
        health = await client.check_health(service.url, 2.0, service_id="asr-1")
    assert not outcome.ok and outcome.attempts == 1
    assert outcome.error == "join-room failed: endpoint not allowed (endpoint_allow)"
    assert health == "health failed: endpoint not allowed (endpoint_allow)"
    assert service.calls == []


async def test_a_name_that_resolves_to_a_refused_address_is_refused_at_call_time(
    service: Service,
) -> None:
    port = service.url.rsplit(":", 1)[1]
    names = NameTable(svc_test=["127.0.0.1"])
    endpoint = f"http://svc.test:{port}"
    async with client_for(only(SECRET), names=names) as client:
        assert await client.check_health(endpoint, 2.0, service_id="asr-1") is None
        assert len(service.calls) == 1

        names.names["svc.test"] = ["169.254.169.254"]  # DNS rebinding after registration
        health = await client.check_health(endpoint, 2.0, service_id="asr-1")
        outcome = await client.join_room(endpoint, REQUEST)

    assert health == "health failed: endpoint not reachable"
    assert outcome.error == "join-room failed: endpoint not reachable"
    assert len(service.calls) == 1  # no connection after the name moved
    assert names.asked.count("svc.test") == 4  # each call resolved it again and was refused


async def test_an_unreachable_service_is_reported_without_the_connection_error() -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    async with client_for(only(SECRET)) as client:
        health = await client.check_health(closed, 2.0, service_id="asr-1")
        left = await client.leave_room(closed, "sid", "room-sid", service_id="asr-1")
    assert health == "health failed: endpoint not reachable"
    assert left == "leave-room failed: endpoint not reachable"


# health checks apart ---------------------------------------------------------------------------


@dataclass
class GatedHealth:
    """A health client whose checks wait for `release`; counts how many run at once."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: int = 0
    peak: int = 0

    async def check_health(
        self, endpoint: str, timeout: float, *, service_id: str | None = None
    ) -> str | None:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await self.release.wait()
        finally:
            self.in_flight -= 1
        return None


async def test_health_checks_run_at_most_health_concurrency_at_once() -> None:
    registry = Registry(MemoryStore())
    for n in range(10):
        registry.register(f"slow-{n}", "http://127.0.0.1:9", {})
    client = GatedHealth()
    rounds: list[list[tuple[str, str | None]]] = []
    monitor = HealthMonitor(
        registry,
        client,  # type: ignore[arg-type]
        interval=3600,
        timeout=1.0,
        on_results=rounds.append,
        concurrency=3,
    )

    def checked() -> list[str]:
        return sorted(service_id for batch in rounds for service_id, _ in batch)

    await monitor.start()
    try:
        await until(lambda: client.in_flight == 3)
        client.release.set()
        await until(lambda: len(checked()) == 10)
    finally:
        await monitor.aclose()
    assert client.peak == 3
    assert checked() == sorted(f"slow-{n}" for n in range(10))


# the secret in the registry ------------------------------------------------------------------


def test_each_registration_has_its_own_secret_stored_and_never_viewed() -> None:
    registry = Registry(MemoryStore())
    first = registry.register("a", "http://127.0.0.1:9", {"type": "ASR"})
    second = registry.register("b", "http://127.0.0.1:9", {"type": "ASR"})
    assert first.signing_secret != second.signing_secret
    assert first.signing_secret.startswith("whsec_")
    assert len(base64.b64decode(first.signing_secret.removeprefix("whsec_"))) >= 24
    assert first.stored()["signing_secret"] == first.signing_secret
    assert first.signing_secret not in orjson.dumps(first.view()).decode()
    assert first.signing_secret not in repr(first)


async def test_a_registration_stored_before_secrets_gets_one_at_load_and_keeps_it() -> None:
    store = MemoryStore()
    await store.save_service(
        {
            "service_id": "old",
            "endpoint": "http://127.0.0.1:9",
            "registered_at": "2024-01-01T00:00:00+00:00",
        }
    )
    registry = Registry(store)
    await registry.load()
    secret = registry.get("old").signing_secret
    assert secret.startswith("whsec_")
    [stored] = await store.load_services()
    assert stored["signing_secret"] == secret  # persisted at load

    again = Registry(store)
    await again.load()
    assert again.get("old").signing_secret == secret


def test_rotating_replaces_the_secret_at_once_and_undo_puts_it_back() -> None:
    registry = Registry(MemoryStore())
    record = registry.register("a", "http://127.0.0.1:9", {})
    old = record.signing_secret
    _, undo = registry.rotate_secret("a")
    assert record.signing_secret != old
    assert registry.signing_secrets("a", record.endpoint) == [record.signing_secret]
    undo()
    assert record.signing_secret == old


# the SDK verifies ----------------------------------------------------------------------------


@pytest.fixture
async def sdk(rooms: FakeRooms, handler: RecordingHandler) -> AsyncIterator[MicroserviceRunner]:
    runner = MicroserviceRunner(
        "svc-1",
        handler,
        manager_url=None,
        room_factory=rooms,
        signing_secret=SECRET,
        trusted_livekit_urls=["http://127.0.0.1:7880/"],  # the same server as ws://…:7880
        connect_timeout=0.5,
    )
    await runner.start()
    yield runner
    await runner.aclose()


@pytest.fixture
def rooms() -> FakeRooms:
    return FakeRooms()


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler()


async def send(
    sdk: MicroserviceRunner,
    path: str,
    body: bytes,
    headers: dict[str, str],
    method: str = "POST",
) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
        http.request(
            method,
            sdk.endpoint + path,
            data=body or None,
            headers={"Content-Type": "application/json", **headers},
        ) as response,
    ):
        return response.status, await response.json()


JOIN = orjson.dumps(join_body())


def assert_refused(status: int, answer: dict[str, Any], reason: str) -> None:
    assert status == 401, answer
    assert answer == {
        "success": False,
        "message": f"Unauthorized: {reason}",
        "session_id": None,
        "service_id": "svc-1",
    }


async def test_an_unsigned_join_room_is_refused_and_joins_nothing(
    sdk: MicroserviceRunner, rooms: FakeRooms, handler: RecordingHandler
) -> None:
    status, answer = await send(sdk, "/join-room", JOIN, {})
    assert_refused(status, answer, "call not signed")
    assert rooms.made == [] and handler.joined == []


async def test_a_badly_signed_join_room_is_refused(
    sdk: MicroserviceRunner, rooms: FakeRooms
) -> None:
    status, answer = await send(sdk, "/join-room", JOIN, sign_headers(OTHER_SECRET, JOIN))
    assert_refused(status, answer, "signature does not match")
    # A signature of another body: the body was changed on the way (say, its livekit_url).
    forged = orjson.dumps({**join_body(), "livekit_url": "ws://attacker.test:7880"})
    status, answer = await send(sdk, "/join-room", forged, sign_headers(SECRET, JOIN))
    assert_refused(status, answer, "signature does not match")
    bad = {**sign_headers(SECRET, JOIN), SIGNATURE_HEADER: "v1,%%%"}
    status, answer = await send(sdk, "/join-room", JOIN, bad)
    assert_refused(status, answer, "signature does not match")
    assert rooms.made == []


@pytest.mark.parametrize("offset", [-301, +301])
async def test_a_join_room_more_than_5_minutes_off_is_refused(
    sdk: MicroserviceRunner, rooms: FakeRooms, offset: int
) -> None:
    headers = sign_headers(SECRET, JOIN, timestamp=int(time.time()) + offset)
    status, answer = await send(sdk, "/join-room", JOIN, headers)
    assert_refused(status, answer, "timestamp more than 5 minutes off")
    assert rooms.made == []


async def test_a_replayed_join_room_is_refused(
    sdk: MicroserviceRunner, rooms: FakeRooms, handler: RecordingHandler
) -> None:
    headers = sign_headers(SECRET, JOIN)
    status, answer = await send(sdk, "/join-room", JOIN, headers)
    assert status == 200 and answer["success"] is True, answer
    status, answer = await send(sdk, "/join-room", JOIN, headers)  # the same call again
    assert_refused(status, answer, "call replayed")
    assert len(rooms.made) == 1 and len(handler.joined) == 1


async def test_an_unsigned_leave_room_leaves_nothing(
    sdk: MicroserviceRunner, handler: RecordingHandler
) -> None:
    status, _ = await send(sdk, "/join-room", JOIN, sign_headers(SECRET, JOIN))
    assert status == 200
    leave = orjson.dumps({"session_id": "sess-1", "room_name": "room-1"})

    for _ in range(4):  # four anonymous leave-room calls used to end a session
        status, answer = await send(sdk, "/leave-room", leave, {})
        assert_refused(status, answer, "call not signed")
    assert sdk.sessions == frozenset({"sess-1"}) and handler.left == []

    status, answer = await send(sdk, "/leave-room", leave, sign_headers(SECRET, leave))
    assert status == 200 and answer["success"] is True
    assert sdk.sessions == frozenset()


async def test_health_answers_probes_and_refuses_a_bad_signature(sdk: MicroserviceRunner) -> None:
    status, answer = await send(sdk, "/health", b"", {}, method="GET")
    assert status == 200 and answer["status"] == "healthy"  # a load balancer's probe
    status, answer = await send(sdk, "/health", b"", sign_headers(SECRET, b""), method="GET")
    assert status == 200
    status, answer = await send(sdk, "/health", b"", sign_headers(OTHER_SECRET, b""), "GET")
    assert_refused(status, answer, "signature does not match")


async def test_a_join_room_naming_an_untrusted_livekit_is_refused_without_connecting(
    sdk: MicroserviceRunner, rooms: FakeRooms
) -> None:
    body = orjson.dumps({**join_body(), "livekit_url": "wss://livekit.attacker.test"})
    status, answer = await send(sdk, "/join-room", body, sign_headers(SECRET, body))
    assert status == 403, answer
    assert answer["success"] is False and answer["session_id"] == "sess-1"
    assert "livekit_url" in answer["message"]
    assert rooms.made == []
    # The configured one, however it is spelt (http://…/ for ws://…), is joined.
    status, answer = await send(sdk, "/join-room", JOIN, sign_headers(SECRET, JOIN))
    assert status == 200 and rooms.made[0].connect_calls[0][0] == LIVEKIT_URL


def test_a_runner_without_a_manager_needs_a_secret_and_a_livekit() -> None:
    with pytest.raises(ValueError, match="signing_secret"):
        MicroserviceRunner("svc", RecordingHandler(), manager_url=None)
    with pytest.raises(ValueError, match="trusted_livekit_urls"):
        MicroserviceRunner("svc", RecordingHandler(), manager_url=None, signing_secret=SECRET)


async def test_a_call_signed_with_a_secret_still_on_its_way_waits_for_it() -> None:
    verifier = CallVerifier(SECRET, secret_wait=30.0)
    body = b'{"session_id":"s"}'
    headers = sign_headers(OTHER_SECRET, body)
    with verifier.expecting_secret():  # a rotation in flight
        checking = asyncio.create_task(verifier.verify(body, headers))
        await asyncio.sleep(0)
        assert not checking.done()
        verifier.set_secret(OTHER_SECRET)  # its answer arrives
        assert await checking is None
    # Without a registration or rotation in flight, a call that does not verify waits for
    # nothing (the 30 s above would fail the test's timeout).
    assert await verifier.verify(body, sign_headers(SECRET, body)) == "signature does not match"


async def test_the_ids_remembered_against_replays_are_bounded_in_number_and_time() -> None:
    now = [0.0]
    verifier = CallVerifier(SECRET, max_remembered=2, clock=lambda: now[0])
    body = b"{}"
    calls = [sign_headers(SECRET, body, msg_id=f"msg_{n}") for n in range(3)]
    for headers in calls:
        assert await verifier.verify(body, headers) is None
    assert await verifier.verify(body, calls[2]) == "call replayed"
    assert await verifier.verify(body, calls[0]) is None  # pushed out by the bound: accepted

    now[0] = 601.0  # past the 10-minute window, an id is forgotten (its signature is too old)
    assert await verifier.verify(body, calls[2]) is None


# the API: register answer, rotate-secret, endpoint refusals --------------------------------------


def offline_settings(tmp_path: Path, **overrides: Any) -> Settings:
    return Settings.model_validate(
        {
            "port": 0,
            "livekit_url": f"ws://127.0.0.1:{free_port()}",  # nothing listens there
            "livekit_api_key": "key",
            "livekit_api_secret": "secret-secret-secret-secret-secret",
            "livekit_timeout": 1.0,
            "store": "memory",
            "data_dir": tmp_path,
            **overrides,
        }
    )


@pytest.fixture
async def api(aiohttp_client: Any, tmp_path: Path) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = await aiohttp_client(
        create_app(offline_settings(tmp_path, health_interval=0.05, health_timeout=1.0))
    )
    return client


async def register(api: TestClient[Any, Any], service_id: str, endpoint: str) -> Any:
    return await api.post(
        "/api/v1/microservices/register",
        json={"service_id": service_id, "endpoint": endpoint, "metadata": {"type": "ASR"}},
    )


async def test_the_register_answer_carries_the_secret_once_and_nothing_else_shows_it(
    api: TestClient[Any, Any], service: Service, tmp_path: Path
) -> None:
    daemon = api.app[DAEMON]
    # Health checks have their own connection pool, apart from dispatch's.
    assert daemon.health._client._http is not daemon.microservices._http
    response = await register(api, "asr-1", service.url)
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    answer = await response.json()
    assert set(answer) == {"success", "service_id", "message", "signing_secret", "livekit_url"}
    assert answer["success"] is True and answer["service_id"] == "asr-1"
    assert answer["message"] == "Microservice registered successfully"
    assert answer["livekit_url"].startswith("ws://127.0.0.1:")
    secret = answer["signing_secret"]
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) >= 24

    # The manager's health checks are signed with it.
    await until(lambda: any(verifies(secret, call) for call in service.calls))

    seen = [
        await (await api.get("/api/v1/microservices/asr-1")).text(),
        await (await api.get("/api/v1/microservices")).text(),
        await (await api.get("/api/v1/events?since=0")).text(),
        await (await api.get("/metrics")).text(),
    ]
    assert "asr-1" in seen[0] and "asr-1" in seen[2]
    for text in seen:
        assert secret not in text and "signing_secret" not in text
    rotated = await api.post("/api/v1/microservices/asr-1/rotate-secret")
    assert secret not in await rotated.text()


async def test_rotate_secret_answers_a_new_one_and_calls_are_signed_with_it_at_once(
    api: TestClient[Any, Any], service: Service
) -> None:
    first = (await (await register(api, "asr-1", service.url)).json())["signing_secret"]
    response = await api.post("/api/v1/microservices/asr-1/rotate-secret")
    assert response.status == 200 and response.headers["Cache-Control"] == "no-store"
    answer = await response.json()
    assert set(answer) == {"success", "service_id", "message", "signing_secret", "livekit_url"}
    new = answer["signing_secret"]
    assert new != first and new.startswith("whsec_")

    await until(lambda: any(verifies(new, call) for call in service.calls))
    after = next(call for call in service.calls if verifies(new, call))
    assert not verifies(first, after)  # the old secret signs nothing any more

    missing = await api.post("/api/v1/microservices/nobody/rotate-secret")
    assert missing.status == 404 and (await missing.json())["error"] == "NotFound"


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://169.254.169.254/latest/meta-data",
        "http://[fe80::1]:8001",
        "http://0.0.0.0:8001",
        "http://127.0.0.1:8001/?next=1",
        "http://user:pw@127.0.0.1:8001",
        "http://127.0.0.1:8001/#x",
        "http://2130706433:8001",
    ],
)
async def test_a_refused_endpoint_is_400_naming_endpoint_and_nothing_is_registered(
    api: TestClient[Any, Any], endpoint: str
) -> None:
    response = await register(api, "meta", endpoint)
    assert response.status == 400
    envelope = await response.json()
    assert set(envelope) == {"error", "message", "timestamp"}
    assert envelope["error"] == "InvalidRequest"
    assert envelope["message"].startswith("endpoint"), envelope
    assert "pw" not in envelope["message"]
    assert (await api.get("/api/v1/microservices/meta")).status == 404


async def test_an_update_cannot_point_a_registration_at_a_refused_address(
    api: TestClient[Any, Any], service: Service
) -> None:
    assert (await register(api, "asr-1", service.url)).status == 200
    response = await api.put(
        "/api/v1/microservices/asr-1", json={"endpoint": "http://169.254.169.254"}
    )
    assert response.status == 400
    assert (await response.json())["message"].startswith("endpoint")
    view = await (await api.get("/api/v1/microservices/asr-1")).json()
    assert view["endpoint"] == service.url
