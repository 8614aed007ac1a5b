"""Warm pools: rooms whose services have already joined, waiting for a user.

`WarmPoolSetting` is one entry of the `warm_pools` setting (validated at start); `WarmPools` is
the keeper's book: which members each pool has, which fills are due (with a back-off after a
fill that failed), which members have idled too long, and the counters /metrics and
`GET /api/v1/pools` show. It does no I/O and starts no task: the supervisor owns it, calls it
from its loop only, and does what it says (spawn a member, end one, hand one to a user).

A member is a session actor in pooled mode (`session.pool_member`): its room is created and its
services dispatched and joined, with no user, no client-join deadline, no stored view and no
session events. A create-session whose `required_services` equal a pool's `services` (as a
multiset: order does not matter, each requirement once) takes the oldest Ready member; the
pool refills behind it.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_POOLS: Final = 16  # entries of warm_pools
MAX_POOL_SIZE: Final = 50  # members of one pool
MAX_POOLED: Final = 200  # members of all pools together
MAX_POOL_SERVICES: Final = 32  # requirements of one entry (as create-session's)
MIN_MAX_IDLE: Final = 1.0
MAX_MAX_IDLE: Final = 86_400.0
FILL_BACKOFF: Final = 1.0  # seconds before the first retry of a pool whose fill failed
FILL_BACKOFF_MAX: Final = 60.0  # doubling up to this
_MAX_REQUIREMENT_BYTES: Final = 133  # "type:" + a service id of 128 bytes
_NOT_IN_ID: Final = re.compile(r"[\s/?#\x00-\x1f\x7f]")
AGENT_PREFIX: Final = "agent:"


class WarmPoolSetting(BaseModel):
    """One warm pool: keep `size` rooms with `services` joined; a member unclaimed for
    `max_idle` seconds (since its fill began) is ended and replaced."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    services: list[str] = Field(min_length=1, max_length=MAX_POOL_SERVICES)
    size: int = Field(ge=1, le=MAX_POOL_SIZE)
    max_idle: float = Field(default=600.0, ge=MIN_MAX_IDLE, le=MAX_MAX_IDLE, allow_inf_nan=False)

    @field_validator("services")
    @classmethod
    def _requirements(cls, services: list[str]) -> list[str]:
        for requirement in services:
            if requirement.startswith(AGENT_PREFIX):
                raise ValueError(
                    f"{requirement}: agent slots cannot be pooled (a livekit-agents job's "
                    "metadata is fixed when it is dispatched)"
                )
            size = len(requirement.encode())
            if not 0 < size <= _MAX_REQUIREMENT_BYTES or _NOT_IN_ID.search(requirement):
                raise ValueError(f"{requirement!r} is not a service id or type:NAME")
            if requirement == "type:":
                raise ValueError("type: needs a type name (type:NAME)")
        if len(set(services)) != len(services):
            raise ValueError("a requirement is listed twice (a session has each one once)")
        return services

    @property
    def name(self) -> str:
        """The pool's name: its requirements, sorted, joined by '+'."""
        return "+".join(sorted(self.services))


def check_pools(pools: list[WarmPoolSetting]) -> list[WarmPoolSetting]:
    """The bounds across entries (ValueError naming the one broken)."""
    if len(pools) > MAX_POOLS:
        raise ValueError(f"at most {MAX_POOLS} pools")
    names = [pool.name for pool in pools]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"two pools have the services {name}")
    total = sum(pool.size for pool in pools)
    if total > MAX_POOLED:
        raise ValueError(f"the pools' sizes add up to {total}, more than {MAX_POOLED}")
    return pools


@dataclass
class Member:
    """A member of a pool, from its spawn until it is handed out or ends."""

    session_id: str
    started: float  # monotonic, when its fill began


@dataclass
class Pool:
    """One pool's members and counters; changed only by `WarmPools`."""

    setting: WarmPoolSetting
    members: dict[str, Member] = field(default_factory=dict)
    failures: int = 0  # fills in a row that ended before Ready
    retry_at: float = 0.0  # monotonic: no fill before this (back-off)
    hits: int = 0
    misses: int = 0
    refills: int = 0
    expiries: int = 0
    fill_failures: int = 0
    lost: int = 0  # Ready members that ended on their own (a service died, the room closed)

    @property
    def name(self) -> str:
        return self.setting.name


