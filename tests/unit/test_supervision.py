"""Crash-only supervision: a dead supervisor loop answers its waiters and asks for an exit,
stopping a task is bounded, a logging call cannot raise, and the session actor's behaviour is
exactly its table."""

from __future__ import annotations

import asyncio
import inspect
import logging
import typing

import pytest

from session_manager.commands import GetService, ListServices
from session_manager.errors import NoCapacity, Unhealthy
from session_manager.health_board import SUPERVISOR, HealthBoard
from session_manager.registry import Registry
from session_manager.registry.registry import ServiceStatus
from session_manager.session import messages
from session_manager.session.actor import SessionActor
from session_manager.session.states import TABLE, TRANSITIONS
from session_manager.store import MemoryStore
from session_manager.supervision import cancel_and_wait
from session_manager.supervisor import Supervisor
from tests.unit.conftest import HarnessFactory


class LoopKiller(BaseException):
    """Not an Exception: gets past the per-command handler, as a bug in the loop would."""


async def test_a_dead_supervisor_loop_answers_waiters_turns_health_and_asks_to_exit(
    make_harness: HarnessFactory,
) -> None:
    harness = await make_harness()
    supervisor = harness.supervisor
    board = HealthBoard()
    fatal: list[str] = []
    supervisor._board, supervisor._on_fatal = board, fatal.append

    def die(message: object) -> None:
        raise LoopKiller()

    supervisor._handle = die  # type: ignore[method-assign]
    waiting = [
        asyncio.create_task(harness.ask(lambda r: ListServices(None, None, r))) for _ in range(3)
    ]
    results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5)

    assert all(isinstance(result, Unhealthy) for result in results), results
    assert [problem.component for problem in board.problems()] == [SUPERVISOR]
    assert len(fatal) == 1 and "LoopKiller" in fatal[0]
    with pytest.raises(Unhealthy, match="cannot serve"):
        await asyncio.wait_for(harness.ask(lambda r: GetService("x", r)), 5)


async def test_cancel_and_wait_gives_up_on_a_task_that_will_not_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # refuses to stop

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR):
        await cancel_and_wait([task], timeout=0.05)
    assert not task.done()
    assert any(getattr(r, "task", None) == "stubborn" for r in caplog.records)
    release.set()
    await asyncio.wait_for(task, 5)


def test_a_log_call_with_a_reserved_extra_key_does_not_raise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger("session_manager.test")
    with caplog.at_level(logging.INFO):
        # The clash is the point: what ruff's G101 forbids in the code must still not raise.
        log.info("fixed text", extra={"message": "a value", "name": "another"})  # noqa: G101
    record = caplog.records[-1]
    assert record.getMessage() == "fixed text"
    assert (record.extra_message, record.extra_name) == ("a value", "another")  # type: ignore[attr-defined]


def test_every_session_message_has_exactly_one_rule_whose_handler_exists() -> None:
    message_classes = typing.get_args(messages.SessionMessage)
    assert {cls.__name__ for cls in message_classes} == set(TABLE)
    for name, rule in TABLE.items():
        handler = getattr(SessionActor, rule.handler)
        assert inspect.iscoroutinefunction(handler), name
        # What a rule may lead to is reachable from every status it takes the message in.
        for status in rule.when:
            reachable = set(TRANSITIONS[status])
            for step in list(reachable):
                reachable |= TRANSITIONS[step]
            assert rule.leads_to <= reachable | {status}, (name, status)


async def test_a_restored_registration_is_unknown_and_not_chosen_until_it_answers() -> None:
    store = MemoryStore()
    first = Registry(store)
    first.register("asr", "http://asr", {"type": "ASR"})
    await first.persist("asr")

    restarted = Registry(store)
    await restarted.load()
    assert restarted.get("asr").status is ServiceStatus.UNKNOWN
    with pytest.raises(NoCapacity):
        restarted.choose("type:ASR")
    assert restarted.defaults() == []

    change = restarted.record_health("asr", None)  # the first check decides at once
    assert change is not None and change.new is ServiceStatus.HEALTHY
    assert restarted.choose("type:ASR").service_id == "asr"


async def test_a_restored_registration_that_does_not_answer_is_unhealthy_at_once() -> None:
    store = MemoryStore()
    first = Registry(store)
    first.register("asr", "http://asr", {"type": "ASR"})
    await first.persist("asr")
    restarted = Registry(store)
    await restarted.load()

    change = restarted.record_health("asr", "health check failed: connection refused")

    assert change is not None and change.new is ServiceStatus.UNHEALTHY


async def test_an_unwritable_registration_is_undone_and_answered_503(
    make_harness: HarnessFactory,
) -> None:
    from session_manager.commands import RegisterService
    from session_manager.errors import StoreUnavailable

    harness = await make_harness()
    store = harness.supervisor._store

    async def broken(service: object) -> None:
        raise StoreUnavailable("the store cannot take writes")

    store.save_service = broken  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailable):
        await harness.ask(lambda r: RegisterService("asr", "http://asr", {}, r))
    assert harness.registry.find("asr") is None
    listed = await harness.ask(lambda r: ListServices(None, None, r))
    assert listed == []


def test_supervisor_module_keeps_its_loop_free_of_awaits() -> None:
    """The loop's handlers are plain functions: nothing in them can wait on I/O, nor in what
    they call on the supervisor's collaborators."""
    from session_manager.supervisor.children import Children
    from session_manager.supervisor.idempotency import IdempotentCreates
    from session_manager.supervisor.pool_tending import PoolTender
    from session_manager.supervisor.registry_writer import RegistryWriter
    from session_manager.supervisor.rooms import LiveKitRooms
    from session_manager.supervisor.routing import SessionRouting
    from session_manager.supervisor.spawning import Spawner

    for name in ("_handle", "_create_session", "_spawn_session", "_reap"):
        assert not inspect.iscoroutinefunction(getattr(Supervisor, name)), name
    assert not inspect.iscoroutinefunction(LiveKitRooms._route)
    collaborators = (
        Children,
        Spawner,
        IdempotentCreates,
        PoolTender,
        RegistryWriter,
        LiveKitRooms,
        SessionRouting,
    )
    for collaborator in collaborators:
        for name, method in inspect.getmembers(collaborator, inspect.isfunction):
            if not name.startswith("_"):
                assert not inspect.iscoroutinefunction(method), f"{collaborator.__name__}.{name}"
