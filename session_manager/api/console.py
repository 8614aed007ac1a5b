"""`GET /console`: the manager's web console, and `GET /console/assets/{name}`: its files.

The console is a few plain ES modules, a stylesheet and a vendored `livekit-client` build
(`scripts/build-console.sh` copies it from the npm package its lock file pins), shipped inside
the package in `console_assets/` so that `pip install` alone serves it. Only the files of that
folder with a known suffix are served; nothing comes from a CDN or any other origin.

Both routes are open, as `/docs` is (see `api.auth`): the files hold no data. Everything the
console shows it reads from the API with the key the person types in, and the API checks that
key as it checks any other caller's.

The page's Content-Security-Policy lets the browser load scripts, styles and images from the
manager only, and connect to the manager and to the LiveKit server the manager hands out (its
`ws`/`wss` URL for signalling and the matching `http`/`https` URL, which `livekit-client` asks
when a connection fails); WebRTC media is not governed by the policy.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from aiohttp import hdrs, web

from session_manager.api.routes import DAEMON

CONSOLE_PATH: Final = "/console"
CONSOLE_ASSETS_PATH: Final = "/console/assets/{name}"
ASSETS_DIR: Final = Path(__file__).with_name("console_assets")
INDEX_NAME: Final = "index.html"

# What each served suffix is; a file with any other suffix (the licence, say) is not served.
CONTENT_TYPES: Final = {
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}

_SCHEME_PAIRS: Final = {"ws": "http", "wss": "https", "http": "ws", "https": "wss"}

# The files change with the package, not by name: the browser asks again each time, and gets a
# 304 while the file is the same (FileResponse answers If-None-Match / If-Modified-Since).
ASSET_CACHE: Final = "no-cache"

_SECURITY_HEADERS: Final = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def livekit_sources(public_url: str) -> list[str]:
    """The CSP sources for the LiveKit server at `public_url`: its origin in the ws and the
    http scheme (a path in a source would narrow it to that one path, so none is given)."""
    parts = urlsplit(public_url)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEME_PAIRS or not parts.netloc or "@" in parts.netloc:
        return []
    origin = parts.netloc.lower()
    # A source may not hold a space, ';' or ',': the policy would read them as separators.
    if any(char in origin for char in " ;,'\"\\"):
        return []
    return [f"{scheme}://{origin}", f"{_SCHEME_PAIRS[scheme]}://{origin}"]


def content_security_policy(public_url: str) -> str:
    connect = " ".join(["'self'", *livekit_sources(public_url)])
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src {connect}; media-src 'self' blob: mediastream:; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    )


@functools.cache
def served_assets() -> frozenset[str]:
    """The names `GET /console/assets/{name}` answers: the folder's files of a known suffix."""
    if not ASSETS_DIR.is_dir():
        return frozenset()
    return frozenset(
        path.name
        for path in ASSETS_DIR.iterdir()
        if path.is_file() and path.suffix in CONTENT_TYPES
    )


@functools.cache
def index_page() -> bytes:
    return (ASSETS_DIR / INDEX_NAME).read_bytes()


async def console_page(request: web.Request) -> web.Response:
    public_url = request.app[DAEMON].gateway.endpoint.public_url
    headers = {
        "Content-Security-Policy": content_security_policy(public_url),
        hdrs.CACHE_CONTROL: "no-cache",
        **_SECURITY_HEADERS,
    }
    return web.Response(
        body=index_page(), content_type="text/html", charset="utf-8", headers=headers
    )


async def console_asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in served_assets():
        raise web.HTTPNotFound()
    content_type = CONTENT_TYPES[Path(name).suffix]
    headers = {
        hdrs.CACHE_CONTROL: ASSET_CACHE,
        hdrs.CONTENT_TYPE: f"{content_type}; charset=utf-8",
        **_SECURITY_HEADERS,
    }
    return web.FileResponse(ASSETS_DIR / name, headers=headers)


def add_console_routes(app: web.Application) -> None:
    app.router.add_get(CONSOLE_PATH, console_page, allow_head=False)
    app.router.add_get(CONSOLE_ASSETS_PATH, console_asset, allow_head=False)
