"""Which manager process owns each live session: a Redis key per session holding the owner's node
id, with a time to live (`lease_ttl`) the owner keeps renewing.

Only the owner's actor changes a session. A process that dies stops renewing, its leases expire,
and another process claims the sessions (`claim_orphans`) and adopts them. A process that finds a
lease of its own taken by another (it was paused longer than the lease) gives the session up.

Keys, under the prefix P:
- `P lease:<session_id>`: the owner's node id, expiring after `lease_ttl`;
- `P live-sessions`: a set of the ids of every session some process owns or should own; a
  session enters it before its room is created and leaves it when it has ended;
- `P load:<service_id>`: the sessions holding a place on that instance, across the cluster,
  checked against its max_sessions when a session is created.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable
from typing import TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

from session_manager.errors import AtCapacity, NoCapacity, StoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

# For each session: still ours -> the lease is renewed; expired and free -> ours again (nobody
# claimed it meanwhile); held by another process -> reported lost. One round trip for all.
RENEW = """
local lost = {}
for i, key in ipairs(KEYS) do
  local owner = redis.call('GET', key)
  if owner == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
  elseif not owner then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
  else
    table.insert(lost, i)
  end
end
return lost
"""

# Own a new session and take its place on each instance it uses, all or nothing: an instance
# at its max_sessions across the cluster refuses (its position in the list is returned), so two
# processes choosing at once cannot both fill its last place.
CLAIM_NEW = """
if tonumber(ARGV[4]) >= 0 and redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[4]) then
  return -1
end
for i = 3, #KEYS do
  local most = tonumber(ARGV[i + 2])
  if most >= 0 and redis.call('SISMEMBER', KEYS[i], ARGV[3]) == 0
     and redis.call('SCARD', KEYS[i]) >= most then
    return i - 2
  end
end
for i = 3, #KEYS do redis.call('SADD', KEYS[i], ARGV[3]) end
redis.call('SADD', KEYS[1], ARGV[3])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 0
"""

# Let a session go: the lease is deleted only if it is still ours; an ended session leaves the
# live set and the places it held on instances (KEYS[3..]).
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
if ARGV[2] == '1' then
  redis.call('SREM', KEYS[2], ARGV[3])
  for i = 3, #KEYS do redis.call('SREM', KEYS[i], ARGV[3]) end
end
return 1
"""

RENEW_CHUNK = 1000  # leases renewed per script call


