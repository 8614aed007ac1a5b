"""The bounds on what a request may carry, and the checks that enforce them.

Every constant here is a documented bound (README, "Input limits"); past one, the request is
answered 400 `InvalidRequest` with a message naming the field. Lengths of names and ids are
counted in UTF-8 bytes, as LiveKit counts them. Two bounds are settings (`max_metadata_bytes`,
`max_session_duration`): they reach validation as pydantic's validation context, see
`InputLimits`.

The checks raise `PydanticCustomError`, so what the caller reads is our sentence, never the text
of a Python exception.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import orjson
from pydantic import ValidationInfo
from pydantic_core import PydanticCustomError

from session_manager.config import Settings

INT64_MIN: Final = -(2**63)
"""Smallest integer accepted anywhere in metadata: the store's JSON encoder takes 64 bits."""

INT64_MAX: Final = 2**63 - 1
"""Largest integer accepted anywhere in metadata (and largest event id in a query)."""

MAX_METADATA_DEPTH: Final = 16
"""Objects and arrays nested in a metadata object, the object itself counting as one: `{}` is
depth 1, `{"a": [1]}` depth 2."""

MAX_METADATA_KEY_BYTES: Final = 256
"""Longest key of any object inside metadata, at any depth."""

MAX_SERVICE_ID_BYTES: Final = 128
"""Longest service id. It is also the service's LiveKit participant identity (limit 256)."""

MAX_IDENTITY_BYTES: Final = 256
"""Longest `user_identity`: livekit-server v1.13.5's `limit.max_participant_identity_length`."""

MAX_USER_NAME_BYTES: Final = 256
"""Longest `user_name`: livekit-server v1.13.5's `limit.max_participant_name_length`."""

MAX_ROOM_NAME_BYTES: Final = 256
"""Longest `room_name`: livekit-server v1.13.5's `limit.max_room_name_length`."""

MAX_ENDPOINT_CHARS: Final = 2048
"""Longest microservice `endpoint` URL."""

MAX_REQUIRED_SERVICES: Final = 32
"""Most entries in `required_services`."""

MAX_IDEMPOTENCY_KEY: Final = 255
"""Longest `Idempotency-Key` header (printable ASCII)."""

MIN_TIMEOUT_SECS: Final = 1
"""Shortest `timeout_secs` of a create-session that waits."""

MAX_TIMEOUT_SECS: Final = 3600
"""Longest `timeout_secs` of a create-session that waits."""

MIN_MAX_SESSIONS: Final = 1
"""Smallest `metadata.max_sessions` of a microservice."""

MAX_MAX_SESSIONS: Final = 100_000
"""Largest `metadata.max_sessions` of a microservice."""

MIN_HEALTH_INTERVAL: Final = 0.5
"""Shortest `metadata.health_interval` of a microservice: seconds between its health checks."""

MAX_HEALTH_INTERVAL: Final = 3600
"""Longest `metadata.health_interval` of a microservice."""

MIN_HEALTH_TIMEOUT: Final = 0.1
"""Shortest `metadata.health_timeout` of a microservice: seconds one health check may take."""

MAX_HEALTH_TIMEOUT: Final = 60
"""Longest `metadata.health_timeout` of a microservice."""

MIN_UNHEALTHY_AFTER: Final = 1
"""Fewest `metadata.unhealthy_after` of a microservice: failed checks in a row to be Unhealthy."""

MAX_UNHEALTHY_AFTER: Final = 10
"""Most `metadata.unhealthy_after` of a microservice."""

MAX_SESSIONS_PAGE: Final = 500
"""Largest `limit` of `GET /api/v1/sessions`."""

CONTEXT_KEY: Final = "input_limits"

# Not in ids and names: whitespace and control characters (they break tokens, logs and URLs),
# and '/', '?', '#' (ids appear in URL paths).
_NOT_IN_ID = re.compile(r"[\s/?#\x00-\x1f\x7f]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f]")
# duration_limit as a string: plain decimal digits, as the spec's "3600".
_DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?", re.ASCII)


def _setting_default(name: str) -> Any:
    return Settings.model_fields[name].default


