"""Registration of a microservice with the manager, against a fake manager served by aiohttp on
a loopback port."""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from session_manager.events.signing import sign_headers
from session_manager.sdk import (
    JoinedSession,
    MicroserviceRunner,
    RegistrationError,
    RetryBackoff,
    ServiceClosedError,
    SessionHandler,
)
from tests.polling import eventually

FAST = RetryBackoff(initial_delay=0.02, max_delay=0.1)


class IdleHandler(SessionHandler):
    async def on_join(self, session: JoinedSession) -> None:
        return None


def error_envelope(status: int, message: str) -> web.Response:
    return web.json_response(
        {"error": "InvalidRequest", "message": message, "timestamp": "2024-01-01T00:00:00Z"},
        status=status,
    )


FIRST_SECRET = "whsec_" + base64.b64encode(b"registration-test-secret-number1").decode()
ROTATED_SECRET = "whsec_" + base64.b64encode(b"registration-test-secret-number2").decode()
MANAGER_LIVEKIT = "ws://127.0.0.1:7880"


def registered() -> web.Response:
    return web.json_response(
        {
            "success": True,
            "service_id": "svc-1",
            "message": "registered",
            "signing_secret": FIRST_SECRET,
            "livekit_url": MANAGER_LIVEKIT,
        }
    )


