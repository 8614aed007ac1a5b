"""The input bounds of `session_manager.api.limits` as JSON Schema, for `GET /openapi.json`.

The request models validate with their own validators (byte lengths, metadata depth and size);
these annotations only make the generated schema say the same bounds. JSON Schema counts
characters where a limit counts UTF-8 bytes: the schema's `maxLength` is the upper bound, and
the description says bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema as cs

from session_manager.api.limits import (
    DEFAULT_LIMITS,
    MAX_ENDPOINT_CHARS,
    MAX_HEALTH_INTERVAL,
    MAX_HEALTH_TIMEOUT,
    MAX_MAX_SESSIONS,
    MAX_METADATA_DEPTH,
    MAX_METADATA_KEY_BYTES,
    MAX_UNHEALTHY_AFTER,
    MIN_HEALTH_INTERVAL,
    MIN_HEALTH_TIMEOUT,
    MIN_MAX_SESSIONS,
    MIN_UNHEALTHY_AFTER,
)

_CONTROL = "\\x00-\\x1f\\x7f"


@dataclass(frozen=True, eq=False)  # hashed by identity: Annotated metadata is hashed
class schema:
    """`Annotated[..., schema({...})]`: these keywords are added to the field's JSON Schema."""

    extra: Mapping[str, Any] = field(default_factory=dict)

    def __get_pydantic_json_schema__(
        self, core_schema: cs.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        value = handler(core_schema)
        value.update(self.extra)
        return value


def identifier_schema(max_bytes: int) -> dict[str, Any]:
    return {
        "minLength": 1,
        "maxLength": max_bytes,
        "pattern": f"^[^\\s/?#{_CONTROL}]+$",
        "description": (
            f"1 to {max_bytes} bytes (UTF-8); no whitespace, control characters, '/', '?' or '#'"
        ),
    }


def text_schema(max_bytes: int, *, blank: bool) -> dict[str, Any]:
    if blank:
        pattern = f"^[^{_CONTROL}]*$"
        what = f"at most {max_bytes} bytes (UTF-8)"
    else:
        pattern = f"^[^{_CONTROL}]*[^\\s{_CONTROL}][^{_CONTROL}]*$"
        what = f"1 to {max_bytes} bytes (UTF-8), not blank"
    return {
        **({} if blank else {"minLength": 1}),
        "maxLength": max_bytes,
        "pattern": pattern,
        "description": f"{what}; no control characters",
    }


ENDPOINT_SCHEMA: dict[str, Any] = {
    "maxLength": MAX_ENDPOINT_CHARS,
    "pattern": f"^[hH][tT][tT][pP][sS]?://[^\\s{_CONTROL}]+$",
    "description": (
        f"An absolute http:// or https:// URL of at most {MAX_ENDPOINT_CHARS} characters, "
        "without user-info, query or fragment; where it may point is `endpoint_allow`'s"
    ),
}

_JSON_OBJECT = (
    f"A JSON object of at most `max_metadata_bytes` ({DEFAULT_LIMITS.max_metadata_bytes} by "
    f"default) serialised, nested at most {MAX_METADATA_DEPTH} levels, keys at most "
    f"{MAX_METADATA_KEY_BYTES} bytes, integers within signed 64 bits, numbers finite."
)

SESSION_METADATA_SCHEMA: dict[str, Any] = {
    "description": (
        f"{_JSON_OBJECT} `duration_limit`: seconds the session may last, above 0 and at most "
        f"`max_session_duration` ({DEFAULT_LIMITS.max_session_duration:g} by default), "
        'a number or a string of decimal digits ("3600").'
    ),
    "properties": {
        "duration_limit": {
            "anyOf": [
                {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "maximum": DEFAULT_LIMITS.max_session_duration,
                },
                {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?$"},
                {"type": "null"},
            ]
        }
    },
}

SERVICE_METADATA_SCHEMA: dict[str, Any] = {
    "description": (
        f"{_JSON_OBJECT} `type`: the service's type (for `type:X` requirements); "
        "`max_sessions`: how many sessions it takes at once (null: no limit); "
        "`health_interval`, `health_timeout` (seconds) and `unhealthy_after` (failed checks in "
        "a row): its own health-check settings (absent or null: the manager's)."
    ),
    "properties": {
        "type": {"type": "string"},
        "max_sessions": {
            "anyOf": [
                {"type": "integer", "minimum": MIN_MAX_SESSIONS, "maximum": MAX_MAX_SESSIONS},
                {"type": "null"},
            ]
        },
        "health_interval": {
            "anyOf": [
                {"type": "number", "minimum": MIN_HEALTH_INTERVAL, "maximum": MAX_HEALTH_INTERVAL},
                {"type": "null"},
            ]
        },
        "health_timeout": {
            "anyOf": [
                {"type": "number", "minimum": MIN_HEALTH_TIMEOUT, "maximum": MAX_HEALTH_TIMEOUT},
                {"type": "null"},
            ]
        },
        "unhealthy_after": {
            "anyOf": [
                {
                    "type": "integer",
                    "minimum": MIN_UNHEALTHY_AFTER,
                    "maximum": MAX_UNHEALTHY_AFTER,
                },
                {"type": "null"},
            ]
        },
    },
}
