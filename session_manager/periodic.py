"""A job run every so often in one task its owner starts and stops (cancel and await)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from session_manager.supervision import cancel_and_wait

log = logging.getLogger(__name__)


class Periodic:
    """Runs `job` every `interval` seconds, each wait stretched or shrunk by up to `jitter`
    (a fraction) so that many of them do not fire in step. A run that fails is logged; the
    next one still comes."""

    def __init__(
        self,
        name: str,
        job: Callable[[], Awaitable[object]],
        *,
        interval: float,
        jitter: float = 0.0,
        run_at_once: bool = False,
    ) -> None:
        self._name = name
        self._run_at_once = run_at_once
        self._job = job
        self._interval = interval
        self._jitter = jitter
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self._name)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait((task,))

    async def _run(self) -> None:
        if self._run_at_once:
            await self._run_job()
        while True:
            spread = random.uniform(1 - self._jitter, 1 + self._jitter)
            await asyncio.sleep(self._interval * spread)
            await self._run_job()

    async def _run_job(self) -> None:
        try:
            await self._job()
        except Exception:
            log.exception("periodic job failed; it runs again later", extra={"job": self._name})
