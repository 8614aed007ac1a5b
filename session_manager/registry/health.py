"""The health monitor: calls `GET {endpoint}/health` on every registered service each interval
and feeds the results to the registry, which decides Healthy / Unhealthy."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from session_manager.dispatch import MicroserviceClient
from session_manager.periodic import Periodic
from session_manager.registry.registry import HealthChange, Registry

log = logging.getLogger(__name__)

JITTER = 0.1  # each round starts within ±10% of the interval, so instances are not probed in step


class HealthMonitor:
    def __init__(
        self,
        registry: Registry,
        client: MicroserviceClient,
        *,
        interval: float,
        timeout: float,
        on_change: Callable[[HealthChange], None] | None = None,
    ) -> None:
        self._registry = registry
        self._client = client
        self._timeout = timeout
        self._on_change = on_change
        self._rounds = Periodic("health-monitor", self.check_all, interval=interval, jitter=JITTER)

    async def start(self) -> None:
        self._rounds.start()

    async def aclose(self) -> None:
        await self._rounds.aclose()

    async def check_all(self) -> None:
        services = [(r.service_id, r.endpoint) for r in self._registry.all()]
        results = await asyncio.gather(
            *(self._client.check_health(endpoint, self._timeout) for _, endpoint in services)
        )
        for (service_id, _), error in zip(services, results, strict=True):
            change = self._registry.record_health(service_id, error)
            if change is None:
                continue
            level = logging.WARNING if change.new.value == "Unhealthy" else logging.INFO
            log.log(
                level,
                "microservice health changed",
                extra={
                    "service_id": service_id,
                    "old": change.old.value,
                    "new": change.new.value,
                    "error": change.error,
                },
            )
            if self._on_change is not None:
                self._on_change(change)
