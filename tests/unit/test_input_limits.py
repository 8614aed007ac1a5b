"""Every bound on input, at its edge and one past it: accepted there, refused past it with the
error envelope naming the field (400 `InvalidRequest` for a field, 431/414/413 for a request
that is too big for HTTP).

The manager is served by `ApiRunner`, as in production, on 127.0.0.1. Most tests point it at a
LiveKit that is not running: what they send is refused before LiveKit would be called, or does
not need it (registrations, listings, events). The create-session edges need a real LiveKit and
are marked `integration`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web, web_protocol
from aiohttp.http_parser import HttpRequestParserPy
from aiohttp.test_utils import BaseTestServer, TestClient, TestServer
from aiohttp.web_runner import BaseRunner

from session_manager.api import limits
from session_manager.api.app import create_app
from session_manager.api.http_server import (
    MAX_HEADER_FIELD,
    MAX_HEADERS,
    MAX_REQUEST_LINE,
    ApiRunner,
)
from session_manager.config import Settings
from tests.conftest import LiveKitUnderTest, free_port

ENVELOPE_KEYS = {"error", "message", "timestamp"}
# What must never reach a caller: Python's own words about an exception.
PYTHON_TEXT = re.compile(
    r"Traceback|Error:|Error\(|OverflowError|ValueError|TypeError|KeyError|Exception|"
    r"could not convert|invalid literal|Value error|object has no attribute|codec can't"
)
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


class ApiTestServer(TestServer):
    """aiohttp's test server, run by the production runner."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return ApiRunner(self.app, **kwargs)


def check_envelope(status: int, body: bytes) -> dict[str, Any]:
    """The error envelope, with nothing of Python in it."""
    envelope = orjson.loads(body)
    assert isinstance(envelope, dict) and set(envelope) == ENVELOPE_KEYS, envelope
    assert all(isinstance(envelope[key], str) for key in ENVELOPE_KEYS), envelope
    assert envelope["timestamp"].endswith("Z")
    datetime.fromisoformat(envelope["timestamp"].replace("Z", "+00:00"))
    assert not PYTHON_TEXT.search(envelope["message"]), envelope["message"]
    return envelope


async def assert_refused(response: Any, status: int, error: str, *, names: str) -> None:
    assert response.status == status, (response.status, await response.text())
    assert response.content_type == "application/json"
    envelope = check_envelope(response.status, await response.read())
    assert envelope["error"] == error, envelope
    assert names in envelope["message"], envelope["message"]


# raw HTTP -----------------------------------------------------------------------------------


