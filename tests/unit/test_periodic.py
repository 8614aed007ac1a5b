"""The periodic job runner the health monitor and the retention sweeper share."""

from __future__ import annotations

import asyncio

import pytest

from session_manager.periodic import Periodic


async def test_a_failing_run_does_not_stop_the_next(caplog: pytest.LogCaptureFixture) -> None:
    runs: list[int] = []

    async def job() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            raise RuntimeError("first run fails")

    periodic = Periodic("test-job", job, interval=0.01, jitter=0.5)
    periodic.start()
    for _ in range(200):
        if len(runs) >= 3:
            break
        await asyncio.sleep(0.01)
    await periodic.aclose()
    assert len(runs) >= 3
    assert any("periodic job failed" in r.getMessage() for r in caplog.records)
    count = len(runs)
    await asyncio.sleep(0.05)
    assert len(runs) == count  # stopped means stopped
    await periodic.aclose()  # and stopping twice is fine
