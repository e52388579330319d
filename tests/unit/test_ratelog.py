"""The rate-limited log line: the first at once, then one per period saying what was left out."""

from __future__ import annotations

import logging

import pytest

from syncmap.ratelog import RateLimitedLog


def test_logs_the_first_then_one_line_per_period_with_the_count_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    say = RateLimitedLog(logging.getLogger("syncmap.test"), every=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="syncmap.test"):
        assert say("bad message %s", "a")
        for i in range(999):
            now[0] = i / 100  # 0 .. 9.98 s: inside the first period
            assert not say("bad message %s", i)
        now[0] = 10.0
        assert say("bad message %s", "b")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "bad message a",
        "bad message b (999 more like this in the last 10 s; logged at most once per 10 s)",
    ]
    assert say.total == 1001