async def raw_request(server: BaseTestServer, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are; return the status, headers and body of the answer (an event
    stream's body is not waited for)."""
    assert server.port is not None
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(request)
        with contextlib.suppress(ConnectionError):  # refused before all was sent
            await writer.drain()
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head.decode("latin-1").split("\r\n")
            status = int(status_line.split(" ", 2)[1])
            if status >= 200:  # skip "100 Continue"
                break
        headers: dict[str, str] = {}
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if request.startswith(b"HEAD ") or "text/event-stream" in headers.get("content-type", ""):
            body = b""
        elif "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = await _dechunk(reader)
        else:
            body = await reader.read()
        return status, headers, body
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _dechunk(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
    return b"".join(parts)


def http_request(
    method: str,
    target: bytes,
    *,
    headers: Sequence[tuple[bytes, bytes]] = (),
    body: bytes = b"",
) -> bytes:
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1"]
    lines += [name + b": " + value for name, value in headers]
    if body:
        lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# fixtures -----------------------------------------------------------------------------------


def offline_settings(tmp_path: Path, **overrides: Any) -> Settings:
    return Settings.model_validate(
        {
            "port": 0,
            "livekit_url": f"ws://127.0.0.1:{free_port()}",  # nothing listens there
            "livekit_api_key": "key",
            "livekit_api_secret": "secret-secret-secret-secret-secret",
            "livekit_timeout": 1.0,
            "data_dir": tmp_path,
            **overrides,
        }
    )


@pytest.fixture(params=["c", "python"])
def http_parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """aiohttp parses requests with llhttp (its C extension) or, without it, in Python; the two
    report a too-long line differently, and both must get the envelope."""
    if request.param == "python":
        monkeypatch.setattr(web_protocol, "HttpRequestParser", HttpRequestParserPy)
    yield request.param


async def _offline_client(
    aiohttp_client: Any, tmp_path: Path, **overrides: Any
) -> TestClient[Any, Any]:
    app = create_app(offline_settings(tmp_path, **overrides))
    result: TestClient[Any, Any] = await aiohttp_client(ApiTestServer(app))
    return result


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path) -> TestClient[Any, Any]:
    """Default settings: max_metadata_bytes 16384, max_session_duration 86400."""
    return await _offline_client(aiohttp_client, tmp_path)


@pytest.fixture
async def raw_client(aiohttp_client: Any, tmp_path: Path, http_parser: str) -> TestClient[Any, Any]:
    """For HTTP-level bounds, once per aiohttp parser; max_body_bytes is 4096."""
    return await _offline_client(aiohttp_client, tmp_path, max_body_bytes=4096)


def encode(body: object) -> bytes:
    """JSON as a client would send it; orjson would refuse the integers beyond 64 bits."""
    return json.dumps(body, ensure_ascii=False).encode()


def create_body(**fields: Any) -> dict[str, Any]:
    return {"user_identity": "u", "required_services": [], **fields}


def nested(depth: int, leaf: Any = 1) -> Any:
    """An object `depth` levels deep: nested(1) is {"k": 1}."""
    value = leaf
    for _ in range(depth):
        value = {"k": value}
    return value


def metadata_of_size(size: int, **fields: Any) -> dict[str, Any]:
    """Metadata holding `fields` whose JSON is exactly `size` bytes."""
    metadata = {**fields, "pad": ""}
    metadata["pad"] = "x" * (size - len(orjson.dumps(metadata)))
    assert len(orjson.dumps(metadata)) == size
    return metadata


# body fields, past the edge -----------------------------------------------------------------

CREATE_REFUSED = [
    pytest.param(create_body(user_identity="x" * 257), "user_identity", id="user_identity-257"),
    pytest.param(create_body(user_identity="é" * 129), "user_identity", id="user_identity-bytes"),
    pytest.param(create_body(user_identity="a\x00b"), "user_identity", id="user_identity-nul"),
    pytest.param(create_body(user_name="x" * 257), "user_name", id="user_name-257"),
    pytest.param(create_body(user_name="a\nb"), "user_name", id="user_name-control"),
    pytest.param(create_body(room_name="r" * 257), "room_name", id="room_name-257"),
    pytest.param(create_body(room_name="语" * 86), "room_name", id="room_name-bytes"),
    pytest.param(create_body(room_name="a\x7fb"), "room_name", id="room_name-control"),
    pytest.param(create_body(required_services=["s"] * 33), "required_services", id="services-33"),
    pytest.param(
        create_body(required_services=["s" * 129]), "required_services", id="service-id-129"
    ),
    pytest.param(
        create_body(wait_until_ready=True, timeout_secs=0.99), "timeout_secs", id="timeout-low"
    ),
    pytest.param(
        create_body(wait_until_ready=True, timeout_secs=3600.01), "timeout_secs", id="timeout-high"
    ),
    pytest.param(create_body(metadata={"duration_limit": 0}), "duration_limit", id="duration-0"),
    pytest.param(
        create_body(metadata={"duration_limit": 86400.001}), "duration_limit", id="duration-high"
    ),
    pytest.param(
        create_body(metadata={"duration_limit": "86401"}), "duration_limit", id="duration-str-high"
    ),
    pytest.param(
        create_body(metadata={"duration_limit": "inf"}), "duration_limit", id="duration-inf"
    ),
    pytest.param(
        create_body(metadata={"duration_limit": "1e308"}), "duration_limit", id="duration-1e308"
    ),
    pytest.param(
        create_body(metadata={"duration_limit": "nan"}), "duration_limit", id="duration-nan"
    ),
    pytest.param(
        create_body(metadata={"duration_limit": True}), "duration_limit", id="duration-bool"
    ),
    pytest.param(
        create_body(metadata={"duration_limit": "3_600"}), "duration_limit", id="duration-3_600"
    ),
    pytest.param(create_body(metadata={"n": INT64_MAX + 1}), "metadata", id="int64-max+1"),
    pytest.param(create_body(metadata={"n": [INT64_MIN - 1]}), "metadata", id="int64-min-1"),
    pytest.param(create_body(metadata={"n": 10**30}), "metadata", id="int-10e30"),
    pytest.param(create_body(metadata=nested(17)), "metadata", id="depth-17"),
    pytest.param(create_body(metadata={"k" * 257: 1}), "metadata", id="key-257"),
    pytest.param(create_body(metadata=metadata_of_size(16385)), "metadata", id="metadata-size+1"),
]


@pytest.mark.parametrize(("body", "field"), CREATE_REFUSED)
async def test_create_session_past_a_bound_is_400_naming_the_field(
    client: TestClient[Any, Any], body: dict[str, Any], field: str
) -> None:
    response = await client.post("/api/v1/create-session", data=encode(body))
    await assert_refused(response, 400, "InvalidRequest", names=field)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"user_identity": "u", "metadata": {"duration_limit": 1e400}}', "duration_limit"),
        (b'{"user_identity": "u", "metadata": {"n": NaN}}', "metadata"),
        (b'{"user_identity": "u", "metadata": {"n": [Infinity]}}', "metadata"),
        (b'{"user_identity": "u", "metadata": {"n": -Infinity}}', "metadata"),
        (b'{"user_identity": "u", "metadata": {"n": 1e400}}', "metadata"),
        (b'{"user_identity": "u", "wait_until_ready": true, "timeout_secs": NaN}', "timeout_secs"),
        (b'{"user_identity": "u", "metadata": {"n": "\\ud800"}}', "JSON"),
        (b'{"user_identity": "u", "metadata": ' + b"[" * 1000 + b"]" * 1000 + b"}", "JSON"),
    ],
    ids=[
        "1e400",
        "NaN",
        "Infinity",
        "-Infinity",
        "1e400-metadata",
        "NaN-timeout",
        "surrogate",
        "depth-1000",
    ],
)
async def test_non_finite_and_unparsable_json_is_400(
    client: TestClient[Any, Any], raw: bytes, field: str
) -> None:
    response = await client.post("/api/v1/create-session", data=raw)
    await assert_refused(response, 400, "InvalidRequest", names=field)


