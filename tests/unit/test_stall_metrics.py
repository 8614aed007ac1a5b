"""What an operator reads when create-session's tail grows: how late the event loop ran, and how
long each batch of session views took to write."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from session_manager.loop_lag import LoopLagProbe
from session_manager.metrics import Metrics
from session_manager.store import SqliteStore
from tests.polling import eventually
from tests.unit.test_store_faults import FlakyDisk, view

Sample = tuple[str, tuple[tuple[str, str], ...]]


def block_the_loop(seconds: float) -> None:
    """A callback that keeps the loop busy, as a long parse or a collection would."""
    time.sleep(seconds)


def samples(metrics: Metrics, family_name: str) -> dict[Sample, float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        if family.name == family_name
        for sample in family.samples
    }


async def test_a_blocked_loop_shows_as_one_late_timer_of_about_its_length() -> None:
    seen: list[float] = []
    probe = LoopLagProbe(seen.append, interval=0.01)
    probe.open()
    try:
        await eventually(lambda: len(seen) >= 3)
        before = len(seen)
        block_the_loop(0.2)  # the stall: nothing on this loop runs meanwhile
        await eventually(lambda: len(seen) > before + 1)
    finally:
        probe.close()
    assert 0.15 <= max(seen[before:]) < 1.0, seen
    stopped = len(seen)
    await asyncio.sleep(0.05)
    assert len(seen) == stopped  # closed: no timer left on the loop


async def test_a_failing_observer_does_not_stop_the_probe() -> None:
    calls = 0

    def broken(late: float) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("observer broke")

    probe = LoopLagProbe(broken, interval=0.005)
    probe.open()
    try:
        await eventually(lambda: calls >= 3)
    finally:
        probe.close()


async def test_the_lag_histogram_is_exposed() -> None:
    metrics = Metrics()
    probe = LoopLagProbe(metrics.observe_loop_lag, interval=0.005)
    probe.open()
    try:
        block_the_loop(0.06)
        await asyncio.sleep(0.02)
    finally:
        probe.close()
    lag = samples(metrics, "session_manager_event_loop_lag_seconds")
    count = lag[("session_manager_event_loop_lag_seconds_count", ())]
    assert count >= 1
    # the 60 ms stall is counted over 50 ms
    assert lag[("session_manager_event_loop_lag_seconds_bucket", (("le", "0.05"),))] < count


async def test_each_written_batch_is_timed_and_failures_are_told_apart(tmp_path: Path) -> None:
    metrics = Metrics()
    store = FlakyDisk(
        tmp_path / "s.sqlite3", failures=1, retry_backoff=0.01, on_write=metrics.observe_store_write
    )
    await store.open()
    try:
        store.save_session(view("s-1"))
        await store.flush(5.0)
        store.save_session(view("s-2"))
        await store.flush(5.0)
    finally:
        await store.aclose()
    written = samples(metrics, "session_manager_store_write_seconds")
    assert written[("session_manager_store_write_seconds_count", (("outcome", "error"),))] == 1
    assert written[("session_manager_store_write_seconds_count", (("outcome", "ok"),))] == 2
    assert written[("session_manager_store_write_seconds_sum", (("outcome", "ok"),))] > 0


async def test_a_failing_write_observer_does_not_stop_the_writer(tmp_path: Path) -> None:
    def broken(ok: bool, seconds: float) -> None:
        raise RuntimeError("observer broke")

    store = SqliteStore(tmp_path / "s.sqlite3", on_write=broken)
    await store.open()
    try:
        store.save_session(view("s-1"))
        await store.flush(5.0)
        assert await store.get_session("s-1") is not None
        store.save_session(view("s-2"))
        await store.flush(5.0)
    finally:
        await store.aclose()
