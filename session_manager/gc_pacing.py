"""Owns the process's full garbage collections: small and often, never one walk of the whole heap.

Why. CPython's collector walks every tracked object on a full collection, and starts one each
time the old generation grows by a quarter. A live session holds about 40 tracked objects, so
at 10 000 live sessions a full collection walks some 400 000 objects: measured here, 400 ms of
CPU with the event loop stopped, every few seconds under load. That stall is what a
create-session's p99 showed, and why it grew with the number of live sessions.

How. The young generations stay automatic (cheap, and where short-lived cycles die). Full
collections are taken off the collector's own schedule (its third threshold set out of reach)
and run here every `interval` seconds instead, followed by `gc.freeze()`: each run walks only
what survived since the previous one (a fraction of a second's worth of new sessions), then
parks it in the permanent generation, which no collection walks.

Why that is safe. Frozen objects are still freed by reference counting the moment nothing
refers to them; only garbage *cycles* among them wait. A session actor leaves none when it
ends (measured: 0 cyclic objects over 1 000 sessions created and ended with the collector
off), so freezing loses nothing in the common case. For the rare cycle (an exception kept with
its traceback, say), a sweep — unfreeze, one full collection, freeze again — runs once the
frozen set has grown fourfold since the previous sweep, and at most every SWEEP_MIN_INTERVAL.
A sweep is the one pause that grows with the heap (about 40 ms per 1 000 live sessions here),
so it is kept rare: its cost amortises like a growing array's, and there is never more than
one in SWEEP_MIN_INTERVAL.
"""

from __future__ import annotations

import gc
import logging
import time

from session_manager.periodic import Periodic

log = logging.getLogger(__name__)

# Far beyond any count the third generation reaches: CPython never starts a full collection on
# its own while pacing is on.
NEVER = 2**30
# Seconds between paced collections. Each walks what survived since the previous one: at 0.1 s
# a pause measured 2-10 ms under a load of ~1 000 creates a second; at 0.5 s, 30-140 ms, for
# the same total.
DEFAULT_INTERVAL = 0.1
# A sweep (unfreeze + full collection) when the frozen set has grown past this factor of what it
# held after the previous sweep, and past SWEEP_FLOOR objects (start-up alone freezes ~100 000).
SWEEP_GROWTH = 4.0
SWEEP_FLOOR = 100_000
SWEEP_MIN_INTERVAL = 600.0  # seconds


class GcPacer:
    """Owns the loop that runs the process's full collections (see the module's docstring)."""

    def __init__(self, *, interval: float = DEFAULT_INTERVAL) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self._saved_thresholds: tuple[int, int, int] | None = None
        self._swept_at = 0  # frozen objects right after the previous sweep
        # Objects frozen since then, counted as they are frozen. gc.get_freeze_count() walks the
        # whole frozen list (13 ms for start-up's 80 000 objects here), far too slow to ask ten
        # times a second; this count never drops when a frozen object is freed, so it runs
        # ahead of the truth, which only brings a sweep earlier, never later.
        self._frozen_since = 0
        self._swept_when = 0.0  # time.monotonic() of the previous sweep
        self.sweeps = 0
        self._rounds = Periodic("gc-pacer", self._pace, interval=interval)

    def start(self) -> None:
        """Freeze what start-up allocated, take full collections off the collector's own
        schedule, and start pacing them."""
        if self._saved_thresholds is not None:
            return
        self._saved_thresholds = gc.get_threshold()
        young, middle, _ = self._saved_thresholds
        gc.set_threshold(young, middle, NEVER)
        self._sweep()
        self._rounds.start()

    async def aclose(self) -> None:
        """Stop pacing and hand the collector its own schedule back (the frozen objects stay
        frozen: the process is on its way out)."""
        await self._rounds.aclose()
        if self._saved_thresholds is not None:
            gc.set_threshold(*self._saved_thresholds)
            self._saved_thresholds = None

    async def _pace(self) -> None:
        self.collect_recent()

    def collect_recent(self) -> None:
        """One paced run: a full collection, which walks only what was not frozen yet, then
        freeze the survivors; a sweep instead once the frozen set has grown fourfold (and the
        previous sweep is SWEEP_MIN_INTERVAL old)."""
        frozen = self._swept_at + self._frozen_since
        grown = frozen > max(SWEEP_FLOOR, int(self._swept_at * SWEEP_GROWTH))
        if grown and time.monotonic() - self._swept_when >= SWEEP_MIN_INTERVAL:
            self._sweep()
            return
        gc.collect()
        self._frozen_since += len(gc.get_objects())  # what is not frozen yet: the survivors
        gc.freeze()

    def _sweep(self) -> None:
        started = time.perf_counter()
        gc.unfreeze()
        found = gc.collect()
        gc.freeze()
        self._swept_at = gc.get_freeze_count()
        self._frozen_since = 0
        self._swept_when = time.monotonic()
        self.sweeps += 1
        log.debug(
            "full garbage collection sweep",
            extra={
                "unreachable": found,
                "frozen": self._swept_at,
                "ms": round((time.perf_counter() - started) * 1000, 1),
            },
        )
