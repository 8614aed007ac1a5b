"""Limits (issue 9, part 6): each answers its status with `Retry-After`.

`max_live_sessions` (503 AtCapacity), `max_sessions_per_user`, `rate_limit`, `max_event_streams`
and `max_services` (429 TooManyRequests), and client tokens that live no longer than
`max_session_duration` plus a margin. Sessions are made through a supervisor over fakes; the
same limits through HTTP with a real LiveKit are in tests/integration/test_auth.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from session_manager.api.app import create_app
from session_manager.api.auth import RateLimiter
from session_manager.api.errors import error_middleware
from session_manager.api_keys import RateLimit
from session_manager.commands import DeleteSession, RegisterService
from session_manager.config import Settings
from session_manager.errors import AtCapacity, ManagerError, TooManyRequests
from session_manager.events import EventLog
from session_manager.registry import Registry
from session_manager.session.deps import TOKEN_MARGIN, SessionDeps, token_ttl
from session_manager.store import MemoryStore
from session_manager.supervisor import Supervisor
from tests.conftest import free_port
from tests.unit.session_harness import FakeGateway, FakeMicroservices, Harness

Client = TestClient[web.Request, web.Application]
HarnessWithLimits = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make_limited() -> AsyncIterator[HarnessWithLimits]:
    """A supervisor over fakes, with the given Supervisor keyword arguments (the limits)."""
    started: list[Supervisor] = []

    async def make(*, deps: dict[str, Any] | None = None, **limits: Any) -> Harness:
        store = MemoryStore()
        registry = Registry(store)
        gateway, microservices = FakeGateway(), FakeMicroservices()
        events = EventLog(1000, first_id=1)
        session_deps = SessionDeps(
            **{
                "events": events,
                "gateway": gateway,
                "microservices": microservices,
                "registry": registry,
                "join_timeout": 5.0,
                "room_empty_timeout": 60,
                "client_token_ttl": 3600,
                "teardown_timeout": 1.0,
                **(deps or {}),
            }
        )
        supervisor = Supervisor(registry, store, session_deps, events=events, **limits)
        await supervisor.start()
        started.append(supervisor)
        return Harness(supervisor, gateway, microservices, registry, events, store=store)

    yield make
    for supervisor in started:
        await supervisor.aclose(timeout=2)


def retry_after(error: ManagerError) -> int:
    value = int(error.headers["Retry-After"])
    assert value >= 1
    return value


async def end(h: Harness, session_id: str) -> None:
    """Delete a session and wait until the supervisor has reaped it (it no longer counts)."""
    await h.ask(lambda r: DeleteSession(session_id, r))
    await h.eventually(
        lambda: session_id not in h.supervisor._children, f"session {session_id} reaped"
    )


# --- max_live_sessions ---------------------------------------------------------------------------


async def test_past_max_live_sessions_a_create_is_503_at_capacity(
    make_limited: HarnessWithLimits,
) -> None:
    h = await make_limited(max_live_sessions=2)
    first = await h.create(user_identity="u1", required_services=[])
    await h.create(user_identity="u2", required_services=[])
    with pytest.raises(AtCapacity) as caught:
        await h.create(user_identity="u3", required_services=[])
    assert caught.value.status == 503 and caught.value.code == "AtCapacity"
    retry_after(caught.value)
    await end(h, first.session_id)
    assert (await h.create(user_identity="u3", required_services=[])).session_id


async def test_the_capacity_check_holds_for_idempotent_creates_too(
    make_limited: HarnessWithLimits,
) -> None:
    h = await make_limited(max_live_sessions=1)
    await h.create(user_identity="u1", required_services=[], idempotency_key="k1")
    with pytest.raises(AtCapacity):
        await h.create(user_identity="u2", required_services=[], idempotency_key="k2")


# --- max_sessions_per_user -----------------------------------------------------------------------


async def test_past_max_sessions_per_user_a_create_is_429(
    make_limited: HarnessWithLimits,
) -> None:
    h = await make_limited(max_sessions_per_user=1)
    first = await h.create(user_identity="ann", required_services=[])
    with pytest.raises(TooManyRequests) as caught:
        await h.create(user_identity="ann", required_services=[])
    assert caught.value.status == 429 and caught.value.code == "TooManyRequests"
    assert "user_identity" in caught.value.message
    retry_after(caught.value)
    assert (await h.create(user_identity="bob", required_services=[])).session_id
    await end(h, first.session_id)
    assert (await h.create(user_identity="ann", required_services=[])).session_id


async def test_no_limit_per_user_by_default(make_limited: HarnessWithLimits) -> None:
    h = await make_limited()
    for _ in range(5):
        await h.create(user_identity="ann", required_services=[])


# --- max_services --------------------------------------------------------------------------------


async def test_past_max_services_a_registration_is_429(make_limited: HarnessWithLimits) -> None:
    h = await make_limited(max_services=1)
    await h.ask(lambda r: RegisterService("svc-1", "http://127.0.0.1:9", {}, r))
    with pytest.raises(TooManyRequests) as caught:
        await h.ask(lambda r: RegisterService("svc-2", "http://127.0.0.1:9", {}, r))
    retry_after(caught.value)
    # The same id again is still the duplicate it is, not a limit.
    with pytest.raises(ManagerError, match="already exists"):
        await h.ask(lambda r: RegisterService("svc-1", "http://127.0.0.1:9", {}, r))


# --- client tokens -------------------------------------------------------------------------------


def deps_with(**values: Any) -> SessionDeps:
    base: dict[str, Any] = {
        "events": EventLog(10),
        "gateway": FakeGateway(),
        "microservices": FakeMicroservices(),
        "registry": Registry(MemoryStore()),
        "join_timeout": 5.0,
        "room_empty_timeout": 60,
        "client_token_ttl": 6 * 3600.0,
        "teardown_timeout": 1.0,
    }
    return SessionDeps(**{**base, **values})


def test_a_client_token_lives_no_longer_than_max_session_duration_and_a_margin() -> None:
    deps = deps_with(client_token_ttl=30 * 86400.0, max_session_duration=3600.0)
    cap = timedelta(seconds=3600 + 5) + TOKEN_MARGIN
    assert token_ttl(deps, {}) == cap
    assert token_ttl(deps, {"duration_limit": "60"}) == timedelta(seconds=65) + TOKEN_MARGIN
    # Below the cap, the settings are as they were.
    roomy = deps_with(client_token_ttl=600.0, max_session_duration=86400.0)
    assert token_ttl(roomy, {}) == timedelta(seconds=600)


async def test_the_token_a_create_answers_with_is_capped(make_limited: HarnessWithLimits) -> None:
    h = await make_limited(deps={"client_token_ttl": 30 * 86400.0, "max_session_duration": 600.0})
    created = await h.create(user_identity="u", required_services=[])
    seconds = int(created.access_token.rsplit(":", 1)[1])  # the fake token shows its ttl
    assert seconds == 600 + 5 + TOKEN_MARGIN.total_seconds()


# --- rate_limit ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "per_second", "burst"),
    [("10/20", 10.0, 20), ("10", 10.0, 10), ("0.5/1", 0.5, 1), ("0.25", 0.25, 1)],
)
def test_a_rate_limit_is_a_rate_and_a_burst(text: str, per_second: float, burst: int) -> None:
    assert RateLimit.parse(text) == RateLimit(per_second, burst)


@pytest.mark.parametrize("text", ["", "ten", "10/", "/5", "0/1", "10/0", "-1/2", "1e3/5", "9" * 9])
def test_a_malformed_rate_limit_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        RateLimit.parse(text)


def test_the_rate_limit_setting_is_validated() -> None:
    assert Settings(rate_limit="10/20").rate_limit == "10/20"
    with pytest.raises(ValueError, match="rate_limit"):
        Settings(rate_limit="fast")


def test_a_token_bucket_per_caller() -> None:
    now = [100.0]
    limiter = RateLimiter(RateLimit(2.0, 3), clock=lambda: now[0])
    assert [limiter.take("ann") for _ in range(3)] == [None, None, None]
    assert limiter.take("ann") == pytest.approx(0.5)  # a token comes every half second
    assert limiter.take("bob") is None  # another caller has its own bucket
    now[0] += 0.25
    assert limiter.take("ann") == pytest.approx(0.25)
    now[0] += 0.25
    assert limiter.take("ann") is None
    now[0] += 3600  # a long pause fills the bucket to its burst, no more
    assert [limiter.take("ann") for _ in range(4)][-1] is not None


def test_the_buckets_kept_are_bounded() -> None:
    limiter = RateLimiter(RateLimit(1.0, 1), clock=lambda: 0.0, max_buckets=3)
    for who in ("a", "b", "c", "d"):
        assert limiter.take(who) is None
    assert len(limiter._buckets) == 3
    assert limiter.take("a") is None  # forgotten: a full bucket again
    assert limiter.take("d") is not None


# --- through HTTP --------------------------------------------------------------------------------

CLIENT_KEY = "client-key-8d3a6b1f0e9c2d4a"
OTHER_KEY = "client-key-2b7e4d9c1a0f3e5b"
SERVICE_KEY = "service-key-4c9e2a7d1b0f6e3a"
KEYS = [f"{CLIENT_KEY} client", f"{OTHER_KEY} client", f"{SERVICE_KEY} service"]


@pytest.fixture
def make_client(aiohttp_client: Any, tmp_path: Path) -> Callable[..., Awaitable[Client]]:
    async def make(**overrides: Any) -> Client:
        settings = Settings.model_validate(
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
        result: Client = await aiohttp_client(create_app(settings))
        return result

    return make


async def assert_limited(response: Any, status: int, error: str) -> None:
    # An answer that is not the refusal may be an event stream that never ends: not read.
    assert response.status == status, (response.status, response.content_type)
    body = await response.json()
    assert body["error"] == error and set(body) == {"error", "message", "timestamp"}
    assert int(response.headers["Retry-After"]) >= 1


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_past_the_rate_limit_a_key_gets_429(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    # One request every 1000 s after a burst of 2: the third is refused whatever the clock.
    client = await make_client(api_keys=KEYS, rate_limit="0.001/2")
    for _ in range(2):
        assert (await client.get("/api/v1/microservices", headers=bearer(CLIENT_KEY))).status == 200
    refused = await client.get("/api/v1/microservices", headers=bearer(CLIENT_KEY))
    await assert_limited(refused, 429, "TooManyRequests")
    assert int(refused.headers["Retry-After"]) > 900
    assert (await client.get("/api/v1/microservices", headers=bearer(OTHER_KEY))).status == 200
    assert (await client.get("/health")).status == 200  # probes are never limited


async def test_without_keys_the_rate_limit_is_per_client_address(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(rate_limit="0.001/1")
    assert (await client.get("/api/v1/microservices")).status == 200
    await assert_limited(await client.get("/api/v1/sessions"), 429, "TooManyRequests")


async def test_past_max_services_a_registration_is_429_over_http(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(max_services=1)
    first = {"service_id": "svc-1", "endpoint": "http://127.0.0.1:9"}
    assert (await client.post("/api/v1/microservices/register", json=first)).status == 200
    second = {"service_id": "svc-2", "endpoint": "http://127.0.0.1:9"}
    response = await client.post("/api/v1/microservices/register", json=second)
    await assert_limited(response, 429, "TooManyRequests")


async def test_past_max_event_streams_a_stream_is_429(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(max_event_streams=1, event_keepalive=0.2)
    sse = {"Accept": "text/event-stream"}
    first = await client.get("/api/v1/events", headers=sse)
    assert first.status == 200 and first.content_type == "text/event-stream"
    await assert_limited(await client.get("/api/v1/events", headers=sse), 429, "TooManyRequests")
    # Polling is no stream: it is not counted.
    assert (await client.get("/api/v1/events?since=0")).status == 200
    first.close()
    # The server notices the stream went away on its next write (a keep-alive at the latest).
    async with asyncio.timeout(30):
        while True:
            again = await client.get("/api/v1/events", headers=sse)
            if again.status == 200:
                again.close()
                break
            assert again.status == 429
            await asyncio.sleep(0.05)


async def test_a_limit_error_carries_its_headers_through_the_envelope(
    aiohttp_client: Any,
) -> None:
    async def full(request: web.Request) -> web.Response:
        raise AtCapacity("full", retry_after=7)

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/full", full)
    client: Client = await aiohttp_client(app)
    response = await client.get("/full")
    await assert_limited(response, 503, "AtCapacity")
    assert response.headers["Retry-After"] == "7"