class SessionLeases:
    """The leases of one process (node). Every call is bounded by `timeout` and raises
    StoreUnavailable when Redis does not answer."""

    def __init__(
        self, redis: Redis, *, prefix: str, node_id: str, ttl: float, timeout: float
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self.node_id = node_id
        self.ttl = ttl
        self._ttl_ms = max(1, int(ttl * 1000))
        self._timeout = timeout
        self._renew = redis.register_script(RENEW)
        self._claim_new = redis.register_script(CLAIM_NEW)
        self._release = redis.register_script(RELEASE)
        self.owned: set[str] = set()  # the sessions this process holds a lease on
        # Sessions seen without a lease at the last look: claimed only if still without one
        # at the next, so an owner that was cut off from Redis for a moment renews first.
        self._unleased: set[str] = set()

    def _lease(self, session_id: str) -> str:
        return f"{self._prefix}lease:{session_id}"

    @property
    def _live(self) -> str:
        return f"{self._prefix}live-sessions"

    async def _bounded(self, what: str, call: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._timeout):
                return await call
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"Redis could not {what}: {type(exc).__name__}") from None

    def _load(self, service_id: str) -> str:
        return f"{self._prefix}load:{service_id}"

    async def claim_new(
        self, session_id: str, places: dict[str, int | None], *, max_live: int | None = None
    ) -> None:
        """Own a session being created, before its room exists, with a place on each instance
        it uses (service id -> its max_sessions, None: no limit). Raises NoCapacity if one of
        them is full across the cluster, AtCapacity if the cluster runs `max_live` sessions."""
        ids = sorted(places)
        keys = [self._live, self._lease(session_id), *(self._load(s) for s in ids)]
        limits: list[int] = [-1 if (most := places[s]) is None else most for s in ids]
        most_live = -1 if max_live is None else max_live
        args: list[str | int] = [self.node_id, self._ttl_ms, session_id, most_live, *limits]
        full = await self._bounded(
            "record a session's owner", self._claim_new(keys=keys, args=args)
        )
        if full == -1:
            raise AtCapacity(
                f"the session managers run their most live sessions ({max_live})",
                retry_after=10,
            )
        if full:
            raise NoCapacity(f"microservice {ids[int(full) - 1]} has no free capacity")
        self.owned.add(session_id)

    async def release(self, session_id: str, *, ended: bool, services: Iterable[str] = ()) -> None:
        """Stop owning a session; `ended`: it is over, no process should take it, and it gives
        back its places on `services`."""
        self.owned.discard(session_id)
        keys = [self._lease(session_id), self._live, *(self._load(s) for s in services)]
        args = [self.node_id, "1" if ended else "0", session_id]
        await self._bounded("release a session", self._release(keys=keys, args=args))

    async def release_all(self) -> None:
        """Let every session go at once (a shutdown that keeps them): others adopt them now,
        instead of after their leases run out."""
        for session_id in list(self.owned):
            await self.release(session_id, ended=False)

    async def renew(self) -> list[str]:
        """Renew every lease held; returns the sessions another process has taken."""
        owned = sorted(self.owned)
        lost: list[str] = []
        for start in range(0, len(owned), RENEW_CHUNK):
            chunk = owned[start : start + RENEW_CHUNK]
            keys = [self._lease(session_id) for session_id in chunk]
            positions = await self._bounded(
                "renew leases", self._renew(keys=keys, args=[self.node_id, self._ttl_ms])
            )
            lost += [chunk[int(position) - 1] for position in positions]
        self.owned.difference_update(lost)
        return lost

    async def claim_orphans(self, *, at_once: bool = False) -> list[str]:
        """Claim the sessions nobody holds a lease on (their owner died, or let them go) at
        this look and the one before (`at_once`: at this one; a process alone at start-up)."""
        members = await self._bounded("list live sessions", self._redis.smembers(self._live))
        candidates = sorted(
            session_id for member in members if (session_id := _text(member)) not in self.owned
        )
        if not candidates:
            return []
        holders = await self._bounded(
            "read leases", self._redis.mget([self._lease(s) for s in candidates])
        )
        unleased = {s for s, holder in zip(candidates, holders, strict=True) if holder is None}
        ripe = unleased if at_once else unleased & self._unleased
        self._unleased = unleased - ripe
        won: list[str] = []
        for session_id in sorted(ripe):
            claimed = await self._bounded(
                "claim a session",
                self._redis.set(self._lease(session_id), self.node_id, nx=True, px=self._ttl_ms),
            )
            if claimed:
                won.append(session_id)
        self.owned.update(won)
        return won

    async def loads(self, service_ids: Iterable[str]) -> dict[str, int]:
        """How many sessions hold a place on each of these instances, across the cluster."""
        ids = sorted(set(service_ids))
        if not ids:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for service_id in ids:
                pipe.scard(self._load(service_id))
            counts = await self._bounded("read instance loads", pipe.execute())
        return {service_id: int(count) for service_id, count in zip(ids, counts, strict=True)}

    async def known(self, session_ids: Iterable[str]) -> set[str]:
        """Which of these sessions are live somewhere in the cluster."""
        ids = sorted(set(session_ids))
        if not ids:
            return set()
        flags = await self._bounded("look up sessions", self._redis.smismember(self._live, ids))
        return {session_id for session_id, flag in zip(ids, flags, strict=True) if flag}

    async def forget(self, session_id: str) -> None:
        """A claimed session turned out to have ended already: it leaves the live set."""
        await self.release(session_id, ended=True)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
