"""API keys, scopes and ownership (issue 9, parts 1, 2, 3 and 8, and no key in any log).

The manager here points at a LiveKit that is not running (a closed loopback port): every
refusal under test happens before LiveKit would be asked anything. Sessions that must exist are
made through the supervisor harness (fake LiveKit); through HTTP with a real LiveKit, see
tests/integration/test_auth.py.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from session_manager import cli
from session_manager.api import auth
from session_manager.api.app import create_app
from session_manager.api.auth import OPEN_CALLER, ROUTE_SCOPES, KeyTable, rule_for
from session_manager.api_keys import (
    MAX_API_KEYS,
    ApiKeyError,
    Scope,
    key_id_of,
    parse_api_key,
    parse_api_keys,
)
from session_manager.commands import (
    Access,
    AddSessionService,
    DeleteSession,
    DeregisterService,
    DrainService,
    GetService,
    GetSession,
    ListSessions,
    RegisterService,
    RemoveSessionService,
    UpdateService,
)
from session_manager.config import Settings, SettingsError, load_settings
from session_manager.errors import Forbidden, NotFound
from session_manager.store import SqliteStore
from tests.conftest import free_port
from tests.unit.conftest import HarnessFactory

Client = TestClient[web.Request, web.Application]

ADMIN_KEY = "admin-key-5f1c0e7d9a2b4c6e"
CLIENT_KEY = "client-key-8d3a6b1f0e9c2d4a"
OTHER_CLIENT_KEY = "client-key-2b7e4d9c1a0f3e5b"
SERVICE_KEY = "service-key-4c9e2a7d1b0f6e3a"
HASHED_SERVICE_KEY = "service-key-7a1d3f5b9c2e4a6d"  # configured by its hash only
UNKNOWN_KEY = "unknown-key-0f2e4d6c8b1a3e5d"
ALL_KEYS = (ADMIN_KEY, CLIENT_KEY, OTHER_CLIENT_KEY, SERVICE_KEY, HASHED_SERVICE_KEY, UNKNOWN_KEY)
KEY_ENTRIES = [
    f"{ADMIN_KEY} admin",
    f"{CLIENT_KEY} client",
    f"{OTHER_CLIENT_KEY} client",
    f"{SERVICE_KEY} service",
    f"sha256:{hashlib.sha256(HASHED_SERVICE_KEY.encode()).hexdigest()} service",
]
KEY_OF_SCOPE = {Scope.ADMIN: ADMIN_KEY, Scope.CLIENT: CLIENT_KEY, Scope.SERVICE: SERVICE_KEY}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
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


ClientFactory = Callable[..., Any]


@pytest.fixture
def make_client(aiohttp_client: Any, tmp_path: Path) -> ClientFactory:
    async def make(**overrides: Any) -> Client:
        result: Client = await aiohttp_client(create_app(settings_for(tmp_path, **overrides)))
        return result

    return make


@pytest.fixture
async def client(make_client: ClientFactory) -> Client:
    result: Client = await make_client(api_keys=KEY_ENTRIES)
    return result


async def assert_envelope(response: Any, status: int, error: str) -> dict[str, Any]:
    assert response.status == status, await response.text()
    body: dict[str, Any] = await response.json()
    assert set(body) == {"error", "message", "timestamp"}, body
    assert body["error"] == error
    datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00"))
    return body


# --- the key table -------------------------------------------------------------------------------


def test_an_entry_is_a_key_and_its_scopes() -> None:
    key = parse_api_key(f"{CLIENT_KEY} client,service")
    assert key.scopes == {Scope.CLIENT, Scope.SERVICE}
    assert key.digest == hashlib.sha256(CLIENT_KEY.encode()).digest()
    assert (
        key.key_id == hashlib.sha256(CLIENT_KEY.encode()).hexdigest()[:12] == key_id_of(CLIENT_KEY)
    )


def test_a_hashed_key_is_the_same_key_with_the_same_id() -> None:
    digest = hashlib.sha256(CLIENT_KEY.encode()).hexdigest()
    hashed = parse_api_key(f"sha256:{digest.upper()} admin")
    assert hashed.digest == parse_api_key(f"{CLIENT_KEY} admin").digest
    table = KeyTable([hashed])
    caller = table.resolve(CLIENT_KEY)
    assert caller is not None and caller.key_id == key_id_of(CLIENT_KEY) and caller.admin
    assert table.resolve(f"sha256:{digest}") is None  # the hash is not the key


@pytest.mark.parametrize(
    ("entry", "mentions"),
    [
        (CLIENT_KEY, "<key> <scope>"),
        (f"{CLIENT_KEY} ", "<key> <scope>"),
        (f"{CLIENT_KEY} client,", "<key> <scope>"),
        (f"{CLIENT_KEY} root", "unknown scope 'root'"),
        ("short-key client", "16 to 256"),
        ("k" * 257 + " client", "16 to 256"),
        ("clé-secrète-très-longue client", "printable ASCII"),
        ("sha256:abc client", "64 hex"),
        ("sha256:" + "g" * 64 + " client", "64 hex"),
    ],
)
def test_a_malformed_entry_is_refused_without_showing_the_key(entry: str, mentions: str) -> None:
    with pytest.raises(ApiKeyError) as caught:
        parse_api_keys([f"{ADMIN_KEY} admin", entry])
    message = str(caught.value)
    assert message.startswith("entry 2: ") and mentions in message, message
    key = entry.split(" ")[0]
    assert key not in message


def test_a_key_listed_twice_and_too_many_keys_are_refused() -> None:
    with pytest.raises(ApiKeyError, match="entry 2: the same key is listed twice"):
        parse_api_keys([f"{CLIENT_KEY} client", f"{CLIENT_KEY} admin"])
    too_many = [f"key-number-{n:08d}-xxxx client" for n in range(MAX_API_KEYS + 1)]
    with pytest.raises(ApiKeyError, match=f"at most {MAX_API_KEYS}"):
        parse_api_keys(too_many)


def test_keys_are_compared_as_digests_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The presented key is hashed, and its digest compared with compare_digest against every
    configured digest: no early exit when the first one matches."""
    table = KeyTable.parse(KEY_ENTRIES)
    real = hmac.compare_digest
    compared: list[tuple[Any, Any]] = []

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    caller = table.resolve(ADMIN_KEY)  # the first entry
    assert caller is not None and caller.admin
    assert len(compared) == len(KEY_ENTRIES)
    presented = hashlib.sha256(ADMIN_KEY.encode()).digest()
    assert all(a == presented and isinstance(b, bytes) and len(b) == 32 for a, b in compared)
    compared.clear()
    assert table.resolve(UNKNOWN_KEY) is None
    assert len(compared) == len(KEY_ENTRIES)


