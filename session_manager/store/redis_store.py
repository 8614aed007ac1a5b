"""Redis, for managers that keep their state outside their own process.

The same promises as `SqliteStore`: registrations and idempotency keys are written through (the
caller is answered once Redis has them, or gets `StoreUnavailable`); session views are written
behind (`SessionWriteBehind`), and a view queued is readable at once. Every call to Redis is
bounded twice: socket timeouts on the client and an asyncio timeout of `timeout` seconds around
each operation, retries included. An unreachable or hung Redis therefore surfaces as
`StoreUnavailable` within that bound, never as a hang nor as a redis-py exception.

The store never fails silently, exactly as `SqliteStore` (see `store.write_behind`): failing
batches are retried with capped backoff and reported on the health board until one succeeds,
the backlog is bounded by `max_pending`, and a writer that dies is fatal.

Layout, every key under `prefix` (P):
- `P session:<session_id>`: hash `body` (the view, orjson), `member`, `status`, `user`, `owner`
  (absent when the view has none): the fields repeat what the index sets hold, so a new view
  can take the session out of the sets of its previous status in the same script;
- `P sessions`, `P sessions:status:<status>`, `P sessions:user:<user_identity>`,
  `P sessions:owner:<owner>`: sorted sets, all scores 0, member `<created_at>\\0<session_id>`,
  so that `ZRANGE ... BYLEX REV` lists newest first and the listing cursor is a lex bound;
- `P services`: hash `service_id` -> registration (orjson);
- `P idempotency:<key>`: the entry (orjson); `P idempotency-by-time`: sorted set of those keys
  scored by the entry's `created_at`, for the purge.

A view and its index entries change together in one Lua script. The scripts name keys they
compute from the prefix, which a single Redis (or a replicated one) allows; Redis Cluster does
not, and is not supported.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import orjson
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import AuthenticationError, AuthorizationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from session_manager.errors import StartupFailed, StoreUnavailable
from session_manager.health_board import HealthBoard
from session_manager.logs import describe
from session_manager.redis_connection import RedisUrl
from session_manager.store.base import JsonDict, SessionCursor, matches
from session_manager.store.write_behind import SessionWriteBehind, WriteObserver

log = logging.getLogger(__name__)

T = TypeVar("T")
WRITE_CHUNK = 500  # views per pipeline: one round trip each, each well inside the call timeout
PURGE_CHUNK = 500  # entries one purge script removes at most, so it never blocks Redis for long
LIST_PAGE = 100  # index entries read per round trip when a listing filters out many

# Errors worth another attempt: Redis down, restarting, loading its data, or slow. Anything
# else (a wrong password, a key of the wrong type) would fail the same way again; redis-py
# makes its refusals of credentials connection errors too, hence the exclusions.
TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)
REFUSED = (AuthenticationError, AuthorizationError)

SAVE_SESSION = """
local prefix, member = ARGV[1], ARGV[2]
local old = redis.call('HMGET', KEYS[1], 'member', 'status', 'user', 'owner')
if old[1] then
  redis.call('ZREM', prefix .. 'sessions', old[1])
  redis.call('ZREM', prefix .. 'sessions:status:' .. old[2], old[1])
  redis.call('ZREM', prefix .. 'sessions:user:' .. old[3], old[1])
  if old[4] then redis.call('ZREM', prefix .. 'sessions:owner:' .. old[4], old[1]) end
end
redis.call('HSET', KEYS[1], 'body', ARGV[7], 'member', member, 'status', ARGV[3],
           'user', ARGV[4])
redis.call('ZADD', prefix .. 'sessions', 0, member)
redis.call('ZADD', prefix .. 'sessions:status:' .. ARGV[3], 0, member)
redis.call('ZADD', prefix .. 'sessions:user:' .. ARGV[4], 0, member)
if ARGV[5] == '1' then
  redis.call('HSET', KEYS[1], 'owner', ARGV[6])
  redis.call('ZADD', prefix .. 'sessions:owner:' .. ARGV[6], 0, member)