def register_body(**fields: Any) -> dict[str, Any]:
    return {"service_id": "svc-1", "endpoint": "http://127.0.0.1:9", **fields}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param(register_body(service_id="s" * 129), "service_id", id="service_id-129"),
        pytest.param(register_body(service_id="é" * 65), "service_id", id="service_id-bytes"),
        pytest.param(
            register_body(endpoint="http://127.0.0.1:9/" + "p" * 2030), "endpoint", id="url-2049"
        ),
        pytest.param(register_body(endpoint="http://127.0.0.1:99999"), "endpoint", id="port"),
        pytest.param(register_body(endpoint="http://[::1"), "endpoint", id="ipv6-unclosed"),
        pytest.param(register_body(endpoint="http://a b"), "endpoint", id="url-space"),
        pytest.param(register_body(metadata={"max_sessions": 0}), "max_sessions", id="max-0"),
        pytest.param(
            register_body(metadata={"max_sessions": 100_001}), "max_sessions", id="max-100001"
        ),
        pytest.param(register_body(metadata={"max_sessions": 2.5}), "max_sessions", id="max-2.5"),
        pytest.param(register_body(metadata={"max_sessions": "5"}), "max_sessions", id="max-str"),
        pytest.param(register_body(metadata={"max_sessions": True}), "max_sessions", id="max-bool"),
        pytest.param(register_body(metadata={"n": INT64_MAX + 1}), "metadata", id="int64"),
        pytest.param(register_body(metadata=nested(17)), "metadata", id="depth-17"),
        pytest.param(
            register_body(metadata=metadata_of_size(16385)), "metadata", id="metadata-size+1"
        ),
    ],
)
async def test_register_past_a_bound_is_400_naming_the_field(
    client: TestClient[Any, Any], body: dict[str, Any], field: str
) -> None:
    response = await client.post("/api/v1/microservices/register", data=encode(body))
    await assert_refused(response, 400, "InvalidRequest", names=field)


