"""Fixtures of the unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from session_manager.events import EventLog
from session_manager.pools import WarmPoolSetting
from session_manager.registry import Registry
from session_manager.session.deps import SessionDeps
from session_manager.store import MemoryStore
from session_manager.supervisor import Supervisor
from session_manager.takeover import SessionTakeOver
from tests.unit.session_harness import FakeGateway, FakeMicroservices, Harness

HarnessFactory = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make_harness() -> AsyncIterator[HarnessFactory]:
    """Build a supervisor over fakes; keyword arguments override SessionDeps fields."""
    started: list[Supervisor] = []

    async def make(
        *,
        store: MemoryStore | None = None,
        gateway: FakeGateway | None = None,
        keep_sessions_at_shutdown: bool = False,
        take_over: bool = False,
        warm_pools: list[WarmPoolSetting] | None = None,
        max_live_sessions: int = 10_000,
        **overrides: Any,
    ) -> Harness:
        """`store` and `gateway`: those a previous harness left (a restart); `take_over`:
        adopt the sessions it left live, as a starting daemon does."""
        store = store or MemoryStore()
        registry = Registry(store, unhealthy_after=2, healthy_after=2)
        await registry.load()
        gateway = gateway or FakeGateway()
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
        deps = SessionDeps(**values)
        supervisor = Supervisor(
            registry,
            store,
            deps,
            events=events,
            keep_sessions_at_shutdown=keep_sessions_at_shutdown,
            warm_pools=warm_pools,
            max_live_sessions=max_live_sessions,
        )
        adopted = None
        if take_over:
            takeover = SessionTakeOver(
                store,
                gateway,  # type: ignore[arg-type]
                events,
                rooms_survive=True,
                deployment=deps.deployment,
                livekit_timeout=1.0,
                flush_timeout=1.0,
            )
            adopted = (await takeover.run()).adopted
        await supervisor.start(adopted)
        started.append(supervisor)
        return Harness(supervisor, gateway, microservices, registry, events, store=store)

    yield make
    for supervisor in started:
        await supervisor.aclose(timeout=2)


@pytest.fixture
async def harness(make_harness: HarnessFactory) -> Harness:
    return await make_harness()