else
  redis.call('HDEL', KEYS[1], 'owner')
end
return 1
"""

# Ended sessions created before ARGV[2] (RFC 3339), at most ARGV[3] of them; returns how many.
PURGE_SESSIONS = """
local prefix = ARGV[1]
local ended = prefix .. 'sessions:status:Terminated'
local members = redis.call('ZRANGE', ended, '-', '(' .. ARGV[2], 'BYLEX', 'LIMIT', 0, ARGV[3])
for _, member in ipairs(members) do
  local cut = string.find(member, '\\0', 1, true)
  local key = prefix .. 'session:' .. string.sub(member, cut + 1)
  local fields = redis.call('HMGET', key, 'user', 'owner')
  redis.call('ZREM', ended, member)
  redis.call('ZREM', prefix .. 'sessions', member)
  if fields[1] then redis.call('ZREM', prefix .. 'sessions:user:' .. fields[1], member) end
  if fields[2] then redis.call('ZREM', prefix .. 'sessions:owner:' .. fields[2], member) end
  redis.call('DEL', key)
end
return #members
"""

# Idempotency keys created before ARGV[2] (epoch seconds), at most ARGV[3]; returns how many.
PURGE_KEYS = """
local prefix = ARGV[1]
local index = prefix .. 'idempotency-by-time'
local keys = redis.call('ZRANGE', index, '-inf', '(' .. ARGV[2], 'BYSCORE', 'LIMIT', 0, ARGV[3])
for _, key in ipairs(keys) do
  redis.call('ZREM', index, key)
  redis.call('DEL', prefix .. 'idempotency:' .. key)
