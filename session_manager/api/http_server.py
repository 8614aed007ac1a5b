"""The HTTP server around the application, so that requests aiohttp refuses before any handler
runs (a header field or request line too long, too many headers, bytes that are not HTTP) are
answered with the same `{error, message, timestamp}` envelope as everything else.

aiohttp answers those from `RequestHandler.handle_error`, before any middleware, with plain text;
`ApiRunner` serves the app with a handler whose `handle_error` answers with the envelope instead:
431 for a header field or the header count, 414 for the request line, 400 for anything else
malformed; and an `Expect` other than 100-continue, which aiohttp also answers before any
middleware, is 417. Both of aiohttp's parsers raise the same exception types (`LineTooLong`,
`BadHttpMessage`); they differ in what a `LineTooLong` reports, which `_line_too_long` sorts out.

Usage, instead of `web.AppRunner(app, ...)`: `runner = ApiRunner(app, ...)`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.http_parser import HttpRequestParserPy

from session_manager.api.errors import envelope

log = logging.getLogger(__name__)

MAX_REQUEST_LINE: Final = 8192
"""A request line (`GET <url> HTTP/1.1`) of this many bytes is accepted; a URL longer than this
is 414. (llhttp, aiohttp's C parser, measures the URL; its pure-Python parser, used only without
the C extension, the whole line.)"""

MAX_HEADER_FIELD: Final = 8190
"""A header line (`Name: value`) of this many bytes is accepted; a name or a value longer than
this is 431. (llhttp measures name and value apart, the Python parser the whole line.) Kept
different from MAX_REQUEST_LINE: llhttp's error says which of the two limits a line passed."""

MAX_HEADERS: Final = 128
"""More header fields than this is 431. (aiohttp's pure-Python parser counts the request line
and the blank line after the headers too: with it, 126 fields fit.)"""

HTTP_LIMITS: Final[dict[str, Any]] = {
    "max_line_size": MAX_REQUEST_LINE,
    "max_field_size": MAX_HEADER_FIELD,
    "max_headers": MAX_HEADERS,
}

# A header line as the pure-Python parser reports it: a token, then the colon.
_HEADER_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:")


@dataclass(frozen=True, slots=True)
class _Refusal:
    """What a request aiohttp could not hand to the application is answered."""

    status: int
    code: str
    message: str


_HEADER_TOO_LONG = _Refusal(
    431,
    "RequestHeaderFieldsTooLarge",
    f"A request header field is longer than {MAX_HEADER_FIELD} bytes",
)
_TOO_MANY_HEADERS = _Refusal(
    431, "RequestHeaderFieldsTooLarge", f"A request has at most {MAX_HEADERS} header fields"
)
_LINE_TOO_LONG = _Refusal(414, "URITooLong", f"The URL is longer than {MAX_REQUEST_LINE} bytes")
_MALFORMED = _Refusal(400, "InvalidRequest", "Malformed HTTP request")
_INTERNAL = _Refusal(500, "InternalError", "Internal server error")


def _line_too_long(exc: LineTooLong, parser: object) -> _Refusal:
    line, limit = exc.args[0], exc.args[1]
    if isinstance(parser, HttpRequestParserPy):
        # It reports the line itself (its first 100 bytes), whatever limit it passed.
        is_header = isinstance(line, bytes) and _HEADER_LINE.match(line) is not None
    else:
        # llhttp's callbacks report the URL against max_line_size and a header's name or
        # value against max_field_size: the limit says which.
        is_header = limit == MAX_HEADER_FIELD
    return _HEADER_TOO_LONG if is_header else _LINE_TOO_LONG


def refusal_for(status: int, exc: BaseException | None, parser: object = None) -> _Refusal:
    """The answer to a request aiohttp could not hand to the application."""
    if isinstance(exc, LineTooLong):
        return _line_too_long(exc, parser)
    if isinstance(exc, BadHttpMessage) and exc.message.startswith("Too many headers"):
        return _TOO_MANY_HEADERS
    if isinstance(exc, HttpProcessingError) or 400 <= status < 500:
        return _MALFORMED
    if status == 504:  # a handler timed out past the error middleware
        return _Refusal(504, "Timeout", "The request took too long")
    return _INTERNAL


class ApiRequestHandler(web.RequestHandler):
    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        refusal = refusal_for(status, exc, self._parser)
        extra = {"status": refusal.status, "remote": request.remote, "problem": refusal.code}
        if refusal.status >= 500:
            log.error("request failed outside the application", extra=extra, exc_info=exc)
        elif refusal is _MALFORMED:  # scanners and TLS on the HTTP port: common, not news
            log.debug("malformed HTTP request refused", extra=extra)
        else:
            log.info("oversized HTTP request refused", extra=extra)
        if request.writer.output_size > 0:
            # Part of a response is out already; aiohttp drops the connection on this.
            raise ConnectionError("response already started: cannot send the error envelope")
        response = envelope(refusal.status, refusal.code, refusal.message)
        response.force_close()
        return response


RawHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def _expect_checked(handler: RawHandler) -> RawHandler:
    """aiohttp answers an `Expect` other than 100-continue before any middleware runs, in plain
    text, and fails outright (500) when the header is not UTF-8: answered here instead."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        expect = request.headers.get(hdrs.EXPECT)
        if expect and expect.lower() != "100-continue" and request.version == HttpVersion11:
            return envelope(417, "ExpectationFailed", "Expect: only 100-continue is supported")
        return await handler(request)

    return handle


class ApiServer(web.Server):
    def __call__(self) -> web.RequestHandler:
        return ApiRequestHandler(self, loop=self._loop, **self._kwargs)


class ApiRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer protocol errors with the error envelope and
    enforce HTTP_LIMITS (over any given: telling a long header from a long URL relies on them)."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, **{**kwargs, **HTTP_LIMITS})

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()  # starts the application
        return ApiServer(
            _expect_checked(server.request_handler),
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )
