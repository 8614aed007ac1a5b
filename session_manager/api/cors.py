"""Cross-origin access, so the browser client of the API document (a page calling `fetch` on
http://localhost:8080 from its own origin) works: preflights are answered here, and every
answer, errors and event streams included, says which origins may read it.

The origins are `cors_allow_origins`; left unset, that is any origin (`*`) without API keys and
none with them. A preflight carries no key (browsers send none), so it is answered before
authentication; the request that follows it needs its key like any other."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

ALLOWED_METHODS = "GET, POST, PUT, DELETE, OPTIONS"
ALLOWED_HEADERS = "Content-Type, Idempotency-Key, Last-Event-ID, Authorization"
PREFLIGHT_MAX_AGE = "600"
EXPOSED_HEADERS = "Retry-After, WWW-Authenticate"  # what a page may read of an answer

ResponseHook = Callable[[web.Request, web.StreamResponse], Awaitable[None]]


class CorsPolicy:
    def __init__(self, origins: Sequence[str]) -> None:
        self._any = "*" in origins
        self._allowed = frozenset(origins)

    def origin_for(self, request: web.Request) -> str | None:
        """The Access-Control-Allow-Origin value this request gets, if any."""
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None or not (self._any or origin in self._allowed):
            return None
        return "*" if self._any else origin

    def middleware(self) -> Middleware:
        @web.middleware
        async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
            if not (
                request.method == hdrs.METH_OPTIONS
                and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
            ):
                return await handler(request)
            response = web.Response(status=204)
            if self.origin_for(request) is not None:
                response.headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = ALLOWED_METHODS
                response.headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = ALLOWED_HEADERS
                response.headers[hdrs.ACCESS_CONTROL_MAX_AGE] = PREFLIGHT_MAX_AGE
            return response

        return preflight

    def response_hook(self) -> ResponseHook:
        # on_response_prepare runs for every answer just before its headers go out, event
        # streams included (they are prepared inside their handler, past any middleware).
        async def allow_origin(request: web.Request, response: web.StreamResponse) -> None:
            origin = self.origin_for(request)
            if origin is not None:
                response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
                response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSED_HEADERS
                if origin != "*":
                    response.headers[hdrs.VARY] = hdrs.ORIGIN

        return allow_origin
