"""`agent:NAME` in required_services (issue 11, part 1): a livekit-agents worker dispatched
through LiveKit's AgentDispatchService and recognised in webhooks by its kind and job
attributes, with the same slot, readiness, failover, timeout, removal and deletion as an HTTP
microservice. Driven through the supervisor with the fakes of session_harness; the same over a
real LiveKit and a real worker: tests/e2e/test_agents.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from session_manager.commands import (
    AddSessionService,
    DeleteSession,
    LiveKitEvent,
    RemoveSessionService,
)
from session_manager.errors import (
    InvalidRequest,
    LiveKitUnavailable,
    MicroserviceUnavailable,
    Timeout,
)
from session_manager.livekit.webhooks import (
    ROLE_ATTRIBUTE,
    ROLE_SERVICE,
    SESSION_ATTRIBUTE,
    RoomEvent,
)
from session_manager.session.actor import JOIN_TIMEOUT_MESSAGE
from session_manager.session.states import TABLE, SessionStatus
from tests.unit.conftest import HarnessFactory
from tests.unit.session_harness import Harness, agent_present

S = SessionStatus


@pytest.fixture
async def harness(make_harness: HarnessFactory) -> Harness:
    return await make_harness()


def slot_of(view: dict[str, object], requirement: str) -> dict[str, object]:
    services = view["services"]
    assert isinstance(services, list)
    (slot,) = (s for s in services if s["requirement"] == requirement)
    assert isinstance(slot, dict)
    return slot


async def test_agent_is_dispatched_with_the_session_and_turns_it_ready(harness: Harness) -> None:
    created = await harness.create(
        required_services=["agent:pong"],
        metadata={"language": "fr", "api_token": "hidden"},
        user_name="Ann",
    )
    assert created.status == "WaitingForServices"
    [(dispatch_id, (room, name, metadata))] = harness.gateway.dispatches.items()
    assert (room, name) == (created.room_name, "pong")
    assert json.loads(metadata) == {
        "session_id": created.session_id,
        "room_name": created.room_name,
        "session_metadata": {"language": "fr"},  # the credential is left out
        "user_identity": "user123",
        "user_name": "Ann",
    }
    view = await harness.view(created.session_id)
    slot = slot_of(view, "agent:pong")
    assert slot["state"] == "dispatched" and slot["dispatch_id"] == dispatch_id, slot
    assert harness.microservices.requests == []  # no join-room for an agent

    harness.agent(created, "pong")
    view = await harness.until(created.session_id, S.READY)
    slot = slot_of(view, "agent:pong")
    assert slot["state"] == "joined" and slot["joined_at"] is not None, slot
    joined = harness.events.since(0, types=["MicroserviceJoined"]).events
    assert [e.data["requirement"] for e in joined] == ["agent:pong"]


async def test_only_that_agent_fills_the_slot(harness: Harness) -> None:
    created = await harness.create(required_services=["agent:pong"])
    # Another agent name, and one of our own services (kind AGENT too, with our attribute).
    harness.agent(created, "other")
    harness.supervisor.tell(
        LiveKitEvent(
            RoomEvent(
                "participant_joined",
                created.room_name,
                identity="agent:pong",
                participant_sid="PA_x",
                role=ROLE_SERVICE,
                attributes={
                    ROLE_ATTRIBUTE: ROLE_SERVICE,
                    SESSION_ATTRIBUTE: created.session_id,
                    "lk.agent.name": "pong",
                },
                participant_kind="AGENT",
            )
        )
    )
    await harness.inbox_handled(created.session_id)
    view = await harness.view(created.session_id)
    assert view["status"] == "WaitingForServices"
    assert slot_of(view, "agent:pong")["state"] == "dispatched"


async def test_mixed_with_http_services(harness: Harness) -> None:
    harness.registry.register("asr", "http://asr", {"type": "ASR"})
    harness.registry.register("tts", "http://tts", {"type": "TTS"})
    created = await harness.create(required_services=["asr", "agent:pong", "type:TTS"])
    view = await harness.view(created.session_id)
    assert {s["requirement"] for s in view["services"]} == {"asr", "type:TTS", "agent:pong"}
    harness.joined(created, "asr")
    harness.joined(created, "tts")
    await harness.inbox_handled(created.session_id)
    assert (await harness.view(created.session_id))["status"] == "WaitingForServices"
    harness.agent(created, "pong")
    await harness.until(created.session_id, S.READY)


async def test_an_agent_that_leaves_is_dispatched_again(make_harness: HarnessFactory) -> None:
    harness = await make_harness(max_redispatch=1)
    created = await harness.create(required_services=["agent:pong"])
    harness.agent(created, "pong", sid="PA_1")
    harness.joined(created, "user123", "client")
    await harness.until(created.session_id, S.ACTIVE)

    harness.agent(created, "pong", sid="PA_1", joined=False)
    view = await harness.until(created.session_id, S.WAITING_FOR_SERVICES)
    slot = slot_of(view, "agent:pong")
    assert slot["redispatches"] == 1 and slot["state"] in ("pending", "dispatched"), slot
    await harness.eventually(lambda: len(harness.gateway.dispatches) == 2, "a second dispatch")
    await harness.eventually(
        lambda: harness.gateway.deleted_dispatches == ["AD_1"], "the old dispatch deleted"
    )
    harness.agent(created, "pong", sid="PA_1", joined=False)  # late, about the old one: ignored
    harness.agent(created, "pong", sid="PA_2")
    view = await harness.until(created.session_id, S.ACTIVE)
    assert slot_of(view, "agent:pong")["dispatch_id"] == "AD_2"

    harness.agent(created, "pong", sid="PA_2", joined=False)  # max_redispatch reached
    view = await harness.until(created.session_id, S.TERMINATED)
    assert view["reason"] == (
        "microservice agent:pong could not join: left the room (gave up after 1 redispatches)"
    )


async def test_a_dispatch_livekit_refuses_is_retried_then_ends(
    make_harness: HarnessFactory,
) -> None:
    harness = await make_harness(max_redispatch=1)
    harness.gateway.fail_dispatch = LiveKitUnavailable("LiveKit CreateDispatch timed out")
    with pytest.raises(MicroserviceUnavailable) as caught:
        await harness.create(required_services=["agent:pong"])
    assert caught.value.message == (
        "microservice agent:pong could not join: LiveKit CreateDispatch timed out"
        " (gave up after 1 redispatches)"
    )
    failed = harness.events.since(0, types=["MicroserviceDispatchFailed"]).events
    assert len(failed) == 2


@pytest.mark.looptime
async def test_no_worker_ends_at_the_join_timeout_saying_so(harness: Harness) -> None:
    created = await harness.create(required_services=["agent:nobody"])
    await asyncio.sleep(6)  # virtual clock: join_timeout (5 s) runs out
    view = await harness.until(created.session_id, S.TERMINATED)
    assert view["reason"] == f"{JOIN_TIMEOUT_MESSAGE}: no agent worker nobody joined"
    assert harness.gateway.deleted_dispatches == ["AD_1"]


@pytest.mark.looptime
async def test_waiting_creator_gets_the_timeout(harness: Harness) -> None:
    with pytest.raises(Timeout) as caught:
        await harness.create(
            required_services=["agent:nobody"], wait_until_ready=True, wait_timeout=3
        )
    assert caught.value.message == JOIN_TIMEOUT_MESSAGE


async def test_delete_and_removal_withdraw_the_dispatch(harness: Harness) -> None:
    harness.registry.register("asr", "http://asr", {"type": "ASR"})
    created = await harness.create(required_services=["asr", "agent:pong"])
    harness.joined(created, "asr")
    harness.agent(created, "pong")
    await harness.until(created.session_id, S.READY)
    view = await harness.ask(lambda r: RemoveSessionService(created.session_id, "agent:pong", r))
    assert [s["requirement"] for s in view["services"]] == ["asr"]
    await harness.eventually(lambda: harness.gateway.deleted_dispatches == ["AD_1"], "deleted")

    view = await harness.ask(lambda r: AddSessionService(created.session_id, "agent:pong", r))
    assert view["status"] == "WaitingForServices"
    await harness.eventually(lambda: len(harness.gateway.dispatches) == 2, "dispatched again")
    harness.agent(created, "pong", sid="PA_again")
    await harness.until(created.session_id, S.READY)
    ended = await harness.ask(lambda r: DeleteSession(created.session_id, r))
    assert ended["status"] == "Terminated"
    assert harness.gateway.deleted_dispatches == ["AD_1", "AD_2"]


async def test_an_agent_needs_a_name(harness: Harness) -> None:
    with pytest.raises(InvalidRequest):
        await harness.create(required_services=["agent:"])


async def test_a_restart_recognises_the_agent_in_the_room(make_harness: HarnessFactory) -> None:
    before = await make_harness(keep_sessions_at_shutdown=True)
    created = await before.create(required_services=["agent:pong"])
    before.agent(created, "pong", sid="PA_1")
    await before.until(created.session_id, S.READY)
    await before.supervisor.aclose(timeout=2)
    before.gateway.participants[created.room_name] = [
        agent_present(created.room_name, "pong", "PA_1")
    ]
    after = await make_harness(store=before.store, gateway=before.gateway, take_over=True)
    view = await after.view(created.session_id)
    assert view["status"] == "Ready"
    assert slot_of(view, "agent:pong")["state"] == "joined"
    assert len(after.gateway.dispatches) == 1  # nobody dispatched again
    # ... and it still counts as that agent when it leaves.
    after.agent(created, "pong", sid="PA_1", joined=False)
    await after.until(created.session_id, S.WAITING_FOR_SERVICES)


def test_the_agent_dispatch_result_has_its_rule() -> None:
    assert TABLE["AgentDispatchFinished"].handler == "_on_agent_dispatch_finished"
