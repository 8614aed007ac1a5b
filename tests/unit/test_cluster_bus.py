"""The cluster bus on a real redis-server: a command reaches the process that owns the session
and its answer comes back, errors keep their class, and a bus whose loop dies answers its
waiters at once and has the process exit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from redis.asyncio import Redis

from session_manager.cluster.bus import ClusterBus, SessionCommand
from session_manager.commands import Access
from session_manager.errors import Conflict, Unhealthy
from tests.conftest import RedisUnderTest
from tests.polling import eventually


@pytest.fixture
async def redis(redis_server: RedisUnderTest) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url, socket_timeout=2, socket_connect_timeout=1)
    yield client
    await client.aclose()


async def member(redis: Redis, prefix: str, node_id: str, **options: Any) -> ClusterBus:
    bus = ClusterBus(
        redis,
        prefix=prefix,
        node_id=node_id,
        timeout=1.0,
        resend_every=0.2,
        give_up_after=1.0,
        **options,
    )
    await bus.start(2.0)
    return bus


async def test_the_owner_answers_and_errors_keep_their_class(
    redis: Redis, redis_prefix: str
) -> None:
    asker, owner = await member(redis, redis_prefix, "a"), await member(redis, redis_prefix, "b")
    try:

        def run(command: SessionCommand) -> asyncio.Future[dict[str, Any]] | None:
            if command.session_id == "nobody's":
                return None
            answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            if command.op == "delete":
                answer.set_result({"session_id": command.session_id, "by": "b"})
            else:
                answer.set_exception(Conflict(f"{command.argument} is already part of it"))
            return answer

        owner.run_command = run
        deleted = await asyncio.wait_for(
            asker.ask_owner(SessionCommand("delete", "s1", None, Access())), 5
        )
        assert deleted == {"session_id": "s1", "by": "b"}
        with pytest.raises(Conflict, match="asr is already part of it"):
            await asker.ask_owner(SessionCommand("add_service", "s1", "asr", Access()))
        with pytest.raises(Unhealthy, match="did not answer"):
            await asker.ask_owner(SessionCommand("delete", "nobody's", None, Access()))
    finally:
        await asker.aclose()
        await owner.aclose()


async def test_a_bus_whose_loop_dies_answers_its_waiters_and_is_fatal(
    redis: Redis, redis_prefix: str
) -> None:
    fatal: list[str] = []
    bus = await member(redis, redis_prefix, "a", on_fatal=fatal.append)
    bus._give_up_after = 30.0  # the waiter must be answered by the death, not by giving up
    try:
        waiting = asyncio.ensure_future(
            bus.ask_owner(SessionCommand("delete", "s1", None, Access()))
        )

        def broken(data: Any) -> None:
            raise RuntimeError("a bug in handling a message")

        bus._received = broken  # type: ignore[method-assign]
        with pytest.raises(Unhealthy, match="cluster bus stopped"):
            await asyncio.wait_for(waiting, 5)
        await eventually(lambda: bool(fatal))
        assert fatal == ["cluster bus loop ended: RuntimeError"]
    finally:
        await bus.aclose()


async def test_presence_seen_and_lost_reach_the_other_processes(
    redis: Redis, redis_prefix: str
) -> None:
    """A stream seen on one process cancels the others' grace; a verdict reaches them all (with
    the moment the connection went), and never comes back to the process that sent it."""
    a, b = await member(redis, redis_prefix, "a"), await member(redis, redis_prefix, "b")
    heard: list[tuple[Any, ...]] = []

    def listen(bus: ClusterBus, name: str) -> None:
        def seen(service_id: str) -> None:
            heard.append((name, "seen", service_id))

        def lost(service_id: str, gone_at: datetime) -> None:
            heard.append((name, "lost", service_id, gone_at))

        bus.presence_seen, bus.presence_lost = seen, lost

    listen(a, "a")
    listen(b, "b")
    try:
        gone_at = datetime(2026, 1, 1, 12, 0, 0, 123000, tzinfo=UTC)
        a.share_presence("seen", "pong-a", None)
        a.share_presence("lost", "pong-b", gone_at)
        await eventually(lambda: len(heard) == 2)
        # Sent by two tasks: they may arrive in either order.
        assert set(heard) == {("b", "seen", "pong-a"), ("b", "lost", "pong-b", gone_at)}
    finally:
        await a.aclose()
        await b.aclose()