@dataclass(frozen=True, slots=True)
class InputLimits:
    """The bounds that are settings; routes pass them as the validation context."""

    max_metadata_bytes: int = _setting_default("max_metadata_bytes")
    max_session_duration: float = _setting_default("max_session_duration")

    @classmethod
    def from_settings(cls, settings: Settings) -> InputLimits:
        return cls(settings.max_metadata_bytes, settings.max_session_duration)

    def context(self) -> dict[str, Any]:
        """For `Model.model_validate_json(raw, context=limits.context())`."""
        return {CONTEXT_KEY: self}


DEFAULT_LIMITS: Final = InputLimits()


def limits_of(info: ValidationInfo) -> InputLimits:
    """The limits a validation was given; the settings' defaults when it was given none."""
    context = info.context
    limits = context.get(CONTEXT_KEY) if isinstance(context, dict) else None
    return limits if isinstance(limits, InputLimits) else DEFAULT_LIMITS


def _invalid(kind: str, detail: str) -> PydanticCustomError:
    # The detail goes in the context, not the template: it may hold braces from a client's key.
    return PydanticCustomError(kind, "{detail}", {"detail": detail})


def utf8_size(value: str) -> int:
    try:
        return len(value.encode())
    except UnicodeEncodeError:  # a lone surrogate: only Python callers can pass one
        raise _invalid("string_unicode", "must be valid Unicode") from None


def check_identifier(value: str, max_bytes: int) -> str:
    """A service id or room name: 1 to `max_bytes` bytes, no whitespace, controls, '/?#'."""
    if not 0 < utf8_size(value) <= max_bytes:
        raise _invalid("identifier_length", f"must be 1 to {max_bytes} bytes long (UTF-8)")
    if _NOT_IN_ID.search(value):
        raise _invalid(
            "identifier_chars",
            "must not contain whitespace, control characters, '/', '?' or '#'",
        )
    return value


def check_text(value: str, max_bytes: int, *, blank: bool) -> str:
    """A display name or identity: at most `max_bytes` bytes, no control characters; not blank
    unless `blank`."""
    if utf8_size(value) > max_bytes:
        raise _invalid("text_length", f"must be at most {max_bytes} bytes long (UTF-8)")
    if not blank and not value.strip():
        raise _invalid("text_blank", "must not be empty or blank")
    if _CONTROL.search(value):
        raise _invalid("text_chars", "must not contain control characters")
    return value


def check_endpoint(value: str) -> str:
    """An absolute http(s) URL of at most MAX_ENDPOINT_CHARS; returned without a trailing '/'."""
    if len(value) > MAX_ENDPOINT_CHARS:
        raise _invalid("url_length", f"must be at most {MAX_ENDPOINT_CHARS} characters long")
    if _SPACE_OR_CONTROL.search(value):
        raise _invalid("url_chars", "must not contain whitespace or control characters")
    try:
        parts = urlsplit(value)
        absolute = parts.scheme in ("http", "https") and bool(parts.hostname)
        _ = parts.port  # raises on a port that is not one
    except ValueError:  # "http://[::1", "http://h:99999"
        absolute = False
    if not absolute:
        raise _invalid("url_absolute", "must be an absolute http:// or https:// URL")
    return value.rstrip("/")


def _where(path: tuple[str | int, ...]) -> str:
    """`a.b[3]`, each key cut to 40 characters."""
    parts = []
    for step in path:
        if isinstance(step, int):
            parts.append(f"[{step}]")
        else:
            shown = step if len(step) <= 40 else step[:40] + "…"
            parts.append(f".{shown}" if parts else shown)
    return "".join(parts)