class FakeManager:
    """Records every registration POST and answers the n-th one with `answers[n]` (the last
    answer repeats)."""

    def __init__(self, *answers: Callable[[], web.Response]) -> None:
        self.answers = list(answers)
        self.bodies: list[dict[str, Any]] = []
        self.updates: list[dict[str, Any]] = []
        self.drained: list[str] = []
        self.calls: list[str] = []  # "register", "rotate", "update", "drain", in order
        self.rotate_status = 200
        self.delay_first: float = 0.0
        self.hold_first: asyncio.Event | None = None  # the first answer waits for it

    async def register(self, request: web.Request) -> web.Response:
        self.calls.append("register")
        self.bodies.append(await request.json())
        if len(self.bodies) == 1 and self.delay_first:
            await asyncio.sleep(self.delay_first)
        if len(self.bodies) == 1 and self.hold_first is not None:
            await self.hold_first.wait()
        answer = self.answers[min(len(self.bodies), len(self.answers)) - 1]
        return answer()

    async def update(self, request: web.Request) -> web.Response:
        self.calls.append("update")
        self.updates.append(await request.json())
        return web.json_response({"service_id": request.match_info["service_id"]})

    async def drain(self, request: web.Request) -> web.Response:
        self.calls.append("drain")
        self.drained.append(request.match_info["service_id"])
        return web.json_response({"service_id": request.match_info["service_id"]})

    async def rotate(self, request: web.Request) -> web.Response:
        self.calls.append("rotate")
        if self.rotate_status != 200:
            return error_envelope(self.rotate_status, "not yours")
        return web.json_response(
            {
                "success": True,
                "service_id": request.match_info["service_id"],
                "signing_secret": ROTATED_SECRET,
                "livekit_url": MANAGER_LIVEKIT,
                "message": "Signing secret rotated",
            }
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/v1/microservices/register", self.register)
        app.router.add_put("/api/v1/microservices/{service_id}", self.update)
        app.router.add_post("/api/v1/microservices/{service_id}/drain", self.drain)
        app.router.add_post("/api/v1/microservices/{service_id}/rotate-secret", self.rotate)
        return app


@pytest.fixture
async def serve_manager() -> AsyncIterator[Callable[[FakeManager, int], Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def serve(manager: FakeManager, port: int = 0) -> str:
        runner = web.AppRunner(manager.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        runners.append(runner)
        return f"http://127.0.0.1:{site.port}"

    yield serve
    for runner in runners:
        await runner.cleanup()


def unused_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def make_runner(manager_url: str, **options: Any) -> MicroserviceRunner:
    options.setdefault("registration_backoff", FAST)
    return MicroserviceRunner(
        "svc-1", IdleHandler(), manager_url=manager_url, metadata={"type": "PONG"}, **options
    )


async def test_registers_with_the_expected_body(serve_manager: Any) -> None:
    manager = FakeManager(registered)
    url = await serve_manager(manager)

    async with make_runner(url) as service:
        assert service.registered
        assert manager.bodies == [
            {"service_id": "svc-1", "endpoint": service.endpoint, "metadata": {"type": "PONG"}}
        ]
        assert service.endpoint == f"http://127.0.0.1:{service.port}"
        # The advertised endpoint really serves the SDK's API.
        async with aiohttp.ClientSession() as http, http.get(service.endpoint + "/health") as r:
            assert (await r.json())["service_id"] == "svc-1"


async def test_advertise_url_is_what_gets_registered(serve_manager: Any) -> None:
    manager = FakeManager(registered)
    url = await serve_manager(manager)

    async with make_runner(url, advertise_url="http://pong.internal:9000/") as service:
        assert service.endpoint == "http://pong.internal:9000"
        assert manager.bodies[0]["endpoint"] == "http://pong.internal:9000"


async def test_retries_while_the_manager_answers_503(serve_manager: Any) -> None:
    manager = FakeManager(
        lambda: web.Response(status=503, text="starting"),
        lambda: error_envelope(503, "not ready"),
        registered,
    )
    url = await serve_manager(manager)

    async with make_runner(url) as service:
        assert service.registered
        assert len(manager.bodies) == 3
        assert manager.bodies[0] == manager.bodies[2]


async def test_retries_until_the_manager_starts_listening(serve_manager: Any) -> None:
    port = unused_loopback_port()
    service = make_runner(f"http://127.0.0.1:{port}")
    starting = asyncio.create_task(service.start())
    await asyncio.sleep(0.3)  # several refused connections
    assert not starting.done()

    manager = FakeManager(registered)
    await serve_manager(manager, port)
    await asyncio.wait_for(starting, 5)

    assert service.registered
    assert len(manager.bodies) == 1
    await service.aclose()


async def test_a_manager_that_does_not_answer_in_time_is_retried(serve_manager: Any) -> None:
    manager = FakeManager(registered)
    manager.delay_first = 2.0
    url = await serve_manager(manager)

    async with make_runner(url, request_timeout=0.2) as service:
        # The first call was given up at 0.2 s (its answer would have come only after 2 s and
        # registered it with one call): the second one registered it.
        assert service.registered
        assert len(manager.bodies) == 2


async def test_already_registered_refreshes_the_registration(serve_manager: Any) -> None:
    manager = FakeManager(lambda: error_envelope(400, "Service ID already exists"))
    url = await serve_manager(manager)

    async with make_runner(url) as service:
        assert service.registered
        assert len(manager.bodies) == 1
        # It cannot know the secret the manager kept: it has a new one made, and learns it
        # before it takes itself out of draining.
        assert manager.calls == ["register", "rotate", "update"]
        assert await signed_health(service, ROTATED_SECRET) == 200
        assert await signed_health(service, FIRST_SECRET) == 401
        # A restarted service may listen elsewhere and drained itself when it stopped.
        assert manager.updates == [
            {
                "endpoint": service.endpoint,
                "metadata": manager.bodies[0]["metadata"],
                "draining": False,
            }
        ]


async def test_shutdown_drains_the_service_at_the_manager(serve_manager: Any) -> None:
    manager = FakeManager(registered)
    url = await serve_manager(manager)

    async with make_runner(url) as service:
        assert manager.drained == []
    assert manager.drained == [service.service_id]


@pytest.mark.parametrize(
    ("status", "message"),
    [(400, "metadata.type is required"), (404, "Not Found"), (401, "unauthorised")],
)
async def test_other_client_errors_are_fatal(serve_manager: Any, status: int, message: str) -> None:
    manager = FakeManager(lambda: error_envelope(status, message))
    url = await serve_manager(manager)
    service = make_runner(url)

    with pytest.raises(RegistrationError) as raised:
        await service.start()

    assert f"HTTP {status}" in str(raised.value)
    assert message in str(raised.value)
    assert len(manager.bodies) == 1  # no retry
    # start() cleaned up after itself: the service no longer listens.
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(service.endpoint + "/health")


async def test_aclose_stops_the_retry_loop(serve_manager: Any) -> None:
    manager = FakeManager(lambda: web.Response(status=503))
    url = await serve_manager(manager)
    service = make_runner(url)
    starting = asyncio.create_task(service.start())
    await asyncio.sleep(0.2)

    await asyncio.wait_for(service.aclose(), 2)

    with pytest.raises(ServiceClosedError):
        await starting
    attempts = len(manager.bodies)
    assert attempts >= 2
    await asyncio.sleep(0.2)
    assert len(manager.bodies) == attempts  # no attempt after the shutdown


async def test_cancelling_start_stops_registration(serve_manager: Any) -> None:
    manager = FakeManager(lambda: web.Response(status=503))
    url = await serve_manager(manager)
    service = make_runner(url)
    starting = asyncio.create_task(service.start())
    await asyncio.sleep(0.2)

    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting

    attempts = len(manager.bodies)
    await asyncio.sleep(0.2)
    assert len(manager.bodies) == attempts
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(service.endpoint + "/health")


def test_backoff_doubles_up_to_the_cap() -> None:
    delays = RetryBackoff().delays()
    assert [next(delays) for _ in range(8)] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]


# the secret and the LiveKit URL of the answers ----------------------------------------------


async def signed_health(service: MicroserviceRunner, secret: str) -> int:
    """The status of a health check signed with `secret`, as the manager signs it."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(service.endpoint + "/health", headers=sign_headers(secret, b"")) as response,
    ):
        return response.status


async def test_the_register_answer_gives_the_secret_calls_are_verified_with(
    serve_manager: Any,
) -> None:
    manager = FakeManager(registered)
    url = await serve_manager(manager)

    async with make_runner(url) as service:
        assert await signed_health(service, FIRST_SECRET) == 200
        assert await signed_health(service, ROTATED_SECRET) == 401


async def test_rotate_secret_replaces_the_secret_at_once(serve_manager: Any) -> None:
    manager = FakeManager(registered)
    url = await serve_manager(manager)

    async with make_runner(url) as service:
        await service.rotate_secret()
        assert manager.calls[-1] == "rotate"
        assert await signed_health(service, ROTATED_SECRET) == 200
        assert await signed_health(service, FIRST_SECRET) == 401


async def test_a_registration_the_service_may_not_rotate_is_fatal(serve_manager: Any) -> None:
    manager = FakeManager(lambda: error_envelope(400, "Service ID already exists"))
    manager.rotate_status = 403  # registered with another API key
    url = await serve_manager(manager)
    service = make_runner(url)

    with pytest.raises(RegistrationError) as raised:
        await service.start()

    assert "HTTP 403" in str(raised.value)
    assert manager.calls == ["register", "rotate"]  # never re-pointed


@pytest.mark.parametrize(
    "secret", [None, "", "whsec_", 42], ids=["missing", "empty", "no-key", "number"]
)
async def test_an_answer_without_a_usable_signing_secret_is_fatal(
    serve_manager: Any, secret: object
) -> None:
    answer = {"success": True, "service_id": "svc-1", "message": "ok"}
    if secret is not None:
        answer["signing_secret"] = secret
    manager = FakeManager(lambda: web.json_response(answer))
    url = await serve_manager(manager)

    with pytest.raises(RegistrationError, match="signing_secret"):
        await make_runner(url).start()


async def test_a_shutdown_while_the_registration_is_out_still_drains(
    serve_manager: Any,
) -> None:
    """A SIGTERM between sending the registration and reading its answer: the manager may hold
    the registration, so the service drains it on the way out rather than leave it live."""
    manager = FakeManager(registered)
    manager.hold_first = asyncio.Event()  # the manager got the request, has not answered yet
    url = await serve_manager(manager)
    service = make_runner(url)
    starting = asyncio.create_task(service.start())
    await eventually(lambda: len(manager.bodies) == 1)

    await service.aclose()

    assert not service.registered
    assert manager.drained == ["svc-1"]
    manager.hold_first.set()
    await asyncio.gather(starting, return_exceptions=True)
