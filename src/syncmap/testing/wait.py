"""Waiting for a condition with a deadline: the one way tests synchronise on another process."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], bool], timeout: float, what: str = "condition") -> float:
    """Return the seconds it took for ``predicate()`` to hold; raise ``AssertionError`` at timeout.

    It checks every millisecond: what is measured is when the condition became true, not a sleep.
    """
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.001)
    return time.monotonic() - start
