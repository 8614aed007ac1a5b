"""Task ownership: every task the SDK starts is held somewhere that cancels and awaits it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

logger = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` and wait until it has really finished.

    The task's own outcome is consumed here (it was cancelled on purpose, or already reported);
    only a cancellation of the caller propagates.
    """
    if task is None:
        return
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        # Mark the exception as retrieved so asyncio does not warn about it at exit.
        task.exception()


class OwnedTasks:
    """A set of background tasks that is closed as a whole at shutdown.

    Finished tasks drop out by themselves; a task that fails is logged at that moment rather than
    when someone finally awaits it.
    """

    def __init__(self, label: str) -> None:
        self._label = label
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        if self._closed:
            coro.close()  # never started, so closing it cannot skip any cleanup
            raise RuntimeError(f"{self._label} tasks are closed; cannot start {name!r}")
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            logger.error(
                "background task failed",
                exc_info=error,
                extra={"task_group": self._label, "task_name": task.get_name()},
            )

    async def close(self, *, grace: float) -> None:
        """Refuse new tasks, give running ones `grace` seconds to finish, then cancel the rest."""
        self._closed = True
        pending = set(self._tasks)
        if pending and grace > 0:
            _, pending = await asyncio.wait(pending, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
