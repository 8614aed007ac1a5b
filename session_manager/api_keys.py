"""API keys and rate limits as the configuration holds them: the `api_keys` entries parsed into
keys with scopes, and `rate_limit`. Below both the settings, which check them at start, and the
front door, which enforces them (`api/auth.py`).

An entry is `"<key> <scope>[,<scope>…]"`; a key may be given as `sha256:<64 hex>`, so that only
its hash is kept in the configuration. A key is kept only as its SHA-256 digest, and known by
its key id, the first 12 hex digits of that digest.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final


class Scope(StrEnum):
    ADMIN = "admin"
    CLIENT = "client"
    SERVICE = "service"


MAX_API_KEYS: Final = 100
"""Most entries in `api_keys`."""

MIN_KEY_CHARS: Final = 16
"""Shortest key accepted: a key is a secret, not a name."""

MAX_KEY_CHARS: Final = 256
"""Longest key accepted (and presented: a longer bearer token is refused unhashed)."""

HASHED_PREFIX: Final = "sha256:"
KEY_ID_CHARS: Final = 12

_KEY_CHARS = re.compile(r"[!-~]+")  # printable ASCII, no space: it travels in a header
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
_SCOPE_NAMES = frozenset(scope.value for scope in Scope)


class ApiKeyError(ValueError):
    """An `api_keys` entry that is not one; the message never holds the key."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    digest: bytes = field(repr=False)  # SHA-256 of the key
    scopes: frozenset[Scope]

    @property
    def key_id(self) -> str:
        return self.digest.hex()[:KEY_ID_CHARS]


def key_id_of(key: str) -> str:
    """The id a key is known by: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()[:KEY_ID_CHARS]


def parse_api_key(entry: str) -> ApiKey:
    """One `api_keys` entry: `<key> <scope>[,<scope>…]`, the key plain or `sha256:<hex>`."""
    key, _, scope_text = entry.strip().partition(" ")
    scope_names = [name.strip() for name in scope_text.split(",")]
    if not key or not scope_text.strip() or not all(scope_names):
        raise ApiKeyError("an entry is '<key> <scope>[,<scope>...]'")
    unknown = [name for name in scope_names if name not in _SCOPE_NAMES]
    if unknown:
        shown = unknown[0][:20]
        raise ApiKeyError(f"unknown scope {shown!r} (scopes: admin, client, service)")
    scopes = frozenset(Scope(name) for name in scope_names)
    if key.startswith(HASHED_PREFIX):
        hexdigest = key[len(HASHED_PREFIX) :]
        if not _HEX_DIGEST.fullmatch(hexdigest):
            raise ApiKeyError("a hashed key is 'sha256:' and 64 hex digits")
        return ApiKey(bytes.fromhex(hexdigest), scopes)
    if not MIN_KEY_CHARS <= len(key) <= MAX_KEY_CHARS or not _KEY_CHARS.fullmatch(key):
        raise ApiKeyError(
            f"a key is {MIN_KEY_CHARS} to {MAX_KEY_CHARS} printable ASCII characters, "
            "without spaces"
        )
    return ApiKey(hashlib.sha256(key.encode()).digest(), scopes)


def parse_api_keys(entries: Iterable[str]) -> list[ApiKey]:
    """Every entry of `api_keys`; errors name the entry by its position, never by its key."""
    keys: list[ApiKey] = []
    for position, entry in enumerate(entries, start=1):
        if position > MAX_API_KEYS:
            raise ApiKeyError(f"at most {MAX_API_KEYS} entries")
        try:
            key = parse_api_key(entry)
        except ApiKeyError as exc:
            raise ApiKeyError(f"entry {position}: {exc}") from None
        if any(hmac.compare_digest(key.digest, known.digest) for known in keys):
            raise ApiKeyError(f"entry {position}: the same key is listed twice")
        keys.append(key)
    return keys


# ----------------------------------------------------------------------------------- rate limit

_RATE = re.compile(r"([0-9]{1,7}(?:\.[0-9]{1,3})?)(?:/([0-9]{1,7}))?")


@dataclass(frozen=True, slots=True)
class RateLimit:
    """`rate_limit`: requests per second, and the burst a caller may spend at once."""

    per_second: float
    burst: int

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """`"10/20"`: 10 a second, bursts of 20; `"10"`: the burst is the rate."""
        match = _RATE.fullmatch(text.strip())
        if match is None:
            raise ValueError("must be '<requests per second>/<burst>', e.g. '10/20'")
        per_second = float(match[1])
        burst = int(match[2]) if match[2] else max(1, math.ceil(per_second))
        if per_second <= 0 or burst < 1:
            raise ValueError("the rate and the burst must be above 0")
        return cls(per_second, burst)

    def __str__(self) -> str:
        return f"{self.per_second:g}/{self.burst}"
