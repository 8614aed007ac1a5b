"""The health monitor: calls `GET {endpoint}/health` on every registered service each interval
and hands the results to the supervisor, which has the registry decide Healthy / Unhealthy.

Its client is its own (the daemon gives it a connection pool apart from dispatch's), and at most
`concurrency` checks run at once: many slow or dead registrations make a round longer, they
never hold up a join-room call."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from session_manager.dispatch import MicroserviceClient
from session_manager.periodic import Periodic
from session_manager.registry.registry import Registry

JITTER = 0.1  # each round starts within ±10% of the interval, so instances are not probed in step


HealthResults = list[tuple[str, str | None]]  # (service id, error or None) per instance checked


class HealthMonitor:
    """Owns the loop that checks every registered instance each interval (the first round at
    once, so instances restored at start-up leave `Unknown` quickly). It only reads the registry:
    the results go to `on_results` (the supervisor), the registry's one writer."""

    def __init__(
        self,
        registry: Registry,
        client: MicroserviceClient,
        *,
        interval: float,
        timeout: float,
        on_results: Callable[[HealthResults], None],
        concurrency: int = 64,
        should_check: Callable[[], bool] = lambda: True,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._registry = registry
        self._client = client
        self._timeout = timeout
        self._slots = asyncio.Semaphore(concurrency)
        self._on_results = on_results
        # Several managers on one Redis: only the one that leads the checks makes them, and
        # shares the results (each instance is checked once per interval across the cluster).
        self._should_check = should_check
        self._rounds = Periodic(
            "health-monitor", self.check_all, interval=interval, jitter=JITTER, run_at_once=True
        )

    async def start(self) -> None:
        self._rounds.start()

    async def aclose(self) -> None:
        await self._rounds.aclose()

    async def check_all(self) -> None:
        services = [(r.service_id, r.endpoint) for r in self._registry.all()]
        if not services or not self._should_check():
            return
        errors = await asyncio.gather(
            *(self._check(service_id, endpoint) for service_id, endpoint in services)
        )
        self._on_results(
            [(service_id, error) for (service_id, _), error in zip(services, errors, strict=True)]
        )

    async def _check(self, service_id: str, endpoint: str) -> str | None:
        async with self._slots:
            return await self._client.check_health(endpoint, self._timeout, service_id=service_id)
