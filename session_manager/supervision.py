"""Task ownership for the manager's long-lived loops: stop them (cancel AND await, bounded) and
watch them (an unexpected end is reported at once, never silent).

Each owner keeps its tasks; these two helpers are the only way the manager stops or watches one,
so "cancelled but never awaited" and "died and nobody noticed" cannot be written by accident.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

STOP_TIMEOUT = 5.0  # seconds a cancelled task may take to run its cleanup


async def cancel_and_wait(
    tasks: Iterable[asyncio.Future[Any] | None], timeout: float = STOP_TIMEOUT
) -> None:
    """Cancel every task and wait for all of them to end, at most `timeout` seconds.

    A task that outlives the timeout is logged by name and left cancelled: the caller's
    shutdown goes on rather than hang on one stuck cleanup. Their exceptions are swallowed
    here on purpose: a watcher (see `watch`) is where a death is reported."""
    pending = [task for task in tasks if task is not None and not task.done()]
    for task in pending:
        task.cancel()
    if not pending:
        return
    _, stuck = await asyncio.wait(pending, timeout=timeout)
    for task in stuck:
        name = task.get_name() if isinstance(task, asyncio.Task) else repr(task)
        log.error("task did not stop after cancel", extra={"task": name, "timeout": timeout})


def watch(task: asyncio.Task[Any], on_death: Callable[[BaseException | None], None]) -> None:
    """Call `on_death(error)` if `task` ends by itself (returns or raises) rather than being
    cancelled by its owner. The error is logged at ERROR with its traceback first."""

    def done(finished: asyncio.Task[Any]) -> None:
        if finished.cancelled():
            return
        error = finished.exception()
        log.error(
            "long-lived task ended unexpectedly",
            extra={"task": finished.get_name()},
            exc_info=error,
        )
        on_death(error)

    task.add_done_callback(done)
