"""Owns one timer chain on the event loop: how late the loop runs a timer, measured all along.

Every request in flight waits out a moment the loop cannot run anything: a long callback, a
collection, a large LiveKit response parsed in one go. Those moments set create-session's p99
and never its median. The probe asks for a timer every `interval` seconds and reports how late
each one ran to a histogram (`session_manager_event_loop_lag_seconds`), so an operator (and the
benchmark) can tell a stall of the manager's loop from a slow LiveKit or a slow store.

It is a chain of `call_at` handles, not a task: nothing to supervise but the one handle, which
`close` cancels. The callback only reads the clock and hands one number on; a failure of the
observer is swallowed so the chain never breaks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from session_manager.observers import report

LagObserver = Callable[[float], None]  # seconds late


class LoopLagProbe:
    """Owns its timer chain on the running loop while open; reports each timer's lateness."""

    def __init__(self, observe: LagObserver, interval: float = 0.05) -> None:
        self._observe = observe
        self._interval = interval
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def open(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._schedule()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._loop = None

    def _schedule(self) -> None:
        assert self._loop is not None
        self._due = self._loop.time() + self._interval
        self._handle = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        if self._loop is None:
            return
        late = self._loop.time() - self._due
        report(self._observe, max(late, 0.0))
        self._schedule()
