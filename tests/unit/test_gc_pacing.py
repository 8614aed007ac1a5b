"""The garbage collector's pacing and its pause histogram.

The collector's state is the process's, so the pacer's rules are checked in a child interpreter
of their own: the test process's objects are never frozen or left with changed thresholds."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from session_manager.gc_pauses import GcPauseRecorder
from session_manager.metrics import Metrics

CHILD_TIMEOUT = 60


def run_child(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_pacing_takes_full_collections_off_the_collectors_schedule_and_gives_it_back() -> None:
    out = run_child(
        """
        import asyncio, gc
        from session_manager.gc_pacing import NEVER, GcPacer

        async def main():
            before = gc.get_threshold()
            pacer = GcPacer(interval=0.05)
            pacer.start()
            during = gc.get_threshold()
            await asyncio.sleep(0.2)
            await pacer.aclose()
            print(before[2] != NEVER, during[2] == NEVER, during[:2] == before[:2],
                  gc.get_threshold() == before)

        asyncio.run(main())
        """
    )
    assert out.split() == ["True", "True", "True", "True"]


def test_a_paced_run_collects_garbage_cycles_and_freezes_only_what_is_alive() -> None:
    out = run_child(
        """
        import asyncio, gc, weakref
        from session_manager.gc_pacing import GcPacer

        class Node:
            pass

        def cycle():
            a, b = Node(), Node()
            a.other, b.other = b, a
            return a

        async def main():
            pacer = GcPacer(interval=60)  # the test makes the paced runs itself
            pacer.start()
            garbage = cycle()
            gone = weakref.ref(garbage)
            del garbage
            kept = [Node() for _ in range(1000)]
            frozen_before = gc.get_freeze_count()
            pacer.collect_recent()
            print(gone() is None, gc.get_freeze_count() - frozen_before >= len(kept))
            await pacer.aclose()

        asyncio.run(main())
        """
    )
    assert out.split() == ["True", "True"]


def test_a_cycle_that_dies_frozen_is_reclaimed_by_a_sweep_once_the_frozen_set_has_grown() -> None:
    out = run_child(
        """
        import asyncio, gc, weakref
        from session_manager import gc_pacing
        from session_manager.gc_pacing import GcPacer

        class Node:
            pass

        async def main():
            gc_pacing.SWEEP_FLOOR = 0
            gc_pacing.SWEEP_MIN_INTERVAL = 0.0
            pacer = GcPacer(interval=60)  # the test makes the paced runs itself
            pacer.start()
            a, b = Node(), Node()
            a.other, b.other = b, a
            gone = weakref.ref(a)
            pacer.collect_recent()  # alive: frozen
            del a, b  # now garbage, but frozen: no paced run reaches it
            pacer.collect_recent()
            survived_paced_run = gone() is not None
            sweeps_before = pacer.sweeps
            ballast = [[i] for i in range(4 * gc.get_freeze_count())]  # frozen set grows 4x+
            pacer.collect_recent()  # the ballast is frozen by this run: no sweep yet
            pacer.collect_recent()  # the frozen set is past the growth: a sweep
            print(survived_paced_run, pacer.sweeps > sweeps_before, gone() is None)
            await pacer.aclose()

        asyncio.run(main())
        """
    )
    assert out.split() == ["True", "True", "True"]


def test_gc_pauses_are_observed_by_generation_and_the_hook_is_removed_on_close() -> None:
    metrics = Metrics()
    recorder = GcPauseRecorder(metrics.observe_gc_pause)
    recorder.open()
    try:
        gc.collect()
        gc.collect(0)
    finally:
        recorder.close()
    assert all(callback is not recorder._on_gc for callback in gc.callbacks)
    counts = {
        sample.labels["generation"]: sample.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        if family.name == "session_manager_gc_pause_seconds"
        for sample in family.samples
        if sample.name.endswith("_count")
    }
    assert counts["2"] >= 1
    assert counts["0"] >= 1


def test_a_failing_observer_never_raises_inside_the_collector() -> None:
    def broken(generation: int, seconds: float) -> None:
        raise RuntimeError("observer broke")

    recorder = GcPauseRecorder(broken)
    recorder.open()
    try:
        gc.collect()  # would raise (or print an unraisable warning) if the hook let it out
    finally:
        recorder.close()


def test_sweeps_are_at_least_the_minimum_interval_apart() -> None:
    out = run_child(
        """
        import asyncio, gc
        from session_manager import gc_pacing
        from session_manager.gc_pacing import GcPacer

        async def main():
            gc_pacing.SWEEP_FLOOR = 0
            gc_pacing.SWEEP_MIN_INTERVAL = 3600.0
            pacer = GcPacer(interval=60)  # the test makes the paced runs itself
            pacer.start()  # the start-up sweep
            ballast = [[i] for i in range(8 * gc.get_freeze_count())]
            for _ in range(3):
                pacer.collect_recent()
            print(pacer.sweeps)
            await pacer.aclose()

        asyncio.run(main())
        """
    )
    assert out.split() == ["1"]
