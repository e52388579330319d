"""A log line for a condition that can repeat once per message or per entry.

Anyone allowed to PUBLISH on a map's channel can send thousands of bad messages a second; one
WARNING per message per map would turn that into a flood of log lines (and the disk and CPU behind
them).  :class:`RateLimitedLog` logs the first occurrence at once, then at most one line per
``every`` seconds saying how many were left out; ``total`` keeps the exact count (the maps'
``statistics()`` counters carry the same numbers).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from . import forksafe

EVERY = 60.0
"""Default seconds between two lines of one :class:`RateLimitedLog`."""


class RateLimitedLog:
    """``log(msg, *args)`` at most once per ``every`` seconds; thread-safe."""

    __slots__ = ("__weakref__", "_clock", "_level", "_lock", "_logger", "_next", "_skipped",
                 "every", "total")  # fmt: skip

    def __init__(
        self, logger: logging.Logger, level: int = logging.WARNING, *, every: float = EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self._logger, self._level, self._clock = logger, level, clock
        self._lock = threading.Lock()
        forksafe.register(self)
        self._next = -float("inf")
        self._skipped = 0
        self.every = every
        self.total = 0

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # a parent's thread may have held it at the fork

    def __call__(self, msg: str, *args: object, exc_info: bool = False) -> bool:
        """Log ``msg % args`` unless a line was logged less than ``every`` seconds ago; returns
        whether it was logged.  A line after left-out ones says how many were left out."""
        now = self._clock()
        with self._lock:
            self.total += 1
            if now < self._next:
                self._skipped += 1
                return False
            skipped, self._skipped = self._skipped, 0
            self._next = now + self.every
        if skipped:
            msg += " (%d more like this in the last %.0f s; logged at most once per %.0f s)"
            args = (*args, skipped, self.every, self.every)
        self._logger.log(self._level, msg, *args, exc_info=exc_info)
        return True
