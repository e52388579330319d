"""The rate-limited log line: the first at once, then one per period saying what was left out."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest

from syncmap import forksafe
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


@pytest.mark.parametrize("guard", [True, False], ids=["guarded", "guard-off"])
def test_a_fork_while_another_thread_logs_leaves_the_child_able_to_log(guard: bool) -> None:
    """The parent's thread holds the log's lock at the fork: the child's copy must not be held."""
    log = RateLimitedLog(logging.getLogger("syncmap.test"), every=0.0)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with log._lock:
            held.set()
            release.wait()

    t = threading.Thread(target=hold)
    t.start()
    held.wait()
    forksafe.enabled = guard
    try:
        pid = os.fork()
        if pid == 0:  # the child: log once (hangs on an inherited held lock), then leave
            log("from the child")
            os._exit(0)
    finally:
        forksafe.enabled = True
        release.set()
        t.join()
    deadline = time.monotonic() + 2
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # polling a child's exit, bounded
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert (done[0] != 0) is guard, (
        "the child hung on the parent's lock"
        if guard
        else ("guard-off control passed: the test cannot fail")
    )
