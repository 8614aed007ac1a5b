"""/metrics numbers are exact at any size, in Prometheus' text format."""

from __future__ import annotations

from session_manager.api.metrics import _family


def test_counts_are_exact_and_other_values_read_back_the_same() -> None:
    lines = _family(
        "m",
        "gauge",
        "help",
        [({"k": "a"}, 1234567), ({"k": "b"}, 2**53 + 1), ({"k": "c"}, 0.25), ({"k": "d"}, 3.0)],
    )
    assert lines[2:] == [
        'm{k="a"} 1234567',
        f'm{{k="b"}} {2**53 + 1}',
        'm{k="c"} 0.25',
        'm{k="d"} 3',
    ]
    assert _family("n", "gauge", "h", [({}, float("inf"))])[2] == "n +Inf"
