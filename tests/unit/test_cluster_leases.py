"""Session leases on a real redis-server: who owns a session, what happens when an owner stops
renewing or finds its lease taken, and the places on instances that hold across processes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from session_manager.cluster.leases import SessionLeases
from session_manager.errors import AtCapacity, NoCapacity, StoreUnavailable
from tests.conftest import RedisUnderTest


@pytest.fixture
async def redis(redis_server: RedisUnderTest) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url, socket_timeout=1, socket_connect_timeout=1)
    yield client
    await client.aclose()


def node(redis: Redis, prefix: str, name: str, ttl: float = 30.0) -> SessionLeases:
    return SessionLeases(redis, prefix=prefix, node_id=name, ttl=ttl, timeout=1.0)


async def test_a_session_is_owned_by_the_process_that_created_it(
    redis: Redis, redis_prefix: str
) -> None:
    a, b = node(redis, redis_prefix, "a"), node(redis, redis_prefix, "b")
    await a.claim_new("s1", {})
    assert await a.renew() == []
    assert await b.claim_orphans(at_once=True) == []  # leased: nobody else takes it
    assert await b.known({"s1", "s2"}) == {"s1"}


async def test_an_owner_that_stops_renewing_loses_its_sessions_to_another(
    redis: Redis, redis_prefix: str
) -> None:
    a, b = node(redis, redis_prefix, "a"), node(redis, redis_prefix, "b")
    await a.claim_new("s1", {})
    await redis.delete(f"{redis_prefix}lease:s1")  # a's lease ran out (a died)
    # Two looks in a row without a lease before b claims: a live owner renews in between.
    assert await b.claim_orphans() == []
    assert await b.claim_orphans() == ["s1"]
    assert b.owned == {"s1"}
    # a comes back (it was only paused): its lease is b's now, so a gives the session up.
    assert await a.renew() == ["s1"]
    assert a.owned == set()


async def test_a_lease_that_ran_out_unclaimed_is_renewed_by_its_owner(
    redis: Redis, redis_prefix: str
) -> None:
    a, b = node(redis, redis_prefix, "a"), node(redis, redis_prefix, "b")
    await a.claim_new("s1", {})
    await redis.delete(f"{redis_prefix}lease:s1")
    assert await b.claim_orphans() == []  # first look
    assert await a.renew() == []  # the owner renews before the second look
    assert await b.claim_orphans() == []
    assert await redis.get(f"{redis_prefix}lease:s1") == b"a"


async def test_a_released_session_is_adopted_at_once_and_an_ended_one_never(
    redis: Redis, redis_prefix: str
) -> None:
    a, b = node(redis, redis_prefix, "a"), node(redis, redis_prefix, "b")
    await a.claim_new("kept", {})
    await a.claim_new("ended", {"svc": 1})
    await a.release("ended", ended=True, services=["svc"])
    await a.release_all()  # a keeping shutdown
    assert await b.claim_orphans(at_once=True) == ["kept"]
    assert await b.known({"kept", "ended"}) == {"kept"}
    assert await redis.scard(f"{redis_prefix}load:svc") == 0


async def test_an_instance_full_across_processes_refuses_a_new_session(
    redis: Redis, redis_prefix: str
) -> None:
    a, b = node(redis, redis_prefix, "a"), node(redis, redis_prefix, "b")
    await a.claim_new("s1", {"one": 1, "many": None})
    with pytest.raises(NoCapacity, match="one"):
        await b.claim_new("s2", {"many": None, "one": 1})
    assert await b.known({"s2"}) == set()  # all or nothing: no lease, no place on "many"
    assert await redis.smembers(f"{redis_prefix}load:many") == {b"s1"}
    await a.release("s1", ended=True, services=["one", "many"])
    await b.claim_new("s2", {"one": 1})


async def test_the_cluster_runs_at_most_max_live_sessions(redis: Redis, redis_prefix: str) -> None:
    a, b = node(redis, redis_prefix, "a"), node(redis, redis_prefix, "b")
    await a.claim_new("s1", {}, max_live=2)
    await b.claim_new("s2", {}, max_live=2)
    with pytest.raises(AtCapacity):
        await a.claim_new("s3", {}, max_live=2)


async def test_redis_down_is_a_bounded_store_error(
    redis: Redis, redis_prefix: str, redis_server: RedisUnderTest
) -> None:
    a = node(redis, redis_prefix, "a")
    await a.claim_new("s1", {})
    redis_server.pause()  # hung: accepts, never answers
    try:
        with pytest.raises(StoreUnavailable):
            await a.renew()
        with pytest.raises(StoreUnavailable):
            await a.claim_new("s2", {})
    finally:
        redis_server.resume()
