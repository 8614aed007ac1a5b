"""I/O the supervisor runs outside its loop, so that the loop never waits on it: reads of the
store, idempotency look-ups and writes, registration writes and LiveKit room listings run as
tasks it owns; what must change state when they finish comes back through the inbox as
`IoFinished`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from session_manager.commands import IoFinished, SupervisorMessage
from session_manager.errors import ManagerError, ShuttingDown, StoreUnavailable
from session_manager.session.messages import settle

log = logging.getLogger("session_manager.supervisor")

T = TypeVar("T")


class Offload:
    """Owns the supervisor's I/O tasks (the supervisor cancels and awaits them at close); each
    task's `then` goes back to the supervisor's loop through its inbox."""

    def __init__(self, tell: Callable[[SupervisorMessage], None]) -> None:
        self._tell = tell
        self.tasks: set[asyncio.Task[Any]] = set()  # I/O run outside the loop, owned here

    def __call__(
        self,
        coro: Coroutine[Any, Any, T],
        *,
        reply: asyncio.Future[T] | None = None,
        then: Callable[[asyncio.Future[T]], None] | None = None,
    ) -> asyncio.Task[T]:
        """Run I/O as a task this supervisor owns: its result answers `reply` directly, and
        `then` (if any) runs back in the loop once it is done (not when it was cancelled)."""
        task = asyncio.create_task(coro)
        self.tasks.add(task)

        def done(finished: asyncio.Task[T]) -> None:
            self.tasks.discard(finished)
            if finished.cancelled():
                settle(reply, error=ShuttingDown("the session manager is shutting down"))
                return
            error = finished.exception()
            if error is not None and not isinstance(error, ManagerError):
                log.error("supervisor I/O failed", exc_info=error)
                error = StoreUnavailable("the store could not be read or written")
            settle(reply, None if error else finished.result(), error)
            if then is not None:
                self._tell(IoFinished(finished, then))

        task.add_done_callback(done)
        return task


def as_store_error(error: BaseException | None) -> ManagerError:
    if isinstance(error, ManagerError):
        return error
    return StoreUnavailable("the store could not be read or written")