async def test_max_sessions_1e400_is_400_and_the_manager_goes_on(
    client: TestClient[Any, Any],
) -> None:
    metadata = b'"metadata": {"max_sessions": 1e400}'
    register = b'{"service_id": "s1", "endpoint": "http://127.0.0.1:9", ' + metadata + b"}"
    response = await client.post("/api/v1/microservices/register", data=register)
    await assert_refused(response, 400, "InvalidRequest", names="max_sessions")
    update = await client.put("/api/v1/microservices/s1", data=b"{" + metadata + b"}")
    await assert_refused(update, 400, "InvalidRequest", names="max_sessions")
    # The supervisor lives on: it still registers and lists.
    body = {"service_id": "s1", "endpoint": "http://127.0.0.1:9"}
    assert (await client.post("/api/v1/microservices/register", json=body)).status == 200
    assert (await client.get("/api/v1/microservices/s1")).status == 200


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        pytest.param(b'{"metadata": {"max_sessions": 100001}}', "max_sessions", id="max_sessions"),
        pytest.param(b'{"endpoint": "http://h/' + b"p" * 2048 + b'"}', "endpoint", id="endpoint"),
        pytest.param(b'{"metadata": {"n": Infinity}}', "metadata", id="infinity"),
    ],
)
async def test_update_past_a_bound_is_400_naming_the_field(
    client: TestClient[Any, Any], raw: bytes, field: str
) -> None:
    response = await client.put("/api/v1/microservices/svc-1", data=raw)
    await assert_refused(response, 400, "InvalidRequest", names=field)


async def test_add_service_id_past_the_bound_is_400(client: TestClient[Any, Any]) -> None:
    response = await client.post(
        "/api/v1/sessions/00000000-0000-4000-8000-000000000000/services",
        data=encode({"service": "s" * 129}),
    )
    await assert_refused(response, 400, "InvalidRequest", names="service")


# body fields, at the edge (no LiveKit needed) -----------------------------------------------


async def test_registration_at_every_edge_is_kept_and_read_back_unchanged(
    client: TestClient[Any, Any],
) -> None:
    service_id = "é" * 64  # 128 bytes
    edge_fields = {
        "max_sessions": 100_000,
        "big": INT64_MAX,
        "small": INT64_MIN,
        "deep": nested(14, [1.5e308, -0.0]),  # the metadata object + 14 + the list: depth 16
        "k" * 256: "256-byte key",
    }
    metadata = metadata_of_size(16384, **edge_fields)
    endpoint = "http://127.0.0.1:9/" + "p" * (2048 - len("http://127.0.0.1:9/"))
    body = {"service_id": service_id, "endpoint": endpoint, "metadata": metadata}
    response = await client.post("/api/v1/microservices/register", data=encode(body))
    assert response.status == 200, await response.text()

    view = await (await client.get(f"/api/v1/microservices/{service_id}")).json()
    assert view["metadata"] == metadata
    assert view["endpoint"] == endpoint
    assert view["max_sessions"] == 100_000

    update = await client.put(
        f"/api/v1/microservices/{service_id}", json={"metadata": {"max_sessions": 1}}
    )
    assert update.status == 200, await update.text()
    assert (await update.json())["max_sessions"] == 1


