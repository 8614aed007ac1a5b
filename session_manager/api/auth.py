"""Who may call what: API keys with scopes, the scope each route needs, and a rate limit per key.

Setting `api_keys` holds entries `"<key> <scope>[,<scope>…]"` (parsed in
`session_manager.api_keys`, below the settings that check them); a key may be given as
`sha256:<64 hex>`, so that only its hash is kept in the configuration. Scopes:

- `admin`: everything.
- `client`: create sessions; read, list, delete and change only the sessions it created (any
  other session id is 404); read their event streams; read the registry list.
- `service`: register; read, change, drain, deregister and rotate only the registrations it
  made (any other id is 403).

A request sends `Authorization: Bearer <key>`. The presented key is hashed with SHA-256 and its
digest compared with every configured key's digest by `hmac.compare_digest`, all of them, so the
time taken says nothing about which key, or how much of one, matched. A caller is known by its
key id, the first 12 hex digits of the key's SHA-256: what sessions and registrations record as
their `owner`, and what logs show. The key itself is never kept, logged or shown anywhere.

Without `api_keys` every request is the open caller: nothing is checked and nothing is owned,
as before keys existed (the manager then listens on loopback only; see `config`).

`ROUTE_SCOPES` declares every route of the app; a route missing from it is refused to everyone
but an admin (and a test fails). `GET /health`, LiveKit's webhook (which carries LiveKit's own
signature), the API document (`GET /openapi.json`), its page (`GET /docs`) and the console's
page and files (`GET /console`) are open.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from session_manager.api_keys import MAX_KEY_CHARS, ApiKey, RateLimit, Scope, parse_api_keys
from session_manager.commands import Access
from session_manager.errors import Forbidden, TooManyRequests, Unauthorized

log = logging.getLogger(__name__)


BEARER = "bearer"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request: a key id and its scopes; `key_id` None is the open caller (no keys
    configured), who may do everything and owns nothing."""

    key_id: str | None
    scopes: frozenset[Scope]

    @property
    def admin(self) -> bool:
        return Scope.ADMIN in self.scopes

    @property
    def access(self) -> Access:
        """What the supervisor's ownership checks need to know of this caller."""
        return Access(owner=self.key_id, admin=self.admin)


OPEN_CALLER: Final = Caller(None, frozenset(Scope))


