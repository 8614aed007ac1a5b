"""Keeps the store from growing without end: ended sessions older than `session_retention`, and
idempotency keys past their lifetime, are removed at start and then every hour."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from session_manager.clock import rfc3339, utc_now
from session_manager.periodic import Periodic
from session_manager.store.base import Store

log = logging.getLogger(__name__)

SWEEP_INTERVAL = 3600.0


class RetentionSweeper:
    def __init__(self, store: Store, *, session_retention: float, idempotency_ttl: float) -> None:
        self._store = store
        self._session_retention = session_retention
        self._idempotency_ttl = idempotency_ttl
        # The first sweep runs at once, in the background: a store that cannot purge now is
        # logged and tried again later, it does not stop start-up.
        self._sweeps = Periodic(
            "retention-sweeper", self.sweep, interval=SWEEP_INTERVAL, run_at_once=True
        )

    async def start(self) -> None:
        self._sweeps.start()

    async def aclose(self) -> None:
        await self._sweeps.aclose()

    async def sweep(self) -> int:
        cutoff = rfc3339(utc_now() - timedelta(seconds=self._session_retention))
        removed = await self._store.purge(
            sessions_created_before=cutoff,
            keys_created_before=time.time() - self._idempotency_ttl,
        )
        if removed:
            log.info("old sessions and idempotency keys removed", extra={"rows": removed})
        return removed
