"""Warm pools: the keeper's book, the setting's bounds, and a supervisor over in-memory fakes
keeping pools filled, handing members out, refilling, expiring and replacing them."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from session_manager.commands import ListSessions
from session_manager.config import SettingsError, load_settings
from session_manager.dispatch import DispatchOutcome
from session_manager.errors import AtCapacity
from session_manager.events import EventType
from session_manager.livekit.webhooks import ROLE_CLIENT, ROLE_SERVICE
from session_manager.pools import FILL_BACKOFF, WarmPools, WarmPoolSetting
from session_manager.session.states import SessionStatus
from tests.unit.conftest import HarnessFactory
from tests.unit.session_harness import Harness

S = SessionStatus
ASR_TTS = WarmPoolSetting(services=["type:ASR", "type:TTS"], size=2, max_idle=600)
POOL = "type:ASR+type:TTS"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# the keeper's book -------------------------------------------------------------------------


def test_a_create_matches_a_pool_by_its_requirements_in_any_order() -> None:
    pools = WarmPools([ASR_TTS])
    assert pools.match(["type:TTS", "type:ASR"], None) is pools.pools[POOL]
    assert pools.match(["type:ASR", "type:TTS"], None) is pools.pools[POOL]
    # not the same multiset, a room name of its own, or the default services: no pool
    assert pools.match(["type:ASR"], None) is None
    assert pools.match(["type:ASR", "type:TTS", "type:TTS"], None) is None
    assert pools.match(["type:ASR", "type:TTS", "pong-1"], None) is None
    assert pools.match(["type:ASR", "type:TTS"], "my-room") is None
    assert pools.match(None, None) is None


def test_take_hands_out_the_oldest_usable_member_and_counts_hits_and_misses() -> None:
    clock = Clock()
    pools = WarmPools([ASR_TTS], clock)
    pool = pools.pools[POOL]
    for session_id in ("old", "new"):
        pools.added(pool, session_id)
        clock.now += 1
    assert pools.take(pool, lambda sid: sid == "new") == "new"  # "old" is not Ready
    assert pools.take(pool, lambda sid: False) is None
    assert (pool.hits, pool.misses, list(pool.members)) == (1, 1, ["old"])
    # one place free: one fill due, within the capacity left
    assert pools.fills_due(room=5) == [pool]
    assert pools.fills_due(room=0) == []


def test_members_expire_after_max_idle_and_their_end_is_no_failure() -> None:
    clock = Clock()
    pools = WarmPools([WarmPoolSetting(services=["type:ASR"], size=1, max_idle=10)], clock)
    pool = pools.pools["type:ASR"]
    pools.added(pool, "m1")
    clock.now += 9.9
    assert pools.expired() == []
    clock.now += 0.1
    assert pools.expired() == ["m1"]
    assert pool.members == {} and pool.expiries == 1
    assert pools.ended("m1", was_ready=True) == (pool, "expired")
    assert pools.fills_due(room=5) == [pool]  # replaced at once


def test_a_fill_that_fails_backs_off_doubling_and_a_ready_member_resets_it() -> None:
    clock = Clock()
    pools = WarmPools([WarmPoolSetting(services=["type:ASR"], size=1)], clock)
    pool = pools.pools["type:ASR"]
    waits = []
    for attempt in range(4):
        pools.added(pool, f"m{attempt}")
        assert pools.ended(f"m{attempt}", was_ready=False) == (pool, "failed")
        assert pools.fills_due(room=5) == []  # no tight loop
        waits.append(pools.retry_in(pool))
        clock.now += waits[-1]
        assert pools.fills_due(room=5) == [pool]
    assert waits == [FILL_BACKOFF, 2 * FILL_BACKOFF, 4 * FILL_BACKOFF, 8 * FILL_BACKOFF]
    pools.added(pool, "ok")
    pools.filled(pool)
    assert pool.failures == 0 and pools.retry_in(pool) == 0


# the setting ----------------------------------------------------------------------------------


def test_warm_pools_from_toml_and_from_json_in_the_environment(tmp_path: Any) -> None:
    config = tmp_path / "manager.toml"
    config.write_text(
        '[[warm_pools]]\nservices = ["type:ASR", "type:TTS"]\nsize = 5\nmax_idle = 600\n'
    )
    from_file = load_settings(config_file=config, environ={})
    assert from_file.warm_pools == [
        WarmPoolSetting(services=["type:ASR", "type:TTS"], size=5, max_idle=600)
    ]
    env = {"SESSION_MANAGER_WARM_POOLS": '[{"services": ["pong-1"], "size": 2}]'}
    from_env = load_settings(config_file=config, environ=env)
    assert from_env.warm_pools == [WarmPoolSetting(services=["pong-1"], size=2)]
    assert from_env.warm_pools[0].max_idle == 600


@pytest.mark.parametrize(
    ("pools", "says"),
    [
        ('[{"services": ["agent:helper"], "size": 1}]', "agent slots cannot be pooled"),
        ('[{"services": ["type:ASR"], "size": 51}]', "less than or equal to 50"),
        ('[{"services": ["type:ASR"], "size": 0}]', "greater than or equal to 1"),
        ('[{"services": ["type:ASR"], "size": 1, "max_idle": 0.5}]', "greater than or equal"),
        ('[{"services": ["type:ASR"], "size": 1, "max_idle": 90000}]', "less than or equal"),
        ('[{"services": [], "size": 1}]', "at least 1 item"),
        ('[{"services": ["type:ASR", "type:ASR"], "size": 1}]', "listed twice"),
        ('[{"services": ["a b"], "size": 1}]', "not a service id"),
        ('[{"services": ["a"], "size": 1, "colour": "red"}]', "colour (from environment"),
        ('[{"services": ["a", "b"], "size": 1}, {"services": ["b", "a"], "size": 2}]', "two pools"),
        (
            "[" + ",".join(f'{{"services": ["s{i}"], "size": 50}}' for i in range(5)) + "]",
            "more than 200",
        ),
        ("not json", "JSON list"),
    ],
)
def test_warm_pools_out_of_bounds_stop_the_start(pools: str, says: str) -> None:
    with pytest.raises(SettingsError, match="warm_pools") as raised:
        load_settings(environ={"SESSION_MANAGER_WARM_POOLS": pools}, config_file=None)
    assert says in str(raised.value)


def test_warm_pools_are_refused_with_several_managers_on_redis() -> None:
    environ = {
        "SESSION_MANAGER_STORE": "redis",
        "LIVEKIT_URL": "http://127.0.0.1:7880",
        "LIVEKIT_API_KEY": "key",
        "LIVEKIT_API_SECRET": "a-secret-of-some-length",
        "SESSION_MANAGER_WARM_POOLS": '[{"services": ["type:ASR"], "size": 1}]',
    }
    with pytest.raises(SettingsError, match="warm_pools: not available with store = redis"):
        load_settings(environ=environ, config_file=None)


# a supervisor keeping pools ----------------------------------------------------------------


def register(harness: Harness, *services: tuple[str, str]) -> None:
    for service_id, service_type in services:
        harness.registry.register(service_id, f"http://{service_id}", {"type": service_type})


def pool_of(harness: Harness, name: str = POOL) -> dict[str, Any]:
    return next(p for p in harness.supervisor.pool_views() if p["name"] == name)


async def join_members(harness: Harness, name: str = POOL, *, ready: int) -> list[str]:
    """Have LiveKit report every member's services in its room (as each join-room went out),
    until `ready` members of the pool are Ready; their session ids."""
    joined: set[tuple[str, str]] = set()
    for _ in range(300):
        pool = pool_of(harness, name)
        members = {m["session_id"] for m in pool["members"]}
        for request in harness.microservices.requests:
            key = (request.session_id, request.service_identity)
            if request.session_id in members and key not in joined:
                joined.add(key)
                harness.webhook(
                    "participant_joined",
                    request.room_name,
                    request.service_identity,
                    ROLE_SERVICE,
                    request.session_id,
                )
        ready_ids = [m["session_id"] for m in pool["members"] if m["status"] == "Ready"]
        if pool["ready"] >= ready:
            return ready_ids
        await asyncio.sleep(0.01)
    raise AssertionError(f"pool never had {ready} members Ready: {pool_of(harness, name)}")


def events_of(harness: Harness, kind: EventType) -> list[dict[str, Any]]:
    events = harness.events.since(0, types=[kind.value]).events
    return [{"session_id": e.session_id, **e.data} for e in events]


async def pooled_harness(make: HarnessFactory, *settings: WarmPoolSetting, **more: Any) -> Harness:
    harness = await make(warm_pools=list(settings) or [ASR_TTS], **more)
    register(harness, ("asr-1", "ASR"), ("asr-2", "ASR"), ("tts-1", "TTS"), ("tts-2", "TTS"))
    return harness


async def test_a_pool_fills_to_its_size_with_no_users_sessions_shown(
    make_harness: HarnessFactory,
) -> None:
    harness = await pooled_harness(make_harness)
    members = await join_members(harness, ready=2)
    assert len(members) == 2
    # each member's services were asked to join its room, flagged as pooled, with no user
    pooled = [r for r in harness.microservices.requests if r.session_id in members]
    assert {(r.pooled, r.user_identity, r.session_metadata.get("x")) for r in pooled} == {
        (True, "", None)
    }
    assert {f"room-{sid}" for sid in members} <= harness.gateway.rooms
    # members are no user's sessions: neither listed nor announced as sessions
    listed = await harness.ask(lambda r: ListSessions(None, None, 50, None, r))
    assert listed == []
    assert events_of(harness, EventType.SESSION_CREATED) == []
    assert len(events_of(harness, EventType.POOL_REFILL)) == 2


async def test_a_hit_is_ready_at_once_in_the_members_room_and_the_pool_refills(
    make_harness: HarnessFactory,
) -> None:
    harness = await pooled_harness(make_harness)
    members = await join_members(harness, ready=2)
    rooms_before = set(harness.gateway.rooms)
    created = await harness.create(
        user_identity="alice",
        user_name="Alice",
        metadata={"lang": "fr"},
        required_services=["type:TTS", "type:ASR"],
    )
    assert created.status == "Ready"
    assert created.session_id == members[0]  # the oldest member
    assert created.room_name == f"room-{created.session_id}"
    assert created.access_token.startswith(f"token:alice:{created.room_name}")
    view = await harness.view(created.session_id)
    assert (view["user_identity"], view["metadata"]) == ("alice", {"lang": "fr"})
    assert view["pool"] == POOL
    assert view["ready_ms"] is not None and view["ready_ms"] < 1000
    # its services learn whose session it is, and the room's metadata says so
    await harness.eventually(lambda: len(harness.microservices.started) == 2, "session-started")
    started = harness.microservices.started
    assert {(s.session_id, s.user_identity, s.user_name, s.pool) for s in started} == {
        (created.session_id, "alice", "Alice", POOL)
    }
    assert all(s.session_metadata == {"lang": "fr"} for s in started)
    await harness.eventually(
        lambda: '"user_identity":"alice"' in harness.gateway.metadata[created.room_name],
        "room metadata updated",
    )
    # a user's session now: stored, listed, announced; and the pool refills behind it
    listed = await harness.ask(lambda r: ListSessions(None, None, 50, None, r))
    assert [v["session_id"] for v in listed] == [created.session_id]
    assert [e["session_id"] for e in events_of(harness, EventType.SESSION_CREATED)] == [
        created.session_id
    ]
    assert events_of(harness, EventType.POOL_HIT) == [
        {"session_id": created.session_id, "pool": POOL}
    ]
    await harness.eventually(lambda: len(harness.gateway.rooms - rooms_before) == 1, "refill")
    await join_members(harness, ready=2)
    assert pool_of(harness)["hits"] == 1 and pool_of(harness)["refills"] == 3
    # the user joins: Active, as any session
    harness.joined(created, "alice", ROLE_CLIENT)
    await harness.until(created.session_id, S.ACTIVE)


async def test_a_miss_falls_back_to_dispatch_and_is_counted(make_harness: HarnessFactory) -> None:
    harness = await pooled_harness(make_harness)
    # no member is Ready yet (their services have not joined): a miss
    created = await harness.create(user_identity="bob", required_services=["type:ASR", "type:TTS"])
    assert created.status == "WaitingForServices"
    members = {m["session_id"] for m in pool_of(harness)["members"]}
    assert created.session_id not in members
    view = await harness.view(created.session_id)
    assert view["pool"] is None
    assert pool_of(harness)["misses"] == 1 and pool_of(harness)["hits"] == 0
    assert events_of(harness, EventType.POOL_MISS) == [{"session_id": None, "pool": POOL}]
    # requirements no pool has: neither a hit nor a miss
    await harness.create(user_identity="carol", required_services=["type:ASR"])
    assert pool_of(harness)["misses"] == 1


@pytest.mark.parametrize("how", ["left the room", "unhealthy"])
async def test_a_member_whose_service_dies_is_never_handed_out_and_is_replaced(
    make_harness: HarnessFactory, how: str
) -> None:
    setting = WarmPoolSetting(services=["type:ASR", "type:TTS"], size=1)
    harness = await pooled_harness(make_harness, setting)
    [member] = await join_members(harness, ready=1)
    asr = next(
        r.service_identity
        for r in harness.microservices.requests
        if r.session_id == member and r.service_identity.startswith("asr")
    )
    if how == "left the room":
        harness.webhook("participant_left", f"room-{member}", asr, ROLE_SERVICE, member)
    else:
        for _ in range(2):  # unhealthy_after=2 in the harness
            harness.supervisor.health_checked([(asr, "health check timed out")])
    # The create may come before the member has handled the news (it is in its inbox): the
    # member, no longer Ready when it is asked, then takes no user, and the create is
    # dispatched as usual.
    created = await harness.create(user_identity="dan", required_services=["type:ASR", "type:TTS"])
    assert created.session_id != member
    assert created.status == "WaitingForServices"  # dispatched, not the broken member
    assert pool_of(harness)["hits"] == 0 and events_of(harness, EventType.POOL_HIT) == []
    await harness.eventually(lambda: f"room-{member}" in harness.gateway.deleted, "room deleted")
    await harness.eventually(
        lambda: bool(events_of(harness, EventType.POOL_MEMBER_ENDED)), "member ended"
    )
    ended = events_of(harness, EventType.POOL_MEMBER_ENDED)
    assert [(e["session_id"], e["why"]) for e in ended] == [(member, "lost")]
    [replacement] = await join_members(harness, ready=1)
    assert replacement != member


async def test_idle_members_expire_and_are_replaced_keeping_the_size(
    make_harness: HarnessFactory,
) -> None:
    setting = WarmPoolSetting(services=["type:ASR", "type:TTS"], size=2, max_idle=1)
    harness = await pooled_harness(make_harness, setting)
    first = set(await join_members(harness, ready=2))
    await harness.eventually(
        lambda: all(f"room-{sid}" in harness.gateway.deleted for sid in first), "expiry"
    )
    later = set(await join_members(harness, ready=2))
    assert not later & first
    pool = pool_of(harness)
    assert pool["expiries"] >= 2 and len(pool["members"]) == 2
    whys = {e["why"] for e in events_of(harness, EventType.POOL_MEMBER_ENDED)}
    assert whys == {"expired"}


async def test_members_count_toward_capacity_and_a_hit_needs_none_more(
    make_harness: HarnessFactory,
) -> None:
    harness = await pooled_harness(make_harness, max_live_sessions=2)
    await join_members(harness, ready=2)
    with pytest.raises(AtCapacity):
        await harness.create(user_identity="erin", required_services=["type:ASR"])
    created = await harness.create(user_identity="erin", required_services=["type:ASR", "type:TTS"])
    assert created.status == "Ready"
    await asyncio.sleep(0.1)
    # full: the pool cannot refill past max_live_sessions
    assert len(pool_of(harness)["members"]) == 1


async def test_a_member_that_fails_to_fill_is_retried_with_back_off(
    make_harness: HarnessFactory,
) -> None:
    setting = WarmPoolSetting(services=["type:ASR"], size=1)
    harness = await pooled_harness(make_harness, setting, max_redispatch=0)
    failed = DispatchOutcome(False, 1, error="join-room answered HTTP 500")
    harness.microservices.outcomes = {"asr-1": failed, "asr-2": failed}
    await harness.eventually(
        lambda: len(events_of(harness, EventType.POOL_MEMBER_ENDED)) >= 1, "a failed fill"
    )
    await asyncio.sleep(0.5)
    # the second try waits the back-off (1 s): no tight loop of rooms
    assert len(harness.gateway.deleted) == 1
    assert pool_of(harness, "type:ASR")["retry_in"] > 0
    assert {e["why"] for e in events_of(harness, EventType.POOL_MEMBER_ENDED)} == {"failed"}


async def test_members_end_at_shutdown_even_when_sessions_are_kept(
    make_harness: HarnessFactory,
) -> None:
    harness = await pooled_harness(make_harness, keep_sessions_at_shutdown=True)
    members = await join_members(harness, ready=2)
    created = await harness.create(user_identity="fay", required_services=["type:ASR", "type:TTS"])
    await harness.supervisor.aclose(timeout=2)
    kept = created.room_name
    assert kept in harness.gateway.rooms  # the user's session is kept for the next process
    unclaimed = [sid for sid in members if sid != created.session_id]
    refills = {e["session_id"] for e in events_of(harness, EventType.POOL_REFILL)} - set(members)
    for sid in [*unclaimed, *refills]:
        assert f"room-{sid}" in harness.gateway.deleted
