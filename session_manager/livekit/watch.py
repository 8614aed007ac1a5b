"""Whether LiveKit can be used now: what /health says about it and what the supervisor is told."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import suppress
from typing import Protocol

from session_manager.errors import LiveKitUnavailable
from session_manager.health_board import LIVEKIT, HealthBoard
from session_manager.supervision import cancel_and_wait, watch

log = logging.getLogger(__name__)

# Probes failing in a row before LiveKit counts as down. One can fail on a passing hiccup (a
# pause of either process, a dropped connection); two in a row, a probe interval apart, cannot.
FAILED_PROBES_FOR_DOWN = 2
# While LiveKit is down, probes come at least this often (seconds): creates are refused until
# one answers, and a probe of a dead LiveKit costs next to nothing.
RECOVERY_PROBE_INTERVAL = 0.5


class Prober(Protocol):
    async def probe(self) -> None:
        """Return if LiveKit answers, raise LiveKitUnavailable (with a one-line reason) if not."""


class ManagedProcess(Protocol):
    @property
    def running(self) -> bool: ...

    def add_exit_listener(self, listener: Callable[[int], None]) -> None: ...


class LiveKitWatch:
    """Owns its loop, which probes LiveKit every `interval` seconds (at least every
    RECOVERY_PROBE_INTERVAL while it is down); hears at once when the managed livekit-server
    (if any) exits.

    LiveKit is down when the managed process exits (its rooms are lost: a single node without
    Redis keeps them in memory) or when FAILED_PROBES_FOR_DOWN probes in a row fail (for an
    external LiveKit we cannot know yet whether its rooms survive). Then the board shows LIVEKIT
    down and `on_lost(reason, rooms_lost)` is called once for the outage; a second time only if
    an outage first seen as unreachable turns out to have lost the rooms (the managed process
    exits during it). The first probe that succeeds after that, and started after the last exit,
    ends the outage: the board shows LIVEKIT up and `on_back()` is called once.

    The loop holds no state worth losing (the outage is kept on this object): if it dies
    unexpectedly, `supervision.watch` logs it and it is started again, one interval later.
    """

    def __init__(
        self,
        prober: Prober,
        *,
        board: HealthBoard,
        on_lost: Callable[[str, bool], None],
        on_back: Callable[[], None],
        interval: float,
        managed: ManagedProcess | None = None,
    ) -> None:
        self._prober = prober
        self._board = board
        self._on_lost = on_lost
        self._on_back = on_back
        self._interval = interval
        self._managed = managed
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._exits = 0  # managed-process exits seen; a probe started before one proves nothing
        self._down = False
        self._rooms_lost = False  # this outage was reported with rooms_lost=True
        self._wake = asyncio.Event()

    @property
    def down(self) -> bool:
        return self._down

    def start(self) -> None:
        if self._managed is not None:
            self._managed.add_exit_listener(self._process_exited)
            if not self._managed.running:  # it died between its start and ours
                self._process_exited(None)
        self._spawn(first_delay=0.0)

    async def aclose(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        await cancel_and_wait([task])

    def _spawn(self, first_delay: float) -> None:
        self._task = asyncio.create_task(self._run(first_delay), name="livekit-watch")
        watch(self._task, self._loop_died)

    def _loop_died(self, error: BaseException | None) -> None:
        if not self._closed:
            # A delay, so a loop that dies at once every time does not spin.
            self._spawn(first_delay=self._interval)

    async def _run(self, first_delay: float) -> None:
        await asyncio.sleep(first_delay)
        failures = 0
        while True:
            exits_before = self._exits
            try:
                await self._prober.probe()
            except LiveKitUnavailable as exc:
                failures += 1
                log.debug("livekit probe failed", extra={"failures": failures, "error": str(exc)})
                if failures >= FAILED_PROBES_FOR_DOWN:
                    self._lost(str(exc), rooms_lost=False)
            else:
                failures = 0
                if self._exits == exits_before:
                    self._back()
            pause = min(self._interval, RECOVERY_PROBE_INTERVAL) if self._down else self._interval
            with suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._wake.wait()  # an exit cuts the pause short: recovery is watched
            self._wake.clear()

    def _process_exited(self, returncode: int | None) -> None:
        if self._closed:
            return
        self._exits += 1
        self._wake.set()
        how = "is not running" if returncode is None else f"exited with code {returncode}"
        self._lost(f"managed livekit-server {how}; restarting", rooms_lost=True)

    def _lost(self, reason: str, *, rooms_lost: bool) -> None:
        if self._down and (self._rooms_lost or not rooms_lost):
            return  # this outage was told already; the first reason stays on the board
        first = not self._down
        self._down = True
        self._rooms_lost = rooms_lost
        self._board.down(LIVEKIT, reason)  # logs the reason
        log.info(
            "telling the supervisor livekit is lost",
            extra={"rooms_lost": rooms_lost, "first": first},
        )
        self._on_lost(reason, rooms_lost)

    def _back(self) -> None:
        if not self._down:
            return
        self._down = False
        self._rooms_lost = False
        self._board.up(LIVEKIT)  # logs how long it was down
        self._on_back()
