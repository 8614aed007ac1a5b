"""Connecting to the Redis the managers share, and speaking of it without its secrets.

Used by the Redis store, the Redis event feed and the cluster node alike: their clients are built
the same way (`RedisUrl.connect`), and their messages name the same place (`RedisUrl.where`) and
mask the same secrets (`RedisUrl.describe`).
"""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from session_manager.logs import describe


class RedisUrl:
    """A Redis URL, which may carry a password (user info, or `?password=`): the URL itself is
    never logged nor part of an error, only `where` it points and errors with its secrets
    masked."""

    def __init__(self, url: str) -> None:
        self._url = url
        self.where = _where(url)
        self._secrets = _secrets(url)

    def __repr__(self) -> str:
        return f"RedisUrl({self.where!r})"

    def connect(self, *, timeout: float, socket_timeout: float | None = None) -> Redis:
        """A client whose connecting takes at most `timeout` seconds and each read or write on
        its sockets at most `socket_timeout` (default: `timeout`), and that never retries by
        itself: its users retry within their own bounds, so no hidden retries run below them.
        ValueError for a URL redis-py cannot use (its message may quote parts of the URL)."""
        return Redis.from_url(
            self._url,
            socket_timeout=timeout if socket_timeout is None else socket_timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )

    def describe(self, exc: BaseException) -> str:
        """`describe` with every secret of the URL masked: redis-py's messages are not ours."""
        text = describe(exc)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _where(url: str) -> str:
    """The place a Redis URL points to, for messages: host and port, or the socket path, and
    the database; never the user name or the password."""
    try:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return parts.path or "a Unix socket"
        host = parts.hostname or "localhost"
        if ":" in host:  # IPv6
            host = f"[{host}]"
        database = parts.path.strip("/")
        return f"{host}:{parts.port or 6379}" + (f"/{database}" if database else "")
    except ValueError:  # a port that is not a number, an unbalanced bracket
        return "the configured redis_url"


def _secrets(url: str) -> tuple[str, ...]:
    """The passwords a Redis URL may carry (user info, or `?password=`), as written and as
    redis-py decodes them, longest first."""
    try:
        parts = urlsplit(url)
        found = {parts.password or ""}
        found.update(parse_qs(parts.query).get("password", []))
    except ValueError:
        return ()
    found.update([unquote(secret) for secret in found])
    return tuple(sorted((s for s in found if s), key=len, reverse=True))