end
return #keys
"""

SessionArgs = tuple[bytes, list[bytes]]  # the session's hash key, and the save script's ARGV


@dataclass(frozen=True)
class _Client:
    """The connections to Redis and the scripts registered with them, while the store is open."""

    redis: Redis
    save_session: AsyncScript
    purge_sessions: AsyncScript
    purge_keys: AsyncScript

    @classmethod
    def of(cls, redis: Redis) -> _Client:
        return cls(
            redis,
            redis.register_script(SAVE_SESSION),
            redis.register_script(PURGE_SESSIONS),
            redis.register_script(PURGE_KEYS),
        )


class RedisStore:
    """Sessions, registrations and idempotency keys in Redis; owns the write-behind loop that
    stores session views (a task started by `open` and stopped by `aclose`).

    `url` may carry a password: it is never logged nor part of an error. `timeout` bounds each
    operation on Redis, retries included. `board` (optional) hears when the store goes down
    and comes back; `on_fatal(reason)` (optional) is called once if the session writer dies."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "session-manager:",
        timeout: float = 2.0,
        board: HealthBoard | None = None,
        on_fatal: Callable[[str], None] | None = None,
        max_pending: int = 50_000,
        flush_timeout: float = 10.0,
        attempts: int = 3,
        retry_backoff: float = 0.1,
        max_backoff: float = 5.0,
        on_write: WriteObserver | None = None,
    ) -> None:
        self._url = RedisUrl(url)
        self._prefix = prefix
        self._timeout = timeout
        self._flush_timeout = flush_timeout
        self._attempts = attempts
        self._retry_backoff = retry_backoff
        self._max_backoff = max_backoff
        self._client: _Client | None = None
        self._views = SessionWriteBehind(
            self._write_sessions,
            name="redis-session-writer",
            log=log,
            board=board,
            on_fatal=on_fatal,
            max_pending=max_pending,
            flush_timeout=flush_timeout,
            retry_backoff=retry_backoff,
            max_backoff=max_backoff,
            describe=self._url.describe,
            traceback_of=_traceback_of,
            on_write=on_write,
        )

    # lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and wait for Redis to answer a PING, retrying for up to `flush_timeout`
        seconds (it may be starting beside us); `StartupFailed` names the host, never the
        URL, which may hold a password."""
        try:
            client = self._url.connect(timeout=self._timeout)
        except ValueError:  # redis-py's message may quote parts of the URL
            raise StartupFailed("redis_url is not a valid Redis URL") from None
        problem = await self._first_ping(client)
        if problem is not None:
            await self._close_client(client)
            raise StartupFailed(f"cannot reach Redis at {self._url.where}: {problem}")
        self._client = _Client.of(client)
        self._views.start()

    async def _first_ping(self, client: Redis) -> str | None:
        """None once Redis answers; else why not, on one line without secrets."""
        last = "no answer"
        delay = self._retry_backoff
        try:
            async with asyncio.timeout(self._flush_timeout):
                while True:
                    try:
                        async with asyncio.timeout(self._timeout):
                            await client.ping()
                        return None
                    except Exception as exc:
                        if not _worth_retrying(exc):  # wrong password, not a Redis: final
                            return self._url.describe(exc)
                        last = self._url.describe(exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._max_backoff)
        except TimeoutError:
            return f"no answer within {self._flush_timeout:g} s ({last})"

    async def aclose(self) -> None:
        await self._views.aclose()
        client, self._client = self._client, None
        if client is not None:
            await self._close_client(client.redis)

    async def _close_client(self, client: Redis) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await client.aclose()
        except Exception as exc:
            log.error(
                "closing the Redis connections failed", extra={"error": self._url.describe(exc)}
            )

    async def ping(self) -> None:
        """Return once Redis answers; `StoreUnavailable` if it does not within the bound."""
        await self._call("answer a ping", lambda c: c.redis.ping())

    # health ------------------------------------------------------------------------------

    @property
    def backlog(self) -> int:
        return self._views.backlog

    @property
    def healthy(self) -> bool:
        return self._views.healthy

    def check_capacity(self) -> None:
        self._views.check_capacity()

    # calls to Redis ----------------------------------------------------------------------

    async def _call(self, what: str, fn: Callable[[_Client], Awaitable[T]]) -> T:
        """Run `fn` on the client, retrying transient failures with backoff, all within
        `timeout`; `StoreUnavailable` (one line, no redis-py internals) if it never works."""
        client = self._client
        if client is None:
            raise StoreUnavailable("the store is not open")
        delay = self._retry_backoff
        attempt = 1
        try:
            async with asyncio.timeout(self._timeout):
                while True:
                    try:
                        return await fn(client)
                    except Exception as exc:
                        if attempt >= self._attempts or not _worth_retrying(exc):
                            raise
                        log.warning(
                            "store call failed; retrying",
                            extra={
                                "operation": what,
                                "attempt": attempt,
                                "error": self._url.describe(exc),
                            },
                        )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._max_backoff)
                    attempt += 1
        except TimeoutError:
            log.error(
                "store call timed out",
                extra={"operation": what, "timeout": self._timeout, "attempts": attempt},
            )
            raise StoreUnavailable(f"the store did not {what} within {self._timeout:g} s") from None
        except Exception as exc:
            log.error(
                "store call failed",
                extra={"operation": what, "attempts": attempt, "error": self._url.describe(exc)},
                exc_info=_traceback_of(exc),
            )
            raise StoreUnavailable(f"the store could not {what}") from None

    def _key(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)

    # registrations -----------------------------------------------------------------------

    async def save_service(self, service: JsonDict) -> None:
        what = "save a registration"
        body = _encode(what, service)
        await self._call(
            what, lambda c: c.redis.hset(self._key("services"), service["service_id"], body)
        )

    async def delete_service(self, service_id: str) -> None:
        await self._call(
            "delete a registration", lambda c: c.redis.hdel(self._key("services"), service_id)
        )

    async def load_services(self) -> list[JsonDict]:
        found = await self._call(
            "load registrations", lambda c: c.redis.hgetall(self._key("services"))
        )
        services: list[JsonDict] = [orjson.loads(body) for body in found.values()]
        return sorted(services, key=lambda service: str(service["service_id"]))

    # idempotency keys --------------------------------------------------------------------

    async def save_idempotency(self, key: str, entry: JsonDict) -> None:
        what = "save an idempotency key"
        body = _encode(what, entry)
        created_at = entry.get("created_at")

        async def save(client: _Client) -> None:
            async with client.redis.pipeline(transaction=True) as pipe:
                pipe.set(self._key("idempotency", key), body)
                index = self._key("idempotency-by-time")
                # An entry without a time is never purged, as in the SQLite store.
                if isinstance(created_at, int | float) and not isinstance(created_at, bool):
                    pipe.zadd(index, {key: float(created_at)})
                else:
                    pipe.zrem(index, key)
                await pipe.execute()

        await self._call(what, save)

    async def get_idempotency(self, key: str) -> JsonDict | None:
        body = await self._call(
            "read an idempotency key", lambda c: c.redis.get(self._key("idempotency", key))
        )
        return orjson.loads(body) if body is not None else None

    async def delete_idempotency(self, key: str) -> None:
        async def delete(client: _Client) -> None:
            async with client.redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._key("idempotency", key))
                pipe.zrem(self._key("idempotency-by-time"), key)
                await pipe.execute()

        await self._call("delete an idempotency key", delete)

    async def purge(self, *, sessions_created_before: str, keys_created_before: float) -> int:
        """Each round trip removes at most `PURGE_CHUNK` entries and is a call of its own,
        within `timeout`: many old rows take more calls, not one call past its bound."""
        removed = 0
        for ended_sessions, cutoff in (
            (True, sessions_created_before),
            (False, repr(float(keys_created_before))),
        ):
            while True:
                count = await self._call(
                    "purge old rows", partial(self._purge_chunk, ended_sessions, cutoff)
                )
                removed += count
                if count < PURGE_CHUNK:
                    break
        return removed

    async def _purge_chunk(self, ended_sessions: bool, cutoff: str, client: _Client) -> int:
        script = client.purge_sessions if ended_sessions else client.purge_keys
        return int(await script(args=[self._prefix, cutoff, PURGE_CHUNK]))

    # sessions ----------------------------------------------------------------------------

    def save_session(self, view: JsonDict) -> None:
        self._views.save(view)

    async def flush(self, timeout: float | None = None) -> None:
        await self._views.flush(timeout)

    async def get_session(self, session_id: str) -> JsonDict | None:
        waiting = self._views.unwritten(session_id)
        if waiting is not None:
            return waiting
        body = await self._call(
            "read a session", lambda c: c.redis.hget(self._key("session", session_id), "body")
        )
        return orjson.loads(body) if body is not None else None

    async def list_sessions(
        self,
        *,
        status: str | None,
        user_identity: str | None,
        limit: int,
        before: SessionCursor | None,
        owner: str | None = None,
    ) -> list[JsonDict]:
        async def stored(skip: frozenset[str]) -> list[JsonDict]:
            return await self._call(
                "list sessions",
                lambda c: self._list_stored(
                    c.redis, status, user_identity, owner, limit, before, skip
                ),
            )

        return await self._views.listing(
            stored,
            status=status,
            user_identity=user_identity,
            owner=owner,
            limit=limit,
            before=before,
        )

    async def _list_stored(
        self,
        redis: Redis,
        status: str | None,
        user_identity: str | None,
        owner: str | None,
        limit: int,
        before: SessionCursor | None,
        skip: frozenset[str],
    ) -> list[JsonDict]:
        """Up to `limit` stored sessions, newest first, leaving out those in `skip`. One index
        is walked (the narrowest filter given); the other filters are applied to the bodies,
        page after page until enough are found."""
        if owner is not None:
            index = self._key("sessions", "owner", owner)
        elif user_identity is not None:
            index = self._key("sessions", "user", user_identity)
        elif status is not None:
            index = self._key("sessions", "status", status)
        else:
            index = self._key("sessions")
        page = max(limit, LIST_PAGE)
        bound = b"+" if before is None else b"(" + _member(before[0], before[1])
        found: list[JsonDict] = []
        while True:
            members = [
                _bytes(member)
                for member in await redis.zrange(
                    index, bound, b"-", desc=True, bylex=True, offset=0, num=page
                )
            ]
            if not members:
                return found
            async with redis.pipeline(transaction=False) as pipe:
                for member in members:
                    session_id = member.split(b"\0", 1)[1]
                    pipe.hget(self._prefix.encode() + b"session:" + session_id, "body")
                bodies: list[bytes | None] = await pipe.execute()
            for body in bodies:
                if body is None:
                    continue  # purged between the two round trips
                view = orjson.loads(body)
                if view["session_id"] not in skip and matches(view, status, user_identity, owner):
                    found.append(view)
            if len(found) >= limit or len(members) < page:
                return found[:limit]
            bound = b"(" + members[-1]

    async def _write_sessions(self, views: list[JsonDict]) -> list[tuple[str, str]]:
        """Write the views, each with its index entries in one script, a chunk per round trip,
        each round trip within `timeout`. A view that cannot be written at all is left out (it
        would fail every retry of the batch); returns those as (session_id, why)."""
        client = self._client
        if client is None:
            raise StoreUnavailable("the store is not open")
        prepared: list[SessionArgs] = []
        dropped: list[tuple[str, str]] = []
        for view in views:
            try:
                prepared.append(self._session_args(view))
            except Exception as exc:
                dropped.append((str(view.get("session_id")), describe(exc)))
        for start in range(0, len(prepared), WRITE_CHUNK):
            async with (
                asyncio.timeout(self._timeout),
                client.redis.pipeline(transaction=False) as pipe,
            ):
                for key, args in prepared[start : start + WRITE_CHUNK]:
                    await client.save_session(keys=[key], args=args, client=pipe)
                await pipe.execute()
        return dropped

    def _session_args(self, view: JsonDict) -> SessionArgs:
        """The save script's key and arguments, all bytes: a view that cannot become them
        (a field of the wrong type, text that is not UTF-8) fails here, alone."""
        session_id, status = view["session_id"], view["status"]
        user, created_at, owner = view["user_identity"], view["created_at"], view.get("owner")
        if not all(isinstance(f, str) for f in (session_id, status, user, created_at)):
            raise TypeError("session_id, status, user_identity and created_at must be strings")
        if not (owner is None or isinstance(owner, str)):
            raise TypeError("owner must be a string or null")
        if "\0" in created_at:  # the separator of the index members
            raise ValueError("created_at holds a NUL character")
        return (
            self._key("session", session_id).encode(),
            [
                self._prefix.encode(),
                _member(created_at, session_id),
                status.encode(),
                user.encode(),
                b"0" if owner is None else b"1",
                b"" if owner is None else owner.encode(),
                orjson.dumps(view),
            ],
        )


def _worth_retrying(exc: Exception) -> bool:
    return isinstance(exc, TRANSIENT) and not isinstance(exc, REFUSED)


def _traceback_of(exc: Exception) -> Exception | None:
    """The exception to log with its traceback, or None for Redis being unreachable, slow or
    refusing: those are told by the redacted one-line `error`, since redis-py's own text (a
    traceback repeats it) is not ours to trust with secrets. Anything else is a bug here."""
    return None if isinstance(exc, RedisError | OSError | TimeoutError) else exc


def _bytes(value: object) -> bytes:
    """A reply of Redis as bytes: the client is built without `decode_responses`."""
    if not isinstance(value, bytes):
        raise TypeError(f"unexpected reply from Redis: {type(value).__name__}")
    return value


def _member(created_at: str, session_id: str) -> bytes:
    """An index entry: sorts like (created_at, session_id) under Redis's byte order."""
    return created_at.encode() + b"\0" + session_id.encode()


def _encode(what: str, value: JsonDict) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
        log.error("value cannot be serialised", extra={"operation": what, "error": describe(exc)})
        raise StoreUnavailable(f"the store could not {what}: it cannot be serialised") from None
