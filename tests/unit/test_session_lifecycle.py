"""The supervisor and the session actors, driven through their inboxes with LiveKit and the
microservices replaced by in-memory fakes (the real ones are in tests/integration)."""

from __future__ import annotations

import pytest

from session_manager.commands import ListSessions
from session_manager.dispatch import DispatchOutcome
from session_manager.errors import (
    LiveKitUnavailable,
    ManagerError,
    MicroserviceUnavailable,
    Timeout,
)
from session_manager.livekit.webhooks import (
    ROLE_CLIENT,
    ROLE_SERVICE,
)
from session_manager.session.deps import TOKEN_MARGIN
from session_manager.session.states import (
    TRANSITIONS,
    IllegalTransition,
    SessionStatus,
    check_transition,
)
from tests.unit.session_harness import Harness

S = SessionStatus


def test_the_state_table_only_ends_through_terminating() -> None:
    for status, targets in TRANSITIONS.items():
        if status is not S.TERMINATING:
            assert S.TERMINATED not in targets
    check_transition(S.CREATING, S.WAITING_FOR_SERVICES)
    with pytest.raises(IllegalTransition):
        check_transition(S.TERMINATED, S.READY)
    with pytest.raises(IllegalTransition):
        check_transition(S.CREATING, S.ACTIVE)


async def test_no_services_is_ready_at_once(harness: Harness) -> None:
    created = await harness.create(required_services=[])
    assert created.status == "Ready"
    assert created.room_name in harness.gateway.rooms
    assert created.access_token.startswith("token:user123:")


async def test_services_join_then_client_makes_it_active(harness: Harness) -> None:
    harness.registry.register("asr", "http://asr", {"type": "ASR"})
    harness.registry.register("tts", "http://tts", {"type": "TTS"})
    created = await harness.create(required_services=["asr", "tts"])
    assert created.status == "WaitingForServices"
    sid, room = created.session_id, created.room_name

    harness.webhook("participant_joined", room, "asr", ROLE_SERVICE, sid)
    harness.webhook("participant_joined", room, "user123", ROLE_CLIENT, sid)
    view = await harness.until_view(sid, lambda v: v["client"]["joined"])
    assert view["status"] == "WaitingForServices"  # tts still missing; the user waits with us
    assert [s["state"] for s in view["services"]] == ["joined", "dispatched"]

    harness.webhook("participant_joined", room, "tts", ROLE_SERVICE, sid)
    view = await harness.until(sid, S.ACTIVE)
    assert [s["state"] for s in view["services"]] == ["joined", "joined"]
    assert view["ready_at"] is not None and view["active_at"] is not None


async def test_a_participant_without_our_attributes_is_not_taken_for_a_service(
    harness: Harness,
) -> None:
    harness.registry.register("asr", "http://asr", {})
    created = await harness.create(required_services=["asr"])
    # Same identity, but not a token we minted for this session: no guessing from names.
    harness.webhook("participant_joined", created.room_name, "asr")
    harness.webhook("participant_joined", created.room_name, "asr", ROLE_SERVICE, "other-session")
    await harness.inbox_handled(created.session_id)  # both webhooks have been acted on
    view = await harness.view(created.session_id)
    assert view["status"] == "WaitingForServices"
    assert view["services"][0]["state"] == "dispatched"
    # The same identity with our attributes is the service: the check above could have failed.
    harness.joined(created, "asr")
    view = await harness.until(created.session_id, S.READY)
    assert view["services"][0]["state"] == "joined"


async def test_dispatch_failure_ends_the_session_and_deletes_the_room(harness: Harness) -> None:
    harness.registry.register("asr", "http://asr", {})
    harness.microservices.outcomes["asr"] = DispatchOutcome(False, 3, error="HTTP 500")
    with pytest.raises(MicroserviceUnavailable, match="asr could not join: HTTP 500"):
        await harness.create(required_services=["asr"])
    # One redispatch to the same instance; it has no type, so no other instance can stand in.
    request, again = harness.microservices.requests
    assert again.session_id == request.session_id
    view = await harness.view(request.session_id)
    assert view["status"] == "Terminated"
    assert view["services"][0]["state"] == "failed"
    assert harness.gateway.deleted == [request.room_name]
    assert harness.gateway.rooms == set()


