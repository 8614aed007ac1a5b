"""Wall-clock timestamps in the one format every answer uses: RFC 3339, UTC, 'Z' suffix."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now_rfc3339() -> str:
    return rfc3339(utc_now())


def parse_rfc3339(text: str) -> datetime:
    """The moment an `rfc3339` string names (as stored in a session's view)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
