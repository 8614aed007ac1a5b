"""The one way to hand a measurement to an observer: the plain callbacks the parts that time
something are given (`Metrics.observe_*`, so none of them imports prometheus).

A measurement that cannot be recorded must never break the work it measured (a LiveKit call, a
store batch, the loop-lag probe, a garbage collection), so whatever an observer raises is dropped
here, once, instead of in a `try` beside every call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def report(observe: Callable[..., Any] | None, *values: Any) -> None:
    """Call `observe(*values)` if there is an observer; anything it raises is dropped."""
    if observe is None:
        return
    try:
        observe(*values)
    except Exception:
        pass