def check_json_object(value: dict[str, Any], max_bytes: int) -> None:
    """Metadata that the store can keep and give back unchanged: nesting at most
    MAX_METADATA_DEPTH, keys at most MAX_METADATA_KEY_BYTES, integers in signed 64 bits, floats
    finite, and at most `max_bytes` once serialised."""
    stack: list[tuple[object, int, tuple[str | int, ...]]] = [(value, 1, ())]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, dict | list):
            if depth > MAX_METADATA_DEPTH:
                raise _invalid(
                    "json_depth",
                    f"nested more than {MAX_METADATA_DEPTH} levels deep (at {_where(path)})",
                )
            if isinstance(node, dict):
                for key, child in node.items():
                    if utf8_size(key) > MAX_METADATA_KEY_BYTES:
                        raise _invalid(
                            "json_key_length",
                            f"a key at {_where((*path, key))} is longer than "
                            f"{MAX_METADATA_KEY_BYTES} bytes",
                        )
                    stack.append((child, depth + 1, (*path, key)))
            else:
                stack.extend((child, depth + 1, (*path, i)) for i, child in enumerate(node))
        elif isinstance(node, bool):
            continue
        elif isinstance(node, int):
            if not INT64_MIN <= node <= INT64_MAX:
                raise _invalid(
                    "json_int_range",
                    f"the integer at {_where(path)} does not fit in 64 bits "
                    f"({INT64_MIN} to {INT64_MAX})",
                )
        elif isinstance(node, float) and not math.isfinite(node):
            raise _invalid(
                "json_float_finite",
                f"the number at {_where(path)} is not finite "
                "(NaN, Infinity and numbers beyond ±1.8e308 are refused)",
            )
    try:
        size = len(orjson.dumps(value))
    except orjson.JSONEncodeError:  # from Python callers only: a value JSON has no form for
        raise _invalid("json_unstorable", "cannot be stored as JSON") from None
    if size > max_bytes:
        raise _invalid("json_size", f"is {size} bytes as JSON, more than the {max_bytes} allowed")


def check_duration_limit(value: object, max_seconds: float) -> None:
    """`duration_limit`: seconds above 0 and at most `max_seconds`, as a JSON number or a string
    of decimal digits ("3600", "90.5"); null means none."""
    if value is None:
        return
    seconds = math.nan
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str) and _DECIMAL.fullmatch(value):
            seconds = float(value)
    except OverflowError:  # an integer past 1.8e308
        seconds = math.inf
    if not 0 < seconds <= max_seconds:
        raise _invalid(
            "duration_limit",
            f"duration_limit must be a number of seconds above 0 and at most "
            f'{max_seconds:g} (a JSON number, or a string such as "3600")',
        )


def check_max_sessions(value: object) -> None:
    """`max_sessions` of a microservice: a JSON integer, MIN..MAX_MAX_SESSIONS; null: none."""
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not MIN_MAX_SESSIONS <= value <= MAX_MAX_SESSIONS
    ):
        raise _invalid(
            "max_sessions",
            f"max_sessions must be an integer from {MIN_MAX_SESSIONS} to {MAX_MAX_SESSIONS}",
        )


def _seconds(value: object) -> float:
    """A JSON number as seconds; NaN for anything else (a bool, a string, null)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    try:
        return float(value)
    except OverflowError:  # an integer past 1.8e308
        return math.inf


def check_health_settings(metadata: dict[str, Any]) -> None:
    """A microservice's own health-check settings, each optional (absent or null: the
    manager's): `health_interval` and `health_timeout` JSON numbers of seconds,
    `unhealthy_after` a JSON integer, each within its MIN_/MAX_ bound."""
    interval = metadata.get("health_interval")
    if interval is not None and not (
        MIN_HEALTH_INTERVAL <= _seconds(interval) <= MAX_HEALTH_INTERVAL
    ):
        raise _invalid(
            "health_interval",
            f"health_interval must be a number of seconds from {MIN_HEALTH_INTERVAL:g} "
            f"to {MAX_HEALTH_INTERVAL}",
        )
    timeout = metadata.get("health_timeout")
    if timeout is not None and not MIN_HEALTH_TIMEOUT <= _seconds(timeout) <= MAX_HEALTH_TIMEOUT:
        raise _invalid(
            "health_timeout",
            f"health_timeout must be a number of seconds from {MIN_HEALTH_TIMEOUT:g} "
            f"to {MAX_HEALTH_TIMEOUT}",
        )
    after = metadata.get("unhealthy_after")
    if after is not None and (
        isinstance(after, bool)
        or not isinstance(after, int)
        or not MIN_UNHEALTHY_AFTER <= after <= MAX_UNHEALTHY_AFTER
    ):
        raise _invalid(
            "unhealthy_after",
            f"unhealthy_after must be an integer from {MIN_UNHEALTHY_AFTER} "
            f"to {MAX_UNHEALTHY_AFTER}",
        )


def idempotency_key_ok(key: str) -> bool:
    """1 to MAX_IDEMPOTENCY_KEY printable ASCII characters: it is stored and echoed in errors."""
    return 0 < len(key) <= MAX_IDEMPOTENCY_KEY and key.isascii() and key.isprintable()
