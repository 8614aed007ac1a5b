"""Fixtures of the unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from session_manager.events import EventLog
from session_manager.registry import Registry
from session_manager.session.actor import SessionDeps
from session_manager.store import MemoryStore
from session_manager.supervisor import Supervisor
from tests.unit.session_harness import FakeGateway, FakeMicroservices, Harness

HarnessFactory = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make_harness() -> AsyncIterator[HarnessFactory]:
    """Build a supervisor over fakes; keyword arguments override SessionDeps fields."""
    started: list[Supervisor] = []

    async def make(**overrides: Any) -> Harness:
        store = MemoryStore()
        registry = Registry(store, unhealthy_after=2, healthy_after=2)
        gateway = FakeGateway()
        microservices = FakeMicroservices()
        events = EventLog(1000, first_id=1)
        values: dict[str, Any] = {
            "events": events,
            "gateway": gateway,
            "microservices": microservices,
            "registry": registry,
            "join_timeout": 5.0,
            "room_empty_timeout": 60,
            "client_token_ttl": 3600,
            "teardown_timeout": 1.0,
            **overrides,
        }
        supervisor = Supervisor(registry, store, SessionDeps(**values), events=events)
        await supervisor.start()
        started.append(supervisor)
        return Harness(supervisor, gateway, microservices, registry, events, store=store)

    yield make
    for supervisor in started:
        await supervisor.aclose(timeout=2)


@pytest.fixture
async def harness(make_harness: HarnessFactory) -> Harness:
    return await make_harness()