# query parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("/api/v1/sessions?limit=0", "limit"),
        ("/api/v1/sessions?limit=501", "limit"),
        ("/api/v1/sessions?limit=1e3", "limit"),
        ("/api/v1/sessions?limit=" + "9" * 5000, "limit"),
        ("/api/v1/sessions?cursor=%ff%fe", "cursor"),
        ("/api/v1/events?since=-1", "since"),
        (f"/api/v1/events?since={INT64_MAX + 1}", "since"),
        ("/api/v1/events?since=1.5", "since"),
        ("/api/v1/events?limit=0", "limit"),
        ("/api/v1/events?limit=1001", "limit"),
        ("/api/v1/events?last_event_id=-1", "last_event_id"),
    ],
)
async def test_query_past_a_bound_is_400_naming_the_parameter(
    client: TestClient[Any, Any], query: str, field: str
) -> None:
    response = await client.get(query, headers={"Accept": "text/event-stream"})
    await assert_refused(response, 400, "InvalidRequest", names=field)


@pytest.mark.parametrize(
    "query",
    [
        "/api/v1/sessions?limit=1",
        "/api/v1/sessions?limit=500",
        "/api/v1/events?since=0",
        f"/api/v1/events?since={INT64_MAX}",
        "/api/v1/events?limit=1",
        "/api/v1/events?limit=1000",
    ],
)
async def test_query_at_the_edge_is_answered(client: TestClient[Any, Any], query: str) -> None:
    response = await client.get(query)
    assert response.status == 200, await response.text()


async def test_last_event_id_header_past_the_bound_is_400(client: TestClient[Any, Any]) -> None:
    response = await client.get(
        "/api/v1/events",
        headers={"Accept": "text/event-stream", "Last-Event-ID": str(INT64_MAX + 1)},
    )
    await assert_refused(response, 400, "InvalidRequest", names="Last-Event-ID")


@pytest.mark.parametrize("key", ["k" * 256, "ключ", "a\tb"], ids=["256", "non-ascii", "tab"])
async def test_idempotency_key_past_the_bound_is_400(
    client: TestClient[Any, Any], key: str
) -> None:
    response = await client.post(
        "/api/v1/create-session",
        json=create_body(),
        headers={"Idempotency-Key": key},
    )
    await assert_refused(response, 400, "InvalidRequest", names="Idempotency-Key")


# HTTP itself: header fields, request line, body ---------------------------------------------


def header_line(size: int) -> tuple[bytes, bytes]:
    """A header whose line (`X-Pad: value`) is `size` bytes."""
    return b"X-Pad", b"v" * (size - len(b"X-Pad: "))


async def test_header_line_at_the_edge_is_answered(raw_client: TestClient[Any, Any]) -> None:
    server = raw_client.server
    request = http_request(
        "GET", b"/api/v1/events?since=0", headers=[header_line(MAX_HEADER_FIELD)]
    )
    status, _, _ = await raw_request(server, request)
    assert status == 200


async def test_oversized_header_is_431_envelope(raw_client: TestClient[Any, Any]) -> None:
    server = raw_client.server
    for value_size in (MAX_HEADER_FIELD + 1, 20_000):
        request = http_request(
            "GET", b"/api/v1/events?since=0", headers=[(b"X-Pad", b"v" * value_size)]
        )
        status, headers, body = await raw_request(server, request)
        assert status == 431
        assert headers["content-type"].startswith("application/json")
        envelope = check_envelope(status, body)
        assert envelope["error"] == "RequestHeaderFieldsTooLarge"
        assert "header" in envelope["message"]


