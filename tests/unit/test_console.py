"""`GET /console` and its files: served open with a strict policy, only the manager's own files,
every module a page imports is there, and the vendored livekit-client is the one the lock pins."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from session_manager.api.app import create_app
from session_manager.api.console import (
    ASSETS_DIR,
    content_security_policy,
    livekit_sources,
    served_assets,
)
from tests.unit.test_auth import KEY_ENTRIES, settings_for

Client = TestClient[web.Request, web.Application]

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCK = REPO_ROOT / "scripts" / "console" / "package-lock.json"
PACKAGE = REPO_ROOT / "scripts" / "console" / "package.json"
VENDORED = ASSETS_DIR / "livekit-client.esm.mjs"
OURS = sorted(name for name in served_assets() if name != VENDORED.name)


@pytest.fixture
async def keyed(aiohttp_client: Any, tmp_path: Path) -> Client:
    """A manager with API keys: the console's files are open all the same."""
    settings = settings_for(
        tmp_path, api_keys=KEY_ENTRIES, livekit_public_url="wss://lk.example:7443"
    )
    client: Client = await aiohttp_client(create_app(settings))
    return client


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts = 0
        self.inline_styles = 0
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for name in ("src", "href"):
            value = values.get(name)
            if value and not value.startswith("#"):
                self.urls.append(value)
        if "style" in values or tag == "style":
            self.inline_styles += 1
        self._in_script = tag == "script" and not values.get("src")

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts += 1

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False


async def test_the_page_is_open_and_lets_the_browser_reach_only_the_manager_and_livekit(
    keyed: Client,
) -> None:
    response = await keyed.get("/console")
    assert response.status == 200
    assert response.content_type == "text/html"
    policy = response.headers["Content-Security-Policy"]
    assert policy == content_security_policy("wss://lk.example:7443")
    assert "default-src 'none'" in policy
    assert "script-src 'self';" in policy
    assert "connect-src 'self' wss://lk.example:7443 https://lk.example:7443;" in policy
    assert "unsafe" not in policy
    page = _Page()
    page.feed(await response.text())
    assert page.inline_scripts == 0 and page.inline_styles == 0
    assert page.urls
    for url in page.urls:
        assert url.startswith("/console/assets/"), url
        assert (await keyed.get(url)).status == 200, url
    # The API behind it still needs a key.
    assert (await keyed.get("/api/v1/sessions")).status == 401


async def test_every_module_the_console_imports_is_served_as_javascript(keyed: Client) -> None:
    for name in OURS:
        response = await keyed.get(f"/console/assets/{name}")
        assert response.status == 200, name
        if name.endswith(".js"):
            assert response.content_type == "text/javascript", name
            body = await response.text()
            for imported in re.findall(r"""(?:from|import\()\s*["']\./([^"']+)["']""", body):
                assert imported in served_assets(), f"{name} imports {imported}"
    vendored = await keyed.get(f"/console/assets/{VENDORED.name}")
    assert vendored.status == 200
    assert vendored.content_type == "text/javascript"  # a module script needs a JS type
    assert vendored.headers["X-Content-Type-Options"] == "nosniff"


def test_nothing_of_ours_loads_from_another_origin() -> None:
    for name in [*OURS, "index.html"]:
        text = (ASSETS_DIR / name).read_text(encoding="utf-8")
        text = text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # a name, not a load
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), name
        assert "@import" not in text, name
        assert "innerHTML" not in text, name  # what the API returns is only ever text


async def test_only_the_folders_servable_files_are_served(keyed: Client) -> None:
    for name in ("livekit-client.LICENSE", "index.html", "..%2Fconsole.py", "nope.js"):
        response = await keyed.get(f"/console/assets/{name}")
        assert response.status == 404, name
        assert (await response.json())["error"] == "NotFound"


def test_the_vendored_livekit_client_is_the_version_the_lock_pins() -> None:
    lock = json.loads(LOCK.read_text(encoding="utf-8"))
    package = json.loads(PACKAGE.read_text(encoding="utf-8"))
    pinned = lock["packages"]["node_modules/livekit-client"]["version"]
    assert package["dependencies"]["livekit-client"] == pinned  # an exact version, not a range
    assert lock["packages"]["node_modules/livekit-client"]["integrity"].startswith("sha512-")
    text = VENDORED.read_text(encoding="utf-8")
    found = re.findall(r'var version\$1 = "([0-9.]+)";', text)
    assert found == [pinned]
    assert "Apache License" in (ASSETS_DIR / "livekit-client.LICENSE").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("url", "sources"),
    [
        ("ws://127.0.0.1:7880", ["ws://127.0.0.1:7880", "http://127.0.0.1:7880"]),
        ("wss://LK.example/rtc/path", ["wss://lk.example", "https://lk.example"]),
        ("http://[::1]:7880", ["http://[::1]:7880", "ws://[::1]:7880"]),
        ("ftp://lk.example", []),
        ("ws://user:pw@lk.example", []),  # never a credential in a header
        ("ws://lk.example;script-src", []),
    ],
)
def test_livekit_sources_are_origins_in_both_schemes(url: str, sources: list[str]) -> None:
    assert livekit_sources(url) == sources
