"""`GET /openapi.json` and `GET /docs`: the document covers exactly the routes the app serves,
validates as OpenAPI 3.1, and the docs page loads nothing from outside the manager."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate
from openapi_spec_validator.versions.shortcuts import get_spec_version

from session_manager.api.app import create_app
from session_manager.api.auth import ROUTE_SCOPES
from session_manager.api.console import CONSOLE_ASSETS_PATH
from session_manager.api.docs import (
    CONTENT_SECURITY_POLICY,
    DOCS_ASSETS_PATH,
    INIT_NAME,
    PACKAGE_ASSETS,
    assets_dir,
)
from session_manager.api.limits import MAX_SERVICE_ID_BYTES, MAX_TIMEOUT_SECS
from session_manager.api.openapi import OPERATIONS, build_document
from tests.unit.test_auth import ADMIN_KEY, KEY_ENTRIES, settings_for

Client = TestClient[web.Request, web.Application]

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


def served_routes(app: web.Application) -> set[tuple[str, str]]:
    """(method, path template) of every route, without HEAD twins and the docs' and the
    console's asset files."""
    found = set()
    for route in app.router.routes():
        resource = route.resource
        if resource is None or route.method == "HEAD":
            continue
        if resource.canonical in (DOCS_ASSETS_PATH, CONSOLE_ASSETS_PATH):
            continue
        found.add((route.method, resource.canonical))
    return found


def documented_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def test_every_route_the_app_serves_is_documented_and_nothing_else() -> None:
    app = create_app(settings_for(Path("unused")))
    served = served_routes(app)
    documented = documented_operations(build_document())
    assert len(served) > 18
    assert served - documented == set(), "routes missing from the OpenAPI document"
    assert documented - served == set(), "documented operations the app does not serve"


def test_the_document_is_valid_openapi_3_1() -> None:
    document = build_document()
    assert document["openapi"] == "3.1.0"
    assert get_spec_version(document).major == "3"
    validate(document)  # raises on any error
    # Every $ref points at a schema that is there.
    text = orjson.dumps(document).decode()
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', text))
    assert refs and refs <= set(document["components"]["schemas"])


def test_every_operation_documents_its_errors_as_the_envelope_and_its_scopes() -> None:
    document = build_document()
    for operation in OPERATIONS:
        doc = document["paths"][operation.path][operation.method.lower()]
        rule = ROUTE_SCOPES[(operation.method, operation.path)]
        assert "200" in doc["responses"]
        assert doc["x-scopes"] == sorted(scope.value for scope in rule.scopes)
        if rule.open:
            assert doc["security"] == []
        else:
            assert doc["security"] == [{"bearerAuth": []}]
            assert {"401", "403", "429"} <= set(doc["responses"])
        for status, response in doc["responses"].items():
            if status == "200" or operation.path == "/health":
                continue
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorEnvelope"}, (operation, status)
        if "{" in operation.path:
            assert "404" in doc["responses"]
        if operation.request is not None:
            assert {"400", "413"} <= set(doc["responses"])


def test_request_bodies_carry_the_models_bounds() -> None:
    schemas = build_document()["components"]["schemas"]
    create = schemas["CreateSessionRequest"]
    assert create["additionalProperties"] is False
    assert create["required"] == ["user_identity"]
    timeout = create["properties"]["timeout_secs"]["anyOf"][0]
    assert timeout["maximum"] == MAX_TIMEOUT_SECS
    services = create["properties"]["required_services"]["anyOf"][0]
    assert services["maxItems"] == 32
    assert services["items"]["maxLength"] == MAX_SERVICE_ID_BYTES
    register = schemas["RegisterServiceRequest"]
    assert register["properties"]["endpoint"]["maxLength"] == 2048
    assert register["properties"]["service_id"]["minLength"] == 1
    answers = {"SessionView", "ServiceView", "EventView", "EventPage", "ErrorEnvelope"}
    assert answers <= set(schemas)
    assert set(schemas["ErrorEnvelope"]["required"]) == {"error", "message", "timestamp"}


@pytest.fixture
async def keyed(aiohttp_client: Any, tmp_path: Path) -> Client:
    """A manager with API keys: the document and the page are open all the same."""
    client: Client = await aiohttp_client(create_app(settings_for(tmp_path, api_keys=KEY_ENTRIES)))
    return client


async def test_the_document_is_served_open_cached_and_revalidated(keyed: Client) -> None:
    response = await keyed.get("/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == orjson.loads(orjson.dumps(build_document()))
    etag = response.headers["ETag"]
    again = await keyed.get("/openapi.json", headers={"If-None-Match": etag})
    assert again.status == 304
    # The API itself still needs its key.
    assert (await keyed.get("/api/v1/sessions")).status == 401
    authorized = await keyed.get(
        "/api/v1/sessions", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert authorized.status == 200


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts = 0
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for name in ("src", "href"):
            if values.get(name):
                self.urls.append(str(values[name]))
        self._in_script = tag == "script" and not values.get("src")

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts += 1

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False


async def test_the_docs_page_loads_only_the_managers_own_files(keyed: Client) -> None:
    response = await keyed.get("/docs")
    assert response.status == 200
    assert response.content_type == "text/html"
    # The browser may fetch nothing from elsewhere, whatever a script asks for.
    assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "default-src 'none'" in CONTENT_SECURITY_POLICY
    assert "http" not in CONTENT_SECURITY_POLICY
    page = _Page()
    page.feed(await response.text())
    assert page.inline_scripts == 0
    assert page.urls, "the page names its assets"
    for url in page.urls:
        assert url.startswith("/docs/assets/"), url
        asset = await keyed.get(url)
        assert asset.status == 200, url
        body = await asset.read()
        assert body
        if url.endswith(".css"):
            # No stylesheet pulls a font or an image from outside.
            assert not re.search(rb"url\(\s*['\"]?(https?:)?//", body), url
            assert b"@import" not in body, url
    init = await (await keyed.get(f"/docs/assets/{INIT_NAME}")).text()
    assert '"/openapi.json"' in init
    assert "validatorUrl: null" in init  # Swagger UI would otherwise ask an online validator
    assert "http" not in init


async def test_only_the_listed_asset_files_are_served(keyed: Client) -> None:
    folder = assets_dir()
    assert folder is not None
    for name in PACKAGE_ASSETS:
        assert (folder / name).is_file(), name
    for name in ("swagger-editor-bundle.js", "LICENSE", "..%2F__init__.py", "index.html"):
        response = await keyed.get(f"/docs/assets/{name}")
        assert response.status == 404, name
        assert (await response.json())["error"] == "NotFound"


def test_the_bundled_swagger_ui_reads_openapi_3_1() -> None:
    folder = assets_dir()
    assert folder is not None
    bundle = (folder / "swagger-ui-bundle.js").read_bytes()
    version = re.search(rb'PACKAGE_VERSION:"(\d+)\.\d+\.\d+"', bundle)
    assert version is not None
    assert int(version[1]) >= 5  # Swagger UI reads OpenAPI 3.1 from version 5 on


async def test_an_endpoint_host_idna_cannot_encode_is_a_400_not_a_500(keyed: Client) -> None:
    # Found by schemathesis: getaddrinfo raised UnicodeError for "\x80" in a host name.
    response = await keyed.post(
        "/api/v1/microservices/register",
        json={"service_id": "svc-1", "endpoint": "http://a\u0080b.example:8000"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert response.status == 400
    body = await response.json()
    assert body["error"] == "InvalidRequest"
    assert "does not resolve" in body["message"]
