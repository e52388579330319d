"""``syncmap demo --sentinel``: the demo's maps on a Sentinel-managed master and replica.

The demo starts a :class:`~syncmap.testing.sentinelset.SentinelSet` (a master, a replica, three
Sentinels on loopback ports) and gives every server process its ``redis+sentinel://`` URL.  With
``--chaos`` it pauses the master once (SIGSTOP) and keeps it stopped until the Sentinels have
promoted the replica, then resumes it (Sentinel demotes it to a replica a few seconds later), and
prints the topology before and after.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..embedded import EmbeddedRedis
from ..testing.sentinelset import SentinelSet

HOLD = 1.5  # the old master stays stopped this long after the Sentinels name the new one
NEEDS = 8.0  # seconds of run left to fit a failover (down-after, election, hold, healing)


class FailoverChaos:
    """One failover: pause the master 1 s after every server is up, resume it once the
    Sentinels named the replica (plus ``HOLD``), and tell what happened."""

    def __init__(self, sentinels: SentinelSet) -> None:
        self.sentinels = sentinels
        self.paused: EmbeddedRedis | None = None
        self.old: tuple[str, int] | None = None
        self.paused_at = 0.0
        self.new_at: float | None = None
        self.done = False

    def tick(self, up_at: float | None, run_end: float, say: Callable[[str], None]) -> Any:
        """Called often by the demo's loop; returns ``(what, resumed_at)`` when the old master
        was resumed (a chaos event whose healing the demo then watches), else None."""
        now = time.monotonic()
        if self.done or up_at is None:
            return None
        if self.paused is None:
            if now >= up_at + 1.0 and now + NEEDS <= run_end:
                self.old = self.sentinels.master_addr()
                self.paused = self.sentinels.node_at(self.old)
                self.paused_at = now
                self.paused.pause()
                say(f"chaos: SIGSTOP the master {self.old[0]}:{self.old[1]}")
            return None
        return self._after_pause(now, say)

    def _after_pause(self, now: float, say: Callable[[str], None]) -> Any:
        assert self.paused is not None and self.old is not None
        if self.new_at is None:
            new = self.sentinels.new_master(self.old)
            if new is None:
                return None
            self.new_at = now
            say(f"chaos: Sentinel promoted {new[0]}:{new[1]} "
                f"{now - self.paused_at:.2f} s after the pause")  # fmt: skip
        if now < self.new_at + HOLD:
            return None
        self.paused.resume()
        self.done = True
        say(f"chaos: SIGCONT the old master after {now - self.paused_at:.1f} s; "
            f"topology: {self.sentinels.topology()}")  # fmt: skip
        return ("failover: SIGSTOP the master until Sentinel promoted the replica", now)

    def resume(self) -> None:
        """Resume the old master if still paused (the demo is ending)."""
        if self.paused is not None and not self.done:
            self.paused.resume()
            self.done = True
