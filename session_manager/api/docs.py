"""`GET /openapi.json` and `GET /docs`: the API document and a page that shows it.

The page is Swagger UI, whose files come from the `swagger-ui-py` package (Apache-2.0; it ships
Swagger UI 5, which reads OpenAPI 3.1) and are served by the manager itself from
`/docs/assets/`: no CDN, no font or script from elsewhere. Its Content-Security-Policy lets the
browser load nothing but the manager's own files. Only a fixed list of the package's files is
served. Both routes are open, as `/health` is (see `api.auth`): the document describes the API
and holds no data of any session, service or key.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Final

from aiohttp import hdrs, web

from session_manager.api.openapi import DOCS_PATH, OPENAPI_PATH, rendered_document

DOCS_ASSETS_PATH: Final = "/docs/assets/{name}"
ASSETS_PACKAGE: Final = "swagger_ui"
# The files of the package the page uses; nothing else under its folder is served.
PACKAGE_ASSETS: Final = frozenset(
    {"swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png", "favicon-16x16.png"}
)
ASSET_MAX_AGE: Final = 86400

# Ours: the page's one script (no inline script, so the policy can forbid them).
INIT_SCRIPT: Final = b"""window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "%s",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
""" % OPENAPI_PATH.encode()
INIT_NAME: Final = "docs-init.js"

PAGE: Final = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Session Manager API</title>
  <link rel="icon" type="image/png" href="/docs/assets/favicon-32x32.png">
  <link rel="stylesheet" href="/docs/assets/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/assets/swagger-ui-bundle.js"></script>
  <script src="/docs/assets/docs-init.js"></script>
</body>
</html>
"""

# Nothing from anywhere but the manager; styles may be inline (Swagger UI sets some), images
# may be data: URIs (its icons are).
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; font-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)


@functools.cache
def assets_dir() -> Path | None:
    """The package's folder of Swagger UI files (found without importing the package)."""
    spec = importlib.util.find_spec(ASSETS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    return folder if folder.is_dir() else None


async def openapi_json(request: web.Request) -> web.Response:
    document = rendered_document()
    headers = {hdrs.ETAG: document.etag, hdrs.CACHE_CONTROL: "no-cache"}
    if request.headers.get(hdrs.IF_NONE_MATCH) == document.etag:
        return web.Response(status=304, headers=headers)
    return web.Response(
        body=document.body, content_type="application/json", charset="utf-8", headers=headers
    )


async def docs_page(request: web.Request) -> web.Response:
    return web.Response(
        text=PAGE,
        content_type="text/html",
        charset="utf-8",
        headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY},
    )


async def docs_asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    cache = {hdrs.CACHE_CONTROL: f"public, max-age={ASSET_MAX_AGE}"}
    if name == INIT_NAME:
        return web.Response(
            body=INIT_SCRIPT, content_type="text/javascript", charset="utf-8", headers=cache
        )
    folder = assets_dir()
    if name not in PACKAGE_ASSETS or folder is None:
        raise web.HTTPNotFound()
    return web.FileResponse(folder / name, headers=cache)


def add_docs_routes(app: web.Application) -> None:
    app.router.add_get(OPENAPI_PATH, openapi_json, allow_head=False)
    app.router.add_get(DOCS_PATH, docs_page, allow_head=False)
    app.router.add_get(DOCS_ASSETS_PATH, docs_asset, allow_head=False)
