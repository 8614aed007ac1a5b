"""What the session actors and the supervisor write to the event log."""

from __future__ import annotations

from session_manager.commands import DeleteSession, DrainService, RegisterService
from session_manager.events import EventType
from session_manager.livekit.webhooks import ROLE_CLIENT
from session_manager.session.states import SessionStatus
from tests.unit.session_harness import Harness

S = SessionStatus


def session_events(harness: Harness, session_id: str) -> list[tuple[str, dict[str, object]]]:
    page = harness.events.since(0, session_id=session_id)
    return [(event.type, event.data) for event in page.events]


async def test_a_session_tells_its_whole_life_in_order(harness: Harness) -> None:
    harness.registry.register("asr", "http://asr", {"type": "ASR"})
    created = await harness.create(required_services=["asr"])
    harness.joined(created, "asr")
    harness.joined(created, "user123", ROLE_CLIENT)
    await harness.until(created.session_id, S.ACTIVE)
    await harness.ask(lambda r: DeleteSession(created.session_id, r))

    events = session_events(harness, created.session_id)
    types = [t for t, _ in events]
    assert types == [
        EventType.SESSION_CREATED,
        EventType.SESSION_STATUS_CHANGED,  # -> WaitingForServices
        EventType.MICROSERVICE_DISPATCHED,
        EventType.MICROSERVICE_JOINED,
        EventType.SESSION_STATUS_CHANGED,  # -> Ready
        EventType.SESSION_READY,
        EventType.CLIENT_JOINED,
        EventType.SESSION_STATUS_CHANGED,  # -> Active
        EventType.SESSION_STATUS_CHANGED,  # -> Terminating
        EventType.SESSION_STATUS_CHANGED,  # -> Terminated
        EventType.SESSION_TERMINATED,
    ]
    statuses = [d["new"] for t, d in events if t == EventType.SESSION_STATUS_CHANGED]
    assert statuses == ["WaitingForServices", "Ready", "Active", "Terminating", "Terminated"]
    assert events[-1][1]["reason"] == "terminated by request"
    dispatched = harness.events.since(0, types={EventType.MICROSERVICE_DISPATCHED}).events[0]
    assert dispatched.service_id == "asr"


async def test_no_token_ever_appears_in_an_event(harness: Harness) -> None:
    harness.registry.register("asr", "http://asr", {"type": "ASR"})
    created = await harness.create(required_services=["asr"])
    harness.joined(created, "asr")
    await harness.until(created.session_id, S.READY)
    everything = b"".join(e.to_json() for e in harness.events.since(0).events)
    assert b"token:" not in everything  # the fake gateway's tokens all start so
    assert created.access_token.encode() not in everything


async def test_registry_changes_are_events(harness: Harness) -> None:
    await harness.ask(lambda r: RegisterService("tts", "http://tts", {"type": "TTS"}, r))
    await harness.ask(lambda r: DrainService("tts", r))
    events = harness.events.since(
        0, types={EventType.MICROSERVICE_REGISTERED, EventType.MICROSERVICE_UPDATED}
    ).events
    assert [(e.type, e.service_id) for e in events] == [
        (EventType.MICROSERVICE_REGISTERED, "tts"),
        (EventType.MICROSERVICE_UPDATED, "tts"),
    ]
    assert events[1].data["draining"] is True