async def test_too_many_headers_is_431_envelope(raw_client: TestClient[Any, Any]) -> None:
    server = raw_client.server
    # Host and Connection count too; aiohttp's Python parser also counts the request line and
    # the empty line after the headers: MAX_HEADERS - 2 fields always fit.
    fits = [(b"X-%d" % i, b"1") for i in range(MAX_HEADERS - 4)]
    status, _, _ = await raw_request(server, http_request("GET", b"/api/v1/events", headers=fits))
    assert status == 200
    too_many = [(b"X-%d" % i, b"1") for i in range(MAX_HEADERS)]
    status, _, body = await raw_request(
        server, http_request("GET", b"/api/v1/events", headers=too_many)
    )
    assert status == 431
    assert check_envelope(status, body)["error"] == "RequestHeaderFieldsTooLarge"


async def test_request_line_at_the_edge_is_answered(raw_client: TestClient[Any, Any]) -> None:
    server = raw_client.server
    start = b"/api/v1/events?since=0&pad="
    # The whole line "GET <url> HTTP/1.1" is MAX_REQUEST_LINE: within both parsers' limit.
    url = start + b"p" * (MAX_REQUEST_LINE - len(b"GET  HTTP/1.1") - len(start))
    status, _, _ = await raw_request(server, http_request("GET", url))
    assert status == 200


async def test_too_long_request_line_is_414_envelope(raw_client: TestClient[Any, Any]) -> None:
    server = raw_client.server
    for size in (MAX_REQUEST_LINE + 1, 20_000):
        url = b"/api/v1/events?pad=" + b"p" * (size - len(b"/api/v1/events?pad="))
        status, _, body = await raw_request(server, http_request("GET", url))
        assert status == 414
        envelope = check_envelope(status, body)
        assert envelope["error"] == "URITooLong"
        assert "URL" in envelope["message"]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # TLS on the HTTP port
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"POST /api/v1/create-session HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\n{}\r\n0\r\n\r\n",
        b"POST /api/v1/create-session HTTP/1.1\r\nHost: a\r\n"
        b"Content-Length: 99999999999999999999999999\r\n\r\n",
    ],
    ids=["tls", "nul-header", "two-lengths", "bad-chunk", "length-overflow"],
)
async def test_malformed_http_is_400_envelope(
    client: TestClient[Any, Any], request_bytes: bytes
) -> None:
    # The C parser only: the Python one takes an overflowing Content-Length as a promise of
    # that many bytes and waits for them, as for any client that sends less than it announced.
    server = client.server
    status, _, body = await raw_request(server, request_bytes)
    assert status == 400
    assert check_envelope(status, body)["error"] == "InvalidRequest"


@pytest.mark.parametrize("expect", [b"something", b"\xff\xfe"], ids=["unknown", "not-utf8"])
async def test_an_expectation_other_than_100_continue_is_417_envelope(
    raw_client: TestClient[Any, Any], expect: bytes
) -> None:
    # aiohttp answers Expect before any middleware: in plain text, or 500 when not UTF-8.
    server = raw_client.server
    request = http_request("GET", b"/api/v1/events", headers=[(b"Expect", expect)])
    status, _, body = await raw_request(server, request)
    assert status == 417
    assert check_envelope(status, body)["error"] == "ExpectationFailed"


async def test_100_continue_is_still_honoured(raw_client: TestClient[Any, Any]) -> None:
    response = await raw_client.post(
        "/api/v1/microservices/register",
        json={"service_id": "s1", "endpoint": "http://127.0.0.1:9"},
        expect100=True,
    )
    assert response.status == 200, await response.text()