async def test_waiting_caller_gets_timeout_and_session_is_cleaned_up(harness: Harness) -> None:
    harness.registry.register("asr", "http://asr", {})
    with pytest.raises(Timeout, match="Timeout waiting for microservices to join"):
        await harness.create(required_services=["asr"], wait_until_ready=True, wait_timeout=0.1)
    [request] = harness.microservices.requests
    view = await harness.view(request.session_id)
    assert view["status"] == "Terminated"
    assert view["reason"] == "Timeout waiting for microservices to join"
    assert harness.gateway.rooms == set()


async def test_livekit_down_fails_the_create_and_terminates(harness: Harness) -> None:
    harness.gateway.fail_create = LiveKitUnavailable("LiveKit is unreachable")
    with pytest.raises(LiveKitUnavailable, match="LiveKit is unreachable"):
        await harness.create(required_services=[])
    [view] = await harness.ask(lambda r: ListSessions(None, None, 10, None, r))
    assert view["status"] == "Terminated"
    assert view["reason"] == "LiveKit room could not be created: LiveKit is unreachable"
    assert view["terminated_at"] is not None
    # The room is deleted all the same, in case LiveKit made it before the error came back.
    assert harness.gateway.deleted == [view["room_name"]]
    assert harness.gateway.rooms == set()
    [ended] = harness.events.since(0, types=["SessionTerminated"]).events
    assert ended.session_id == view["session_id"]
    assert ended.data == {"reason": view["reason"]}


async def test_a_crashing_actor_ends_its_session_and_the_rest_carry_on(harness: Harness) -> None:
    healthy = await harness.create(required_services=[])
    harness.gateway.fail_create = RuntimeError("boom")
    with pytest.raises(ManagerError, match="internal error: RuntimeError: boom") as failed:
        await harness.create(required_services=[])
    assert (failed.value.status, failed.value.code) == (500, "InternalError")
    harness.gateway.fail_create = None

    # The supervisor is still taking commands, the other session is untouched.
    again = await harness.create(required_services=[])
    assert again.status == "Ready"
    assert (await harness.view(healthy.session_id))["status"] == "Ready"


async def test_room_finished_terminates_with_reason(harness: Harness) -> None:
    created = await harness.create(required_services=[])
    harness.webhook("room_finished", created.room_name)
    view = await harness.until(created.session_id, S.TERMINATED)
    assert view["reason"] == "LiveKit room finished"


async def test_shutdown_sends_services_away_deletes_rooms_and_ends_sessions_with_a_reason(
    harness: Harness,
) -> None:
    harness.registry.register("asr", "http://asr", {"type": "ASR"})
    harness.registry.register("tts", "http://tts", {"type": "TTS"})
    no_services = await harness.create(required_services=[])
    joined = await harness.create(required_services=["asr"])
    harness.joined(joined, "asr")
    await harness.until(joined.session_id, S.READY)
    waiting = await harness.create(required_services=["tts"])  # dispatched, not in the room
    sessions = (no_services, joined, waiting)

    await harness.supervisor.aclose(timeout=2)

    assert harness.store is not None
    for created in sessions:
        stored = await harness.store.get_session(created.session_id)
        assert stored is not None
        assert stored["status"] == "Terminated", stored
        assert stored["reason"] == "manager shutting down"
        assert stored["terminated_at"] is not None
    assert sorted(harness.microservices.left) == sorted(
        [("http://asr", joined.session_id), ("http://tts", waiting.session_id)]
    )
    assert sorted(harness.gateway.deleted) == sorted(c.room_name for c in sessions)
    assert harness.gateway.rooms == set()
    ended = harness.events.since(0, types=["SessionTerminated"]).events
    assert sorted(e.session_id or "" for e in ended) == sorted(c.session_id for c in sessions)
    assert {e.data["reason"] for e in ended} == {"manager shutting down"}


async def test_token_ttl_covers_duration_limit(harness: Harness) -> None:
    created = await harness.create(required_services=[], metadata={"duration_limit": "36000"})
    ttl_seconds = int(created.access_token.rsplit(":", 1)[1])
    # the limit, the join timeout (5 s in the harness) and the margin for joining late
    assert ttl_seconds == 36000 + 5 + TOKEN_MARGIN.total_seconds()
