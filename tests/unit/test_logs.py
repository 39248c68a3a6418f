"""Rate-limited warnings: bad input is logged without flooding the log."""

from __future__ import annotations

import logging

from sp_pipeline.logs import RateLimited


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_flood_is_one_line_per_interval_with_the_count_suppressed(caplog):
    clock = Clock()
    limited = RateLimited(logging.getLogger("test.flood"), interval=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.flood"):
        for i in range(1000):
            limited.warning("reject:json", "rejected frame %d", i)
        clock.t += 10.0
        limited.warning("reject:json", "rejected frame %d", 1000)
    assert [r.getMessage() for r in caplog.records] == [
        "rejected frame 0",
        "rejected frame 1000 (999 more like this in the last 10 s)",
    ]


def test_keys_are_limited_independently(caplog):
    clock = Clock()
    limited = RateLimited(logging.getLogger("test.keys"), interval=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.keys"):
        for _ in range(3):
            limited.warning("reject:json", "bad json")
            limited.warning("reject:size", "too big")
        clock.t += 9.9
        limited.warning("reject:size", "too big")
    assert [r.getMessage() for r in caplog.records] == ["bad json", "too big"]