@pytest.mark.parametrize(
    "authorization", [b"Bearer \xff\xfe", b"Bearer a.b.c"], ids=["not-utf8", "not-a-token"]
)
async def test_webhook_authorization_that_is_no_token_is_401_envelope(
    raw_client: TestClient[Any, Any], authorization: bytes
) -> None:
    server = raw_client.server
    request = http_request(
        "POST",
        b"/livekit/webhook",
        headers=[(b"Authorization", authorization)],
        body=b'{"event": "room_finished", "room": {"name": "r"}}',
    )
    status, _, body = await raw_request(server, request)
    assert status == 401
    envelope = check_envelope(status, body)
    assert envelope["error"] == "Unauthorized"
    assert envelope["message"] in (
        "webhook rejected: Authorization is not a token",
        "webhook rejected: bad signature",
    )


async def test_body_over_max_body_bytes_is_413_envelope(
    raw_client: TestClient[Any, Any],
) -> None:
    body = orjson.dumps(create_body(user_name="x" * 5000))  # max_body_bytes is 4096 here
    response = await raw_client.post("/api/v1/create-session", data=body)
    await assert_refused(response, 413, "PayloadTooLarge", names="too large")
    server = raw_client.server
    chunk = b"800\r\n" + b" " * 0x800 + b"\r\n"
    chunked = (
        b"POST /api/v1/create-session HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n" + chunk * 3 + b"0\r\n\r\n"
    )
    status, _, answer = await raw_request(server, chunked)
    assert status == 413
    assert check_envelope(status, answer)["error"] == "PayloadTooLarge"


# create-session at the edge, on a real LiveKit ----------------------------------------------


@pytest.fixture
async def manager_api(
    aiohttp_client: Any, livekit: LiveKitUnderTest, make_settings: Callable[..., Settings]
) -> TestClient[Any, Any]:
    """A manager on the real LiveKit, served by ApiRunner."""
    app: web.Application = create_app(make_settings(), api_port=livekit.webhook_port)
    result: TestClient[Any, Any] = await aiohttp_client(
        ApiTestServer(app, port=livekit.webhook_port)
    )
    return result


@pytest.mark.integration
async def test_create_session_at_every_edge_round_trips(
    manager_api: TestClient[Any, Any],
) -> None:
    edges = {
        "duration_limit": "86400",
        "big": INT64_MAX,
        "small": INT64_MIN,
        "float": 1.7976931348623157e308,
        "tiny": 5e-324,
        "deep": nested(15),  # with the metadata object itself: depth 16
        "k" * 256: "key of 256 bytes",
        "text": "语音 \u2028 🎉",
    }
    metadata = metadata_of_size(limits.DEFAULT_LIMITS.max_metadata_bytes, **edges)
    body = {
        "user_identity": "é" * 128,  # 256 bytes, LiveKit's limit
        "user_name": "名" * 85 + "a",  # 256 bytes
        "room_name": "r" * 256,
        "metadata": metadata,
        "required_services": [],
        "wait_until_ready": True,
        "timeout_secs": 3600,
    }
    response = await manager_api.post(
        "/api/v1/create-session", data=encode(body), headers={"Idempotency-Key": "k" * 255}
    )
    assert response.status == 200, await response.text()
    created = await response.json()
    assert created["room_name"] == "r" * 256

    view = await (await manager_api.get(f"/api/v1/sessions/{created['session_id']}")).json()
    assert view["metadata"] == metadata
    assert orjson.loads(orjson.dumps(view["metadata"])) == metadata
    assert view["user_identity"] == body["user_identity"]


@pytest.mark.integration
@pytest.mark.parametrize(
    "fields",
    [
        {"metadata": {"duration_limit": 86400}},
        {"metadata": {"duration_limit": "0.5"}},
        {"metadata": {"duration_limit": None}},
        {"wait_until_ready": True, "timeout_secs": 1},
        {"required_services": []},
    ],
    ids=["duration-number", "duration-fraction", "duration-null", "timeout-1", "no-services"],
)
async def test_create_session_edges_are_accepted(
    manager_api: TestClient[Any, Any], fields: dict[str, Any]
) -> None:
    response = await manager_api.post("/api/v1/create-session", json=create_body(**fields))
    assert response.status == 200, await response.text()
