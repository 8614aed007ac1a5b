"""The one error middleware: whatever goes wrong, the caller gets `{error, message, timestamp}`
with the right status, never a traceback or aiohttp's HTML page."""

from __future__ import annotations

import asyncio
import logging

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from session_manager.clock import now_rfc3339
from session_manager.errors import ManagerError

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "InvalidRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    408: "Timeout",
    413: "PayloadTooLarge",
    414: "URITooLong",
    415: "UnsupportedMediaType",
    429: "TooManyRequests",
    431: "RequestHeaderFieldsTooLarge",
}

# Error types whose message is the text of a Python exception raised in a validator (ours raise
# PydanticCustomError instead): shown as a fixed sentence, never as the exception's text.
_PYTHON_TEXT_ERRORS = frozenset({"value_error", "assertion_error"})
_SHOWN_ERRORS = 5
_SHOWN_LOC_PART = 64  # a location may hold a client's key of any length


def envelope(
    status: int, error: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = {"error": error, "message": message, "timestamp": now_rfc3339()}
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type="application/json",
        charset="utf-8",
        headers=headers,
    )


def _location(error: ErrorDetails) -> str:
    parts = (str(part) for part in error["loc"])
    return ".".join(p if len(p) <= _SHOWN_LOC_PART else p[:_SHOWN_LOC_PART] + "…" for p in parts)


def describe_validation_error(exc: ValidationError) -> str:
    """`field: what is wrong` for the first few errors; pydantic's sentences and ours, never a
    Python exception's text."""
    errors = exc.errors(include_url=False, include_input=False)
    if errors and errors[0]["type"] == "json_invalid":
        if "recursion limit" in str(errors[0].get("ctx", {}).get("error", "")):
            return "Request body is not valid JSON: nested too deeply"
        return "Request body is not valid JSON"
    parts = []
    for error in errors[:_SHOWN_ERRORS]:
        where = _location(error)
        what = "is not a valid value" if error["type"] in _PYTHON_TEXT_ERRORS else error["msg"]
        parts.append(f"{where}: {what}" if where else what)
    return "; ".join(parts)


def _http_exception_message(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"No such resource: {request.method} {request.path}"
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return f"Method {request.method} is not allowed on {request.path} (allowed: {allowed})"
    if exc.status == 413:
        return f"Request body is too large ({exc.text})"
    return exc.text or exc.reason


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ManagerError as exc:
        if exc.status >= 500:
            log.warning(
                "request failed",
                extra={"path": request.path, "error": exc.code, "detail": exc.message},
            )
        return envelope(exc.status, exc.code, exc.message, exc.headers or None)
    except ValidationError as exc:
        return envelope(400, "InvalidRequest", describe_validation_error(exc))
    except web.RequestPayloadError:
        # The body broke the HTTP framing (bad chunked encoding, cut short, bad compression).
        return envelope(400, "InvalidRequest", "Request body could not be read: malformed framing")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        code = _HTTP_CODES.get(exc.status, exc.reason.replace(" ", ""))
        return envelope(exc.status, code, _http_exception_message(request, exc), headers)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error", extra={"method": request.method, "path": request.path})
        return envelope(500, "InternalError", "Internal server error")
