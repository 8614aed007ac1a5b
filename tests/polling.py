"""Waiting in tests for state the code under test records but does not signal (a fake's list of
calls, a counter, a store row): poll it, and fail when it never holds. A failure detector, not a
timing: the bound only keeps a broken test from hanging."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

POLL_INTERVAL = 0.01


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    for _ in range(int(timeout / POLL_INTERVAL)):
        if check():
            return
        await asyncio.sleep(POLL_INTERVAL)
    raise AssertionError("condition not met in time")
