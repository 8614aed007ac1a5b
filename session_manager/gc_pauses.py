"""Owns one hook in the interpreter's garbage collector: each collection's pause, timed.

A full collection walks every tracked object, so its pause grows with the number of live
sessions: exactly the kind of stall that shows at the p99 of create-session and nowhere in the
median. The pauses go to a histogram (`session_manager_gc_pause_seconds{generation}`), so an
operator can tell a GC stall from a slow LiveKit, and the benchmark can tell them apart too.

`gc.callbacks` is global to the process; each recorder adds its own callback and removes exactly
that one on `close`, so several daemons in one process (the tests) do not disturb each other.
The callback runs inside the collector: it only reads a clock and hands two numbers on, and a
failure inside it is swallowed (an exception there would surface in whatever code happened to
allocate).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from session_manager.observers import report

PauseObserver = Callable[[int, float], None]  # (generation, seconds)


class GcPauseRecorder:
    """Owns its callback in `gc.callbacks` while open; reports each collection's pause."""

    def __init__(self, observe: PauseObserver) -> None:
        self._observe = observe
        self._started: float | None = None
        self._installed = False

    def open(self) -> None:
        if not self._installed:
            gc.callbacks.append(self._on_gc)
            self._installed = True

    def close(self) -> None:
        if self._installed:
            self._installed = False
            try:
                gc.callbacks.remove(self._on_gc)
            except ValueError:
                pass  # someone cleared the list; nothing of ours is left in it

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        started, self._started = self._started, None
        if started is None:
            return
        report(self._observe, int(info.get("generation", 0)), time.perf_counter() - started)
