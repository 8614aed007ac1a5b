"""Choosing instances, capacity, declines, failover, run-time changes and session time limits,
with LiveKit and the microservices replaced by in-memory fakes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from session_manager.commands import (
    AddSessionService,
    DeleteSession,
    ListSessions,
    RemoveSessionService,
)
from session_manager.dispatch import DispatchOutcome
from session_manager.errors import Conflict, NoCapacity, NotFound
from session_manager.livekit.webhooks import ROLE_CLIENT
from session_manager.session.states import SessionStatus
from tests.unit.conftest import HarnessFactory
from tests.unit.session_harness import Harness

S = SessionStatus
DECLINE = DispatchOutcome(False, 1, error="service declined join-room: HTTP 503", declined=True)
DOWN = DispatchOutcome(False, 2, error="join-room failed: ClientConnectorError")


async def register_pongs(harness: Harness, *ids: str, **metadata: Any) -> None:
    for service_id in ids:
        harness.registry.register(service_id, f"http://{service_id}", {"type": "PONG", **metadata})


def service_of(view: dict[str, Any], requirement: str = "type:PONG") -> dict[str, Any]:
    return next(s for s in view["services"] if s["requirement"] == requirement)


# choice and capacity -----------------------------------------------------------------------


async def test_type_requirement_spreads_a_burst_over_instances(harness: Harness) -> None:
    await register_pongs(harness, "pong-a", "pong-b", max_sessions=2)
    created = await asyncio.gather(
        *(harness.create(required_services=["type:PONG"]) for _ in range(4))
    )
    chosen = [r.service_identity for r in harness.microservices.requests]
    assert sorted(chosen) == ["pong-a", "pong-a", "pong-b", "pong-b"]
    assert len({c.session_id for c in created}) == 4


async def test_no_capacity_is_refused_and_creates_nothing(harness: Harness) -> None:
    await register_pongs(harness, "pong-a", max_sessions=1)
    await harness.create(required_services=["type:PONG"])
    rooms_before = set(harness.gateway.rooms)
    with pytest.raises(NoCapacity, match="No available microservice of type PONG"):
        await harness.create(required_services=["type:PONG"])
    with pytest.raises(NoCapacity, match="max_sessions"):
        await harness.create(required_services=["pong-a"])
    assert harness.gateway.rooms == rooms_before


async def test_capacity_comes_back_when_a_session_ends(harness: Harness) -> None:
    await register_pongs(harness, "pong-a", max_sessions=1)
    first = await harness.create(required_services=["type:PONG"])
    await harness.ask(lambda r: DeleteSession(first.session_id, r))
    # the supervisor reaps the actor, then the slot is free again
    await harness.eventually(
        lambda: not harness.registry.get("pong-a").sessions, "pong-a's slot given back"
    )
    second = await harness.create(required_services=["type:PONG"])
    assert second.session_id != first.session_id


async def test_unhealthy_and_draining_instances_are_not_chosen(harness: Harness) -> None:
    await register_pongs(harness, "pong-a", "pong-b", "pong-c")
    for _ in range(2):  # unhealthy_after=2 in the harness
        harness.registry.record_health("pong-a", "health check failed: refused")
    harness.registry.update("pong-b", draining=True)
    for _ in range(3):
        await harness.create(required_services=["type:PONG"])
    assert {r.service_identity for r in harness.microservices.requests} == {"pong-c"}
    view = harness.registry.get("pong-a").view()
    assert view["status"] == "Unhealthy" and "refused" in view["last_error"]

    default = await harness.create()  # no required_services: every available service
    assert harness.microservices.requests[-1].session_id == default.session_id
    assert harness.microservices.requests[-1].service_identity == "pong-c"


async def test_an_instance_is_healthy_again_after_good_checks(harness: Harness) -> None:
    await register_pongs(harness, "pong-a")
    for _ in range(2):
        harness.registry.record_health("pong-a", "timeout")
    assert harness.registry.record_health("pong-a", None) is None  # one good check is not enough
    change = harness.registry.record_health("pong-a", None)
    assert change is not None and change.new.value == "Healthy"


# declines and failover ---------------------------------------------------------------------


async def test_a_decline_goes_to_another_instance_at_once(harness: Harness) -> None:
    await register_pongs(harness, "pong-a", "pong-b")
    harness.microservices.outcomes["pong-a"] = DECLINE
    created = await harness.create(required_services=["type:PONG"])
    assert [r.service_identity for r in harness.microservices.requests] == ["pong-a", "pong-b"]
    view = await harness.view(created.session_id)
    slot = service_of(view)
    assert slot["service_id"] == "pong-b"
    assert slot["declined_by"] == ["pong-a"]
    assert slot["redispatches"] == 0  # a decline is an answer, not a failure
    assert harness.registry.get("pong-a").sessions == set()


async def test_every_instance_declining_ends_the_session(harness: Harness) -> None:
    await register_pongs(harness, "pong-a", "pong-b")
    harness.microservices.outcomes.update({"pong-a": DECLINE, "pong-b": DECLINE})
    with pytest.raises(NoCapacity, match="type:PONG could not join"):
        await harness.create(required_services=["type:PONG"])
    assert harness.gateway.rooms == set()


async def test_a_service_that_leaves_is_redispatched_same_instance_first(
    harness: Harness,
) -> None:
    await register_pongs(harness, "pong-a", "pong-b")
    created = await harness.create(required_services=["type:PONG"])
    first = harness.microservices.requests[0].service_identity
    other = "pong-b" if first == "pong-a" else "pong-a"
    harness.joined(created, first)
    harness.joined(created, "user123", ROLE_CLIENT)
    await harness.until(created.session_id, S.ACTIVE)

    harness.microservices.outcomes[first] = DOWN  # it is gone for good
    harness.left(created, first)
    view = await harness.until_view(
        created.session_id, lambda v: service_of(v)["service_id"] == other
    )
    # The same instance got one more chance before the other one was asked.
    dispatched = [r.service_identity for r in harness.microservices.requests]
    assert dispatched == [first, first, other]
    harness.joined(created, other)
    view = await harness.until(created.session_id, S.ACTIVE)  # whole again, user still there
    slot = service_of(view)
    assert slot["service_id"] == other and slot["redispatches"] == 2
    assert harness.registry.get(other).sessions == {created.session_id}


async def test_redispatch_gives_up_after_max_redispatch(make_harness: HarnessFactory) -> None:
    harness = await make_harness(max_redispatch=1)
    await register_pongs(harness, "pong-a")
    created = await harness.create(required_services=["type:PONG"])
    harness.joined(created, "pong-a")
    await harness.until(created.session_id, S.READY)
    harness.left(created, "pong-a")
    await harness.until(created.session_id, S.WAITING_FOR_SERVICES)
    harness.joined(created, "pong-a")
    await harness.until(created.session_id, S.READY)
    harness.left(created, "pong-a")
    view = await harness.until(created.session_id, S.TERMINATED)
    assert "gave up after 1 redispatches" in view["reason"]
    assert created.room_name in harness.gateway.deleted


# sessions change while they run ------------------------------------------------------------


async def test_services_added_and_removed_at_run_time(harness: Harness) -> None:
    await register_pongs(harness, "pong-a", "pong-b")
    harness.registry.register("asr", "http://asr", {"type": "ASR"})
    created = await harness.create(required_services=[])
    view = await harness.ask(lambda r: AddSessionService(created.session_id, "type:PONG", r))
    assert view["status"] == "WaitingForServices"
    added = view["services"][0]["service_id"]
    with pytest.raises(Conflict, match="already part of this session"):
        await harness.ask(lambda r: AddSessionService(created.session_id, "type:PONG", r))
    harness.joined(created, added)
    await harness.until(created.session_id, S.READY)

    await harness.ask(lambda r: AddSessionService(created.session_id, "asr", r))
    view = await harness.ask(lambda r: RemoveSessionService(created.session_id, "asr", r))
    assert [s["service_id"] for s in view["services"]] == [added]
    assert view["status"] == "Ready"  # what is left has all joined
    await harness.eventually(
        lambda: ("http://asr", created.session_id) in harness.microservices.left,
        "leave-room sent to the removed asr",
    )
    with pytest.raises(NotFound):
        await harness.ask(lambda r: RemoveSessionService(created.session_id, "asr", r))


async def test_delete_sends_services_away_and_is_idempotent(harness: Harness) -> None:
    await register_pongs(harness, "pong-a")
    created = await harness.create(required_services=["pong-a"])
    harness.joined(created, "pong-a")
    await harness.until(created.session_id, S.READY)
    view = await harness.ask(lambda r: DeleteSession(created.session_id, r))
    assert view["status"] == "Terminated" and view["reason"] == "terminated by request"
    assert harness.microservices.left == [("http://pong-a", created.session_id)]
    assert created.room_name in harness.gateway.deleted
    again = await harness.ask(lambda r: DeleteSession(created.session_id, r))
    assert again["status"] == "Terminated"
    with pytest.raises(NotFound):
        await harness.ask(lambda r: DeleteSession("no-such-session", r))


# The session timers run on the event loop's clock (`loop.call_later`): the tests below run on
# looptime's virtual clock, which moves on only when nothing else in the loop can run. Every
# message already sent has been handled before a timer fires, and a test's `sleep(n)` returns
# exactly n seconds of that clock later, with every timer due by then fired and handled.


@pytest.mark.looptime
async def test_duration_limit_ends_the_session_when_it_runs_out(harness: Harness) -> None:
    clock = asyncio.get_running_loop()
    started = clock.time()
    created = await harness.create(required_services=[], metadata={"duration_limit": 600})
    harness.joined(created, "user123", ROLE_CLIENT)  # or client_join_timeout (300 s) ends it
    await harness.until(created.session_id, S.ACTIVE)
    await asyncio.sleep(599 - (clock.time() - started))
    assert (await harness.view(created.session_id))["status"] == "Active"  # not a moment early

    view = await harness.until(created.session_id, S.TERMINATED)
    assert clock.time() - started >= 600
    assert view["reason"] == "duration limit of 600 s reached"
    assert harness.gateway.rooms == set()


@pytest.mark.looptime
async def test_client_that_never_joins_ends_the_session(make_harness: HarnessFactory) -> None:
    harness = await make_harness(client_join_timeout=300)
    clock = asyncio.get_running_loop()
    started = clock.time()
    created = await harness.create(required_services=[])
    await asyncio.sleep(299)
    assert (await harness.view(created.session_id))["status"] == "Ready"

    view = await harness.until(created.session_id, S.TERMINATED)
    assert clock.time() - started >= 300
    assert view["reason"] == "client did not join within 300 s"


@pytest.mark.looptime
async def test_client_who_comes_back_in_time_keeps_the_session(
    make_harness: HarnessFactory,
) -> None:
    harness = await make_harness(client_reconnect_grace=60)
    clock = asyncio.get_running_loop()
    created = await harness.create(required_services=[])
    harness.joined(created, "user123", ROLE_CLIENT)
    await harness.until(created.session_id, S.ACTIVE)

    harness.left(created, "user123", ROLE_CLIENT)
    await harness.inbox_handled(created.session_id)
    left = clock.time()  # the grace timer runs from here
    await asyncio.sleep(30)
    harness.joined(created, "user123", ROLE_CLIENT)
    await harness.inbox_handled(created.session_id)
    await asyncio.sleep(60)  # well past the first grace period
    assert clock.time() - left > 60
    view = await harness.view(created.session_id)
    assert view["status"] == "Active" and view["client"]["joined"] is True

    harness.left(created, "user123", ROLE_CLIENT)
    await harness.inbox_handled(created.session_id)
    left = clock.time()
    await asyncio.sleep(59)
    assert (await harness.view(created.session_id))["status"] == "Active"  # grace not over
    view = await harness.until(created.session_id, S.TERMINATED)
    assert clock.time() - left >= 60
    assert view["reason"] == "client left and did not return within 60 s"


# idempotency and listing -------------------------------------------------------------------


async def test_same_idempotency_key_gives_the_same_session(harness: Harness) -> None:
    results = await asyncio.gather(
        *(
            harness.create(idempotency_key="k1", body_hash="h1", required_services=[])
            for _ in range(3)
        )
    )
    assert len({r.session_id for r in results}) == 1
    assert len(harness.gateway.rooms) == 1
    later = await harness.create(idempotency_key="k1", body_hash="h1", required_services=[])
    assert later == results[0]
    with pytest.raises(Conflict, match="different request body"):
        await harness.create(idempotency_key="k1", body_hash="h2", required_services=[])


async def test_listing_is_newest_first_and_filters(harness: Harness) -> None:
    made = []
    for user in ("ann", "bob", "ann"):
        made.append(await harness.create(user_identity=user, required_services=[]))
        await asyncio.sleep(0.002)  # distinct creation times
    await harness.ask(lambda r: DeleteSession(made[0].session_id, r))

    everything = await harness.ask(lambda r: ListSessions(None, None, 10, None, r))
    assert [v["session_id"] for v in everything] == [m.session_id for m in reversed(made)]
    anns = await harness.ask(lambda r: ListSessions(None, "ann", 10, None, r))
    assert [v["session_id"] for v in anns] == [made[2].session_id, made[0].session_id]
    ended = await harness.ask(lambda r: ListSessions("Terminated", None, 10, None, r))
    assert [v["session_id"] for v in ended] == [made[0].session_id]


async def test_an_unhealthy_instance_is_replaced_at_once(harness: Harness) -> None:
    await register_pongs(harness, "pong-a", "pong-b")
    created = await harness.create(required_services=["type:PONG"])
    first = harness.microservices.requests[0].service_identity
    other = "pong-b" if first == "pong-a" else "pong-a"
    harness.joined(created, first)
    await harness.until(created.session_id, S.READY)
    for _ in range(2):  # unhealthy_after=2 in the harness
        harness.supervisor.health_checked([(first, "health check timed out")])
    view = await harness.until_view(
        created.session_id, lambda v: service_of(v)["service_id"] == other
    )
    assert view["status"] == "WaitingForServices"
    await harness.eventually(
        lambda: (f"http://{first}", created.session_id) in harness.microservices.left,
        f"leave-room sent to the unhealthy {first}",
    )


async def test_an_unhealthy_instance_with_no_stand_in_is_kept(harness: Harness) -> None:
    await register_pongs(harness, "pong-a")
    created = await harness.create(required_services=["type:PONG"])
    harness.joined(created, "pong-a")
    await harness.until(created.session_id, S.READY)
    for _ in range(2):
        harness.supervisor.health_checked([("pong-a", "health check timed out")])
    # The supervisor told the session that pong-a was lost before this goes through its inbox.
    await harness.inbox_handled(created.session_id)
    assert harness.registry.get("pong-a").status.value == "Unhealthy"
    view = await harness.view(created.session_id)
    assert view["status"] == "Ready"
    slot = service_of(view)
    assert (slot["service_id"], slot["state"], slot["redispatches"]) == ("pong-a", "joined", 0)
    assert len(harness.microservices.requests) == 1  # nobody else was dispatched
    assert harness.microservices.left == []  # and pong-a was not sent away
    assert harness.registry.get("pong-a").sessions == {created.session_id}


async def test_a_full_instance_may_take_its_own_session_back(harness: Harness) -> None:
    await register_pongs(harness, "pong-a", max_sessions=1)
    created = await harness.create(required_services=["type:PONG"])
    harness.joined(created, "pong-a")
    await harness.until(created.session_id, S.READY)
    harness.left(created, "pong-a")
    view = await harness.until(created.session_id, S.WAITING_FOR_SERVICES)
    assert service_of(view)["service_id"] == "pong-a"  # its one slot is this session's
    assert len(harness.microservices.requests) == 2


@pytest.mark.looptime
async def test_a_caller_may_wait_longer_than_join_timeout(make_harness: HarnessFactory) -> None:
    harness = await make_harness(join_timeout=10)
    await register_pongs(harness, "pong-a")

    async def join_later() -> None:
        await asyncio.sleep(30)  # on the virtual clock: join_timeout has long run out
        [request] = harness.microservices.requests
        harness.webhook(
            "participant_joined", request.room_name, "pong-a", "service", request.session_id
        )

    joiner = asyncio.create_task(join_later())
    created = await harness.create(
        required_services=["type:PONG"], wait_until_ready=True, wait_timeout=60
    )
    await joiner
    assert created.status == "Ready"
    view = await harness.view(created.session_id)
    assert view["status"] == "Ready" and service_of(view)["state"] == "joined"