# --- settings ------------------------------------------------------------------------------------


def test_api_keys_come_from_toml_environment_and_flags(tmp_path: Path) -> None:
    config = tmp_path / "sm.toml"
    config.write_text(f'api_keys = ["{ADMIN_KEY} admin", "{CLIENT_KEY} client,service"]\n')
    from_file = load_settings({}, config_file=config, environ={})
    expected = [f"{ADMIN_KEY} admin", f"{CLIENT_KEY} client,service"]
    assert [e.get_secret_value() for e in from_file.api_keys] == expected
    joined = f"{ADMIN_KEY} admin; {CLIENT_KEY} client"
    from_env = load_settings({}, config_file=config, environ={"SESSION_MANAGER_API_KEYS": joined})
    assert len(from_env.api_keys) == 2
    from_flag = load_settings({"api_keys": f"{SERVICE_KEY} service"}, config_file=config)
    assert [e.get_secret_value() for e in from_flag.api_keys] == [f"{SERVICE_KEY} service"]
    assert ADMIN_KEY not in repr(from_env) and CLIENT_KEY not in str(from_env)


def test_a_bad_api_key_setting_names_the_setting_but_not_the_key() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"api_keys": f"{ADMIN_KEY} admin;{CLIENT_KEY} superuser"}, environ={})
    message = str(caught.value)
    assert message.startswith("invalid setting api_keys (from flag --api-keys)"), message
    assert "entry 2" in message and "superuser" in message
    assert ADMIN_KEY not in message and CLIENT_KEY not in message


@pytest.mark.parametrize("host", ["10.77.0.1", "0.0.0.0", "::", "example.test"])
def test_a_host_that_is_not_loopback_needs_api_keys(host: str) -> None:
    with pytest.raises(SettingsError, match="invalid setting api_keys: required when host"):
        load_settings({"host": host}, environ={})
    assert load_settings({"host": host, "api_keys": f"{ADMIN_KEY} admin"}, environ={}).api_keys
    assert load_settings({"host": host, "allow_unauthenticated": "true"}, environ={})


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_serves_without_keys(host: str) -> None:
    assert load_settings({"host": host}, environ={}).api_keys == []