class KeyTable:
    """The configured keys, by digest; empty when none are configured (the open mode)."""

    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self._keys = tuple(keys)

    @classmethod
    def parse(cls, entries: Iterable[str]) -> KeyTable:
        return cls(parse_api_keys(entries))

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def resolve(self, presented: str) -> Caller | None:
        """The caller whose key this is, or None. Constant time in the key: every digest is
        compared, whatever matched before."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found: ApiKey | None = None
        for key in self._keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        return None if found is None else Caller(found.key_id, found.scopes)

    def caller(self, authorization: str | None) -> Caller:
        """The caller an `Authorization` header names; raises Unauthorized if none."""
        if not self.enabled:
            return OPEN_CALLER
        if not authorization:
            raise Unauthorized("An API key is required: send Authorization: Bearer <key>")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != BEARER or not token:
            raise Unauthorized("Authorization must be 'Bearer <key>'")
        caller = self.resolve(token) if len(token) <= MAX_KEY_CHARS else None
        if caller is None:
            raise Unauthorized("The API key is not valid")
        return caller


# -------------------------------------------------------------------------- what each route needs


@dataclass(frozen=True, slots=True)
class RouteRule:
    """The scopes that may use a route (any one of them); `open`: no key at all."""

    scopes: frozenset[Scope] = frozenset()
    open: bool = False


OPEN: Final = RouteRule(open=True)
ADMIN_ONLY: Final = RouteRule(frozenset({Scope.ADMIN}))
CLIENTS: Final = RouteRule(frozenset({Scope.CLIENT, Scope.ADMIN}))
SERVICES: Final = RouteRule(frozenset({Scope.SERVICE, Scope.ADMIN}))

_SESSION = "/api/v1/sessions/{session_id}"
_SERVICE = "/api/v1/microservices/{service_id}"

ROUTE_SCOPES: Final[Mapping[tuple[str, str], RouteRule]] = {
    ("GET", "/health"): OPEN,
    ("POST", "/livekit/webhook"): OPEN,  # LiveKit's own signature, checked by the handler
    # The API document and its docs page: they describe the API and hold no data.
    ("GET", "/openapi.json"): OPEN,
    ("GET", "/docs"): OPEN,
    ("GET", "/docs/assets/{name}"): OPEN,
    # The console's page and files (`api.console`): it reads everything with the person's key.
    ("GET", "/console"): OPEN,
    ("GET", "/console/assets/{name}"): OPEN,
    ("GET", "/metrics"): ADMIN_ONLY,
    ("GET", "/api/v1/events"): ADMIN_ONLY,
    ("GET", "/api/v1/pools"): ADMIN_ONLY,  # warm pools: members are no user's sessions
    ("POST", "/api/v1/create-session"): CLIENTS,
    ("POST", "/api/v1/sessions"): CLIENTS,
    ("GET", "/api/v1/sessions"): CLIENTS,  # a client's listing shows its own sessions only
    ("GET", _SESSION): CLIENTS,  # ownership: checked by the supervisor (404 if not its own)
    ("DELETE", _SESSION): CLIENTS,
    ("POST", _SESSION + "/services"): CLIENTS,
    ("DELETE", _SESSION + "/services/{service_id}"): CLIENTS,
    ("GET", _SESSION + "/events"): CLIENTS,
    ("GET", "/api/v1/microservices"): CLIENTS,
    ("POST", "/api/v1/microservices/register"): SERVICES,
    ("GET", _SERVICE): SERVICES,  # ownership: checked by the supervisor (403 if not its own)
    ("PUT", _SERVICE): SERVICES,
    ("DELETE", _SERVICE): SERVICES,
    ("POST", _SERVICE + "/drain"): SERVICES,
    ("POST", _SERVICE + "/rotate-secret"): SERVICES,
    ("GET", _SERVICE + "/presence"): SERVICES,  # the SDK's presence WebSocket
}
"""Every route of the app, by method and path template (HEAD goes with GET)."""


def route_of(request: web.Request) -> tuple[str, str] | None:
    """(method, path template) of the route a request matched; None when it matched none."""
    resource = request.match_info.route.resource
    if resource is None:
        return None
    method = hdrs.METH_GET if request.method == hdrs.METH_HEAD else request.method
    return method, resource.canonical


def rule_for(route: tuple[str, str] | None) -> RouteRule:
    if route is None:  # the router answers 404 or 405: any valid key may hear that
        return RouteRule(frozenset(Scope))
    return ROUTE_SCOPES.get(route, ADMIN_ONLY)  # an undeclared route: admin only


# ----------------------------------------------------------------------------------- rate limit

MAX_BUCKETS: Final = 10_000
"""Callers whose buckets are kept; the least recently seen is forgotten past it (a bucket left
alone long enough is full again, as a forgotten one is)."""


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per caller (key id, or client address without keys)."""

    def __init__(
        self,
        limit: RateLimit,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_buckets: int = MAX_BUCKETS,
    ) -> None:
        self.limit = limit
        self._clock = clock
        self._max_buckets = max_buckets
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, who: str) -> float | None:
        """Spend one request of `who`'s bucket: None if allowed, else the seconds until one is
        allowed again."""
        now = self._clock()
        limit = self.limit
        bucket = self._buckets.get(who)
        if bucket is None:
            bucket = self._buckets[who] = _Bucket(float(limit.burst), now)
            if len(self._buckets) > self._max_buckets:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(who)
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(float(limit.burst), bucket.tokens + elapsed * limit.per_second)
            bucket.updated = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return None
        return (1 - bucket.tokens) / limit.per_second


# ----------------------------------------------------------------------------------- middleware

CALLER: Final = web.RequestKey("caller", Caller)


def caller_of(request: web.Request) -> Caller:
    """The caller the auth middleware resolved (the open caller where it did not run)."""
    caller = request.get(CALLER)
    return caller if isinstance(caller, Caller) else OPEN_CALLER


def access_of(request: web.Request) -> Access:
    """What the supervisor needs to know of the caller, for its ownership checks."""
    return caller_of(request).access


def auth_middleware(keys: KeyTable, limiter: RateLimiter | None = None) -> Middleware:
    """Resolve the caller, check the route's scope, then the caller's rate. Runs inside the
    error middleware (its refusals are envelopes) and after the CORS preflight (a browser sends
    no key on a preflight)."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = route_of(request)
        rule = rule_for(route)
        if rule.open:
            return await handler(request)
        try:
            caller = keys.caller(request.headers.get(hdrs.AUTHORIZATION))
        except Unauthorized:
            log.debug(
                "request without a valid API key refused",
                extra={"method": request.method, "path": request.path, "remote": request.remote},
            )
            raise
        if keys.enabled and not caller.scopes & rule.scopes:
            log.info(
                "API key without the scope refused",
                extra={"key_id": caller.key_id, "method": request.method, "path": request.path},
            )
            shown = f"{route[0]} {route[1]}" if route else request.method
            raise Forbidden(f"This API key may not use {shown}")
        if limiter is not None:
            wait = limiter.take(caller.key_id or request.remote or "")
            if wait is not None:
                raise TooManyRequests(
                    f"Too many requests: at most {limiter.limit.per_second:g} a second, "
                    f"in bursts of up to {limiter.limit.burst}",
                    retry_after=math.ceil(wait),
                )
        request[CALLER] = caller
        return await handler(request)

    return authenticate