class WarmPools:
    """The keeper's book of every pool; the supervisor's loop is its only caller."""

    def __init__(
        self, settings: Iterable[WarmPoolSetting], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self.pools: dict[str, Pool] = {s.name: Pool(s) for s in settings}
        self._counts = {name: Counter(pool.setting.services) for name, pool in self.pools.items()}
        # members out of their pool, ending on purpose: session id -> (pool name, why)
        self._leaving: dict[str, tuple[str, str]] = {}

    def __bool__(self) -> bool:
        return bool(self.pools)

    def match(self, required: list[str] | None, room_name: str | None) -> Pool | None:
        """The pool a create-session can be served from: the same requirements as a multiset,
        and no room name of its own (a pooled room has its name already)."""
        if required is None or room_name is not None or not self.pools:
            return None
        wanted = Counter(required)
        for name, counts in self._counts.items():
            if counts == wanted:
                return self.pools[name]
        return None

    def pool_of(self, session_id: str) -> Pool | None:
        for pool in self.pools.values():
            if session_id in pool.members:
                return pool
        return None

    def take(self, pool: Pool, usable: Callable[[str], bool]) -> str | None:
        """Hand out the oldest member `usable` says is Ready (it expires first); None (a miss)
        when there is none. The member leaves the pool at once."""
        for session_id in pool.members:  # insertion order: oldest first
            if usable(session_id):
                del pool.members[session_id]
                pool.hits += 1
                return session_id
        pool.misses += 1
        return None

    def not_taken(self, pool: Pool, session_id: str, *, running: bool) -> None:
        """A member handed out stopped being Ready before it took the user on (a service left
        just then): no hit after all; it ends (`running`: has yet to end) as a lost member."""
        pool.hits -= 1
        pool.lost += 1
        if running:
            self._leaving[session_id] = (pool.name, "lost")

    def fills_due(self, room: int) -> list[Pool]:
        """One entry per member to start now, at most `room` of them (the capacity left):
        pools below their size and not backing off."""
        now, due = self._clock(), list[Pool]()
        for pool in self.pools.values():
            if now < pool.retry_at:
                continue
            for _ in range(pool.setting.size - len(pool.members)):
                if len(due) >= room:
                    return due
                due.append(pool)
        return due

    def added(self, pool: Pool, session_id: str) -> None:
        pool.members[session_id] = Member(session_id, self._clock())
        pool.refills += 1

    def expired(self) -> list[str]:
        """Members past their pool's max_idle: out of the pool now (never handed out), to be
        ended by the caller; their end is no failure."""
        now, gone = self._clock(), []
        for pool in self.pools.values():
            for session_id, member in list(pool.members.items()):
                if now - member.started >= pool.setting.max_idle:
                    del pool.members[session_id]
                    pool.expiries += 1
                    self._leaving[session_id] = (pool.name, "expired")
                    gone.append(session_id)
        return gone

    def drop(self, session_id: str) -> bool:
        """A member that can serve no user (one of its instances is unhealthy, draining or
        gone): out of its pool now, to be ended by the caller and replaced."""
        pool = self.pool_of(session_id)
        if pool is None:
            return False
        del pool.members[session_id]
        pool.lost += 1
        self._leaving[session_id] = (pool.name, "lost")
        return True

    def release_all(self) -> list[str]:
        """Every member, out of its pool (the manager shuts down)."""
        gone = []
        for pool in self.pools.values():
            for session_id in pool.members:
                self._leaving[session_id] = (pool.name, "shutdown")
                gone.append(session_id)
            pool.members.clear()
        return gone

    def refused(self, pool: Pool) -> None:
        """No instance could be chosen for a fill (none registered, healthy or with room):
        tried again a second later; choosing is no I/O, so no doubling."""
        pool.retry_at = self._clock() + FILL_BACKOFF

    def ended(self, session_id: str, *, was_ready: bool) -> tuple[Pool, str] | None:
        """A member's actor ended: (its pool, "expired" | "lost" | "failed" | "shutdown"), or
        None for a session that was no member (or one handed out). A fill that never reached
        Ready makes the pool back off (1 s, doubling to 60 s): a broken service is not
        hammered."""
        leaving = self._leaving.pop(session_id, None)
        if leaving is not None:
            return self.pools[leaving[0]], leaving[1]
        pool = self.pool_of(session_id)
        if pool is None:
            return None
        del pool.members[session_id]
        if was_ready:
            pool.lost += 1
            pool.failures = 0
            return pool, "lost"
        pool.fill_failures += 1
        pool.failures += 1
        backoff = min(FILL_BACKOFF * 2 ** (pool.failures - 1), FILL_BACKOFF_MAX)
        pool.retry_at = self._clock() + backoff
        return pool, "failed"

    def filled(self, pool: Pool) -> None:
        """A member reached Ready: the pool's back-off is over."""
        pool.failures = 0
        pool.retry_at = 0.0

    def retry_in(self, pool: Pool) -> float:
        return max(0.0, round(pool.retry_at - self._clock(), 3))


def pool_view(
    pool: Pool, ready: int, members: list[dict[str, Any]], retry_in: float
) -> dict[str, Any]:
    """What GET /api/v1/pools shows of one pool."""
    setting = pool.setting
    return {
        "name": pool.name,
        "services": list(setting.services),
        "size": setting.size,
        "max_idle": setting.max_idle,
        "ready": ready,
        "members": members,
        "retry_in": retry_in,
        "hits": pool.hits,
        "misses": pool.misses,
        "refills": pool.refills,
        "expiries": pool.expiries,
        "fill_failures": pool.fill_failures,
        "lost": pool.lost,
    }