def test_the_cli_refuses_a_public_host_without_keys_in_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no config file of the checkout
    for name in ("SESSION_MANAGER_API_KEYS", "SESSION_MANAGER_ALLOW_UNAUTHENTICATED"):
        monkeypatch.delenv(name, raising=False)

    def must_not_listen(host: str, port: int) -> Any:
        raise AssertionError(f"the manager went on to listen on {host}")

    monkeypatch.setattr(cli, "_listen_socket", must_not_listen)
    assert cli.main(["--host", "10.77.0.1", "--port", "0"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "api_keys" in lines[0], lines


# --- every route is declared, and refuses without the key or the scope ---------------------------


def app_routes(app: web.Application) -> list[tuple[str, str]]:
    found = set()
    for route in app.router.routes():
        if route.resource is not None:
            found.add((route.method, route.resource.canonical))
    return sorted(found)


ROUTES = app_routes(create_app(settings_for(Path("unused"), api_keys=KEY_ENTRIES)))


def declared(route: tuple[str, str]) -> tuple[str, str]:
    method, path = route
    return ("GET" if method == "HEAD" else method, path)


def test_every_route_of_the_app_declares_its_scopes() -> None:
    assert len(ROUTES) > 15
    undeclared = [route for route in ROUTES if declared(route) not in ROUTE_SCOPES]
    assert not undeclared, f"add these routes to api.auth.ROUTE_SCOPES: {undeclared}"


def concrete(path: str) -> str:
    return "/".join("x" if part.startswith("{") else part for part in path.split("/"))


CLOSED_ROUTES = [route for route in ROUTES if not rule_for(declared(route)).open]


@pytest.mark.parametrize("route", CLOSED_ROUTES, ids=lambda r: f"{r[0]} {r[1]}")
async def test_every_route_is_401_without_a_valid_key(
    client: Client, route: tuple[str, str]
) -> None:
    method, path = route
    for headers in ({}, bearer(UNKNOWN_KEY), {"Authorization": CLIENT_KEY}, bearer("")):
        response = await client.request(method, concrete(path), headers=headers)
        assert response.status == 401, (headers, await response.text())
        assert response.headers["WWW-Authenticate"] == "Bearer"
        if method != "HEAD":
            await assert_envelope(response, 401, "Unauthorized")


@pytest.mark.parametrize("route", CLOSED_ROUTES, ids=lambda r: f"{r[0]} {r[1]}")
async def test_every_route_is_403_for_a_key_without_its_scope(
    client: Client, route: tuple[str, str]
) -> None:
    method, path = route
    allowed = rule_for(declared(route)).scopes
    assert Scope.ADMIN in allowed  # an admin may do everything
    refused = [scope for scope in (Scope.CLIENT, Scope.SERVICE) if scope not in allowed]
    assert refused, f"{route}: every scope may use it"
    for scope in refused:
        response = await client.request(method, concrete(path), headers=bearer(KEY_OF_SCOPE[scope]))
        assert response.status == 403, (scope, await response.text())
        if method != "HEAD":
            await assert_envelope(response, 403, "Forbidden")


async def test_health_and_the_livekit_webhook_need_no_key(client: Client) -> None:
    assert (await client.get("/health")).status == 200
    webhook = await client.post("/livekit/webhook", data=b"{}")
    assert webhook.status == 400  # refused by what it carries, not for a missing key


async def test_the_right_scope_passes_and_a_hashed_key_works(client: Client) -> None:
    for key in (CLIENT_KEY, ADMIN_KEY):
        assert (await client.get("/api/v1/microservices", headers=bearer(key))).status == 200
    registration = {"service_id": "svc-hashed", "endpoint": "http://127.0.0.1:9"}
    response = await client.post(
        "/api/v1/microservices/register", json=registration, headers=bearer(HASHED_SERVICE_KEY)
    )
    assert response.status == 200, await response.text()
    mine = await client.get("/api/v1/microservices/svc-hashed", headers=bearer(HASHED_SERVICE_KEY))
    assert mine.status == 200
    assert (await client.get("/metrics", headers=bearer(ADMIN_KEY))).status == 200
    assert (await client.get("/api/v1/events?since=0", headers=bearer(ADMIN_KEY))).status == 200


async def test_an_unknown_path_needs_a_key_before_it_is_404(client: Client) -> None:
    await assert_envelope(await client.get("/api/v1/nothing-here"), 401, "Unauthorized")
    await assert_envelope(
        await client.get("/api/v1/nothing-here", headers=bearer(SERVICE_KEY)), 404, "NotFound"
    )


async def test_without_keys_everything_is_open_as_before(make_client: ClientFactory) -> None:
    open_client: Client = await make_client()
    assert (await open_client.get("/metrics")).status == 200
    assert (await open_client.get("/api/v1/sessions")).status == 200
    assert (await open_client.get("/api/v1/events?since=0")).status == 200
    registration = {"service_id": "svc-open", "endpoint": "http://127.0.0.1:9"}
    response = await open_client.post("/api/v1/microservices/register", json=registration)
    assert response.status == 200
    view = await (await open_client.get("/api/v1/microservices/svc-open")).json()
    assert view["service_id"] == "svc-open"


# --- CORS ----------------------------------------------------------------------------------------

PREFLIGHT = {"Origin": "https://app.example.test", "Access-Control-Request-Method": "POST"}


async def test_with_keys_no_origin_is_allowed_by_default(client: Client) -> None:
    preflight = await client.options("/api/v1/create-session", headers=PREFLIGHT)
    assert preflight.status == 204
    assert "Access-Control-Allow-Origin" not in preflight.headers
    assert "Access-Control-Allow-Methods" not in preflight.headers
    answer = await client.get(
        "/api/v1/microservices", headers={**bearer(CLIENT_KEY), "Origin": PREFLIGHT["Origin"]}
    )
    assert answer.status == 200 and "Access-Control-Allow-Origin" not in answer.headers


async def test_with_keys_a_listed_origin_gets_its_preflight_without_a_key(
    make_client: ClientFactory,
) -> None:
    listed: Client = await make_client(
        api_keys=KEY_ENTRIES, cors_allow_origins="https://app.example.test"
    )
    preflight = await listed.options("/api/v1/create-session", headers=PREFLIGHT)
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example.test"
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    refused = await listed.post(
        "/api/v1/create-session", json={}, headers={"Origin": PREFLIGHT["Origin"]}
    )
    await assert_envelope(refused, 401, "Unauthorized")
    assert refused.headers["Access-Control-Allow-Origin"] == "https://app.example.test"
    assert "WWW-Authenticate" in refused.headers["Access-Control-Expose-Headers"]


async def test_without_keys_any_origin_is_allowed_by_default(make_client: ClientFactory) -> None:
    open_client: Client = await make_client()
    preflight = await open_client.options("/api/v1/create-session", headers=PREFLIGHT)
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"


# --- no key in any log, answer or metric ---------------------------------------------------------


async def test_no_key_appears_in_logs_answers_or_metrics(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    secrets = [*ALL_KEYS, *(hashlib.sha256(k.encode()).hexdigest() for k in ALL_KEYS)]
    seen: list[str] = []
    with caplog.at_level(1):  # everything, TRACE included
        requests: list[tuple[str, str, str, Any]] = [
            ("GET", "/api/v1/sessions", CLIENT_KEY, None),
            ("GET", "/api/v1/sessions/nope", CLIENT_KEY, None),
            ("GET", "/api/v1/events?since=0", CLIENT_KEY, None),  # 403
            ("GET", "/api/v1/sessions", UNKNOWN_KEY, None),  # 401
            ("POST", "/api/v1/create-session", CLIENT_KEY, {"user_identity": "u"}),  # 503
            (
                "POST",
                "/api/v1/microservices/register",
                SERVICE_KEY,
                {"service_id": "svc-log", "endpoint": "http://127.0.0.1:9"},
            ),
            ("PUT", "/api/v1/microservices/svc-log", HASHED_SERVICE_KEY, {"draining": True}),
            ("GET", "/api/v1/microservices", OTHER_CLIENT_KEY, None),
            ("GET", "/metrics", ADMIN_KEY, None),
            ("GET", "/api/v1/events?since=0", ADMIN_KEY, None),
        ]
        for method, path, key, body in requests:
            response = await client.request(method, path, json=body, headers=bearer(key))
            seen.append(await response.text())
            seen.extend(f"{name}: {value}" for name, value in response.headers.items())
    seen += [record.getMessage() for record in caplog.records]
    seen += [repr(vars(record)) for record in caplog.records]
    assert caplog.records, "nothing was logged: the check would be empty"
    leaks = [(secret, text) for text in seen for secret in secrets if secret in text]
    assert not leaks, leaks[:3]


# --- ownership, in the supervisor ----------------------------------------------------------------

ANN = Access(owner="ann-key-id", admin=False)
BOB = Access(owner="bob-key-id", admin=False)
ADMIN = Access(owner="admin-key-id", admin=True)


async def test_a_client_sees_only_the_sessions_it_created(make_harness: HarnessFactory) -> None:
    h = await make_harness()
    created = await h.create(user_identity="u1", required_services=[], owner=ANN.owner)
    sid = created.session_id
    view = await h.ask(lambda r: GetSession(sid, r, access=ANN))
    assert view["owner"] == ANN.owner
    assert (await h.ask(lambda r: GetSession(sid, r, access=ADMIN)))["session_id"] == sid
    for make in (
        lambda r: GetSession(sid, r, access=BOB),
        lambda r: DeleteSession(sid, r, access=BOB),
        lambda r: AddSessionService(sid, "type:x", r, access=BOB),
        lambda r: RemoveSessionService(sid, "x", r, access=BOB),
    ):
        with pytest.raises(NotFound, match=f"Session {sid} not found"):
            await h.ask(make)

    async def listing(access: Access) -> list[str]:
        views = await h.ask(lambda r: ListSessions(None, None, 10, None, r, access=access))
        return [v["session_id"] for v in views]

    assert await listing(ANN) == [sid]
    assert await listing(BOB) == []
    assert await listing(ADMIN) == [sid]
    # Ended, and read from the store: still not Bob's.
    await h.ask(lambda r: DeleteSession(sid, r, access=ANN))
    await h.eventually(lambda: not h.supervisor.live_statuses(), "the session ended")
    with pytest.raises(NotFound):
        await h.ask(lambda r: GetSession(sid, r, access=BOB))
    assert (await h.ask(lambda r: GetSession(sid, r, access=ANN)))["status"] == "Terminated"


async def test_a_service_changes_only_what_it_registered(make_harness: HarnessFactory) -> None:
    h = await make_harness()
    await h.ask(lambda r: RegisterService("svc-a", "http://127.0.0.1:9", {}, r, access=ANN))
    for make in (
        lambda r: GetService("svc-a", r, access=BOB),
        lambda r: UpdateService("svc-a", "http://127.0.0.1:10", None, None, r, access=BOB),
        lambda r: DrainService("svc-a", r, access=BOB),
        lambda r: DeregisterService("svc-a", r, access=BOB),
    ):
        with pytest.raises(Forbidden, match="registered with another API key"):
            await h.ask(make)
    assert h.registry.get("svc-a").endpoint == "http://127.0.0.1:9"
    moved = await h.ask(
        lambda r: UpdateService("svc-a", "http://127.0.0.1:11", None, None, r, access=ANN)
    )
    assert moved["endpoint"] == "http://127.0.0.1:11"
    assert (await h.ask(lambda r: DrainService("svc-a", r, access=ADMIN)))["draining"] is True
    with pytest.raises(NotFound):
        await h.ask(lambda r: GetService("svc-none", r, access=BOB))
    assert h.registry.get("svc-a").stored()["owner"] == ANN.owner


async def test_ownership_is_stored_and_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SqliteStore(path)
    await store.open()
    for n, owner in enumerate(["ann", "bob", None, "ann"]):
        store.save_session(
            {
                "session_id": f"s{n}",
                "created_at": f"2026-01-01T00:00:0{n}.000Z",
                "status": "Terminated",
                "user_identity": "u",
                "owner": owner,
            }
        )
    mine = await store.list_sessions(
        status=None, user_identity=None, limit=10, before=None, owner="ann"
    )
    assert [v["session_id"] for v in mine] == ["s3", "s0"]  # from the views not yet written
    await store.aclose()
    again = SqliteStore(path)
    await again.open()
    try:
        for owner, expected in (
            ("ann", ["s3", "s0"]),
            ("bob", ["s1"]),
            (None, ["s3", "s2", "s1", "s0"]),
        ):
            listed = await again.list_sessions(
                status=None, user_identity=None, limit=10, before=None, owner=owner
            )
            assert [v["session_id"] for v in listed] == expected, owner
        page = await again.list_sessions(
            status=None, user_identity=None, limit=1, before=None, owner="ann"
        )
        assert [v["session_id"] for v in page] == ["s3"]
    finally:
        await again.aclose()


def test_the_open_caller_owns_nothing_and_may_do_everything() -> None:
    assert OPEN_CALLER.access == Access(owner=None, admin=True)
    assert Access().may_use("anyone") and Access().owner_filter is None
    assert not BOB.may_use(ANN.owner) and BOB.may_use(BOB.owner) and ADMIN.may_use(ANN.owner)
    assert BOB.owner_filter == BOB.owner and ADMIN.owner_filter is None
