"""Every error, from any route, answers with the envelope and the right status.

The manager here points at a LiveKit that is not running (a closed loopback port): requests that
fail validation never reach it, and the ones that do show what a LiveKit outage looks like.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pydantic import BaseModel, ValidationError, field_validator

from session_manager.api.app import create_app
from session_manager.api.errors import describe_validation_error, error_middleware
from session_manager.api.models import CreateSessionRequest
from session_manager.config import Settings
from tests.conftest import free_port


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path) -> TestClient[Any, Any]:
    settings = Settings.model_validate(
        {
            "port": 0,
            "livekit_url": f"ws://127.0.0.1:{free_port()}",  # nothing listens there
            "livekit_api_key": "key",
            "livekit_api_secret": "secret-secret-secret-secret-secret",
            "livekit_timeout": 1.0,
            "data_dir": tmp_path,
            "max_body_bytes": 4096,
        }
    )
    result: TestClient[Any, Any] = await aiohttp_client(create_app(settings))
    return result


async def assert_error(response: Any, status: int, error: str, *, mentions: str = "") -> None:
    assert response.status == status
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error", "message", "timestamp"}, body
    assert body["error"] == error
    assert mentions in body["message"], body["message"]
    datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00"))
    assert body["timestamp"].endswith("Z")


async def test_health_matches_the_spec(client: TestClient[Any, Any]) -> None:
    response = await client.get("/health")
    assert response.status == 200
    body = await response.json()
    assert body["status"] == "healthy"
    assert body["version"] == "0.1.0"
    assert body["timestamp"].endswith("Z")


async def test_unknown_path_is_404(client: TestClient[Any, Any]) -> None:
    await assert_error(await client.get("/api/v1/nothing-here"), 404, "NotFound", mentions="/api")


async def test_wrong_method_is_405(client: TestClient[Any, Any]) -> None:
    response = await client.get("/api/v1/create-session")
    await assert_error(response, 405, "MethodNotAllowed", mentions="POST")
    assert "POST" in response.headers["Allow"]


async def test_unknown_session_is_404(client: TestClient[Any, Any]) -> None:
    response = await client.get("/api/v1/sessions/00000000-0000-4000-8000-000000000000")
    await assert_error(response, 404, "NotFound", mentions="00000000")


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "empty"),
        (b"[1, 2]", "object"),
        (b'{"endpoint": "http://127.0.0.1:8001"}', "service_id"),
        (b'{"service_id": "", "endpoint": "http://127.0.0.1:8001"}', "service_id"),
        (b'{"service_id": 42, "endpoint": "http://127.0.0.1:8001"}', "service_id"),
        (b'{"service_id": "a"}', "endpoint"),
        (b'{"service_id": "a", "endpoint": "localhost:8001"}', "endpoint"),
        (b'{"service_id": "a", "endpoint": "ftp://127.0.0.1/x"}', "endpoint"),
        (b'{"service_id": "a", "endpoint": "/relative"}', "endpoint"),
        (b'{"service_id": "a", "endpoint": "http://127.0.0.1:1", "metadata": "x"}', "metadata"),
        (b'{"service_id": "a b", "endpoint": "http://127.0.0.1:1"}', "service_id"),
    ],
)
async def test_invalid_registration_is_400(
    client: TestClient[Any, Any], body: bytes, mentions: str
) -> None:
    response = await client.post(
        "/api/v1/microservices/register", data=body, headers={"Content-Type": "application/json"}
    )
    await assert_error(response, 400, "InvalidRequest", mentions=mentions)


async def test_duplicate_registration_is_400_and_keeps_the_first(
    client: TestClient[Any, Any],
) -> None:
    first = {"service_id": "asr-service-1", "endpoint": "http://localhost:8001"}
    assert (await client.post("/api/v1/microservices/register", json=first)).status == 200
    second = {"service_id": "asr-service-1", "endpoint": "http://localhost:9999"}
    response = await client.post("/api/v1/microservices/register", json=second)
    await assert_error(response, 400, "InvalidRequest", mentions="Service ID already exists")


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        (b"{}", "user_identity"),
        (b'{"user_identity": ""}', "user_identity"),
        (b'{"user_identity": "   "}', "user_identity"),
        (b'{"user_identity": 123}', "user_identity"),
        (b'{"user_identity": "u", "required_services": "asr"}', "required_services"),
        (b'{"user_identity": "u", "required_services": [1]}', "required_services"),
        (b'{"user_identity": "u", "metadata": []}', "metadata"),
        (b'{"user_identity": "u", "metadata": {"duration_limit": "soon"}}', "duration_limit"),
        (b'{"user_identity": "u", "metadata": {"duration_limit": -5}}', "duration_limit"),
        (b'{"user_identity": "u", "room_name": "has space"}', "room_name"),
        (b'{"user_identity": "u", "wait_until_ready": "yes"}', "wait_until_ready"),
        (b'{"user_identity": "u", "wait_until_ready": true, "timeout_secs": 0}', "timeout_secs"),
        (b'{"user_identity": "u", "timeout_secs": 5}', "timeout_secs"),
        (b'{"user_identity": "u", "required_service": []}', "required_service"),
    ],
)
async def test_invalid_create_session_is_400(
    client: TestClient[Any, Any], body: bytes, mentions: str
) -> None:
    response = await client.post(
        "/api/v1/create-session", data=body, headers={"Content-Type": "application/json"}
    )
    await assert_error(response, 400, "InvalidRequest", mentions=mentions)


async def test_oversized_body_is_413(client: TestClient[Any, Any]) -> None:
    body = b'{"user_identity": "' + b"x" * 10_000 + b'"}'
    response = await client.post("/api/v1/create-session", data=body)
    await assert_error(response, 413, "PayloadTooLarge")


async def test_livekit_down_is_503_with_a_clear_message(client: TestClient[Any, Any]) -> None:
    response = await client.post(
        "/api/v1/create-session", json={"user_identity": "u", "required_services": []}
    )
    await assert_error(response, 503, "LiveKitUnavailable", mentions="LiveKit")


async def test_webhooks_nothing_acts_on_are_ignored_unverified(
    client: TestClient[Any, Any],
) -> None:
    response = await client.post("/livekit/webhook", data=b'{"event": "room_started"}')
    assert response.status == 200
    assert await response.text() == "ignored"
    forged = await client.post("/livekit/webhook", data=b'{"event": "room_finished"}')
    await assert_error(forged, 401, "Unauthorized", mentions="missing Authorization")
    garbage = await client.post("/livekit/webhook", data=b"<xml/>")
    await assert_error(garbage, 400, "InvalidRequest", mentions="JSON")


async def test_browser_pages_may_call_the_api(client: TestClient[Any, Any]) -> None:
    origin = {"Origin": "http://localhost:3000"}
    preflight = await client.options(
        "/api/v1/create-session",
        headers={
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "Content-Type" in preflight.headers["Access-Control-Allow-Headers"]

    answer = await client.get("/health", headers=origin)
    assert answer.headers["Access-Control-Allow-Origin"] == "*"
    error = await client.get("/nope", headers=origin)
    assert error.status == 404 and error.headers["Access-Control-Allow-Origin"] == "*"
    stream = await client.get("/api/v1/events", headers={**origin, "Accept": "text/event-stream"})
    assert stream.headers["Access-Control-Allow-Origin"] == "*"
    stream.close()


async def test_only_listed_origins_when_restricted(aiohttp_client: Any, tmp_path: Path) -> None:
    settings = Settings.model_validate(
        {
            "livekit_url": "ws://127.0.0.1:9",
            "livekit_api_key": "k",
            "livekit_api_secret": "s",
            "data_dir": tmp_path,
            "cors_allow_origins": "https://app.example.test",
        }
    )
    client = await aiohttp_client(create_app(settings))
    good = await client.get("/health", headers={"Origin": "https://app.example.test"})
    assert good.headers["Access-Control-Allow-Origin"] == "https://app.example.test"
    bad = await client.get("/health", headers={"Origin": "https://evil.example.test"})
    assert "Access-Control-Allow-Origin" not in bad.headers


class _Strict(BaseModel):
    name: str

    @field_validator("name")
    @classmethod
    def _convert(cls, value: str) -> str:
        return str(float(value))  # raises ValueError("could not convert string to float: ...")


def test_validation_messages_name_the_field_not_python() -> None:
    with pytest.raises(ValidationError) as caught:
        _Strict.model_validate({"name": "soon"})
    message = describe_validation_error(caught.value)
    assert message.startswith("name: ")
    assert "could not convert" not in message and "Value error" not in message


def test_a_client_key_of_any_length_is_shortened_in_the_message() -> None:
    with pytest.raises(ValidationError) as caught:
        CreateSessionRequest.model_validate_json(
            b'{"user_identity": "u", "' + b"k" * 5000 + b'": 1}'
        )
    message = describe_validation_error(caught.value)
    assert "Extra inputs are not permitted" in message
    assert len(message) < 200


async def test_a_body_that_breaks_its_framing_is_400(aiohttp_client: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        raise web.RequestPayloadError("Not enough data to satisfy content length header.")

    app = web.Application(middlewares=[error_middleware])
    app.router.add_post("/", handler)
    client = await aiohttp_client(app)
    await assert_error(await client.post("/", data=b"{}"), 400, "InvalidRequest", mentions="body")


async def test_non_finite_numbers_anywhere_are_400(client: TestClient[Any, Any]) -> None:
    for raw in (
        b'{"user_identity": "u", "metadata": {"duration_limit": "inf"}}',
        b'{"user_identity": "u", "metadata": {"duration_limit": 1e400}}',
        b'{"user_identity": "u", "metadata": {"duration_limit": "1e308"}}',
        b'{"user_identity": "u", "metadata": {"a": [NaN]}}',
    ):
        response = await client.post("/api/v1/create-session", data=raw)
        await assert_error(response, 400, "InvalidRequest", mentions="metadata")
