"""What every flow of one map works on: its near cache, guard, commands, codec and clocks."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..codec import Codec, MsgpackCodec
from ..config import MapConfig
from ..core.nearcache import NearCache
from ..errors import CorruptData
from ..ratelog import RateLimitedLog
from ..store.commands import MapCommands

log = logging.getLogger("syncmap")


def _nothing() -> None:
    return None


@dataclass(slots=True, eq=False)
class MapState:
    """One map's shared state.  ``core`` and ``guard`` are replaced in a forked child (the map's
    ``_after_fork_in_child``), so flows read them from here each time, never keep them.

    ``guard`` protects ``core``; flows hold it only between yields.  ``wake_timer`` tells the
    driver's timer that a new deadline exists (a TTL was cached); it must not block.
    """

    name: str
    core: NearCache
    cmds: MapCommands
    codec: Codec
    config: MapConfig
    guard: Any = field(default_factory=threading.Lock)
    wake_timer: Callable[[], None] = _nothing
    clock: Callable[[], float] = time.monotonic
    server_offset_ms: float = 0.0
    """Redis's clock minus ours (ms), measured by each probe; TTL deadlines are Redis's."""
    live_entries: int = 0
    """Live entries in Redis at the last probe (``len()``)."""
    corrupt_log: RateLimitedLog = field(default_factory=lambda: RateLimitedLog(log))

    @property
    def plain_codec(self) -> bool:
        """MessagePack without a value type gives these scalars back unchanged (JSON does not:
        it turns inf into null), so a writer may cache what it wrote without decoding it."""
        return isinstance(self.codec, MsgpackCodec) and self.codec.value_type is None

    @property
    def wait(self) -> tuple[int, int] | None:
        """(replicas, timeout ms) for ``WAIT`` after each write, or None (no waiting)."""
        n = self.config.wait_replicas
        return (n, max(1, round(self.config.wait_timeout * 1000))) if n else None

    def server_now_ms(self) -> float:
        return time.time() * 1000 + self.server_offset_ms

    def local_deadline(self, deadline_ms: int, now: float) -> float:
        """Convert a Redis-clock deadline (ms) into this process's monotonic clock."""
        return now + (deadline_ms - self.server_now_ms()) / 1000

    def corrupt_entry(self, field_: bytes, exc: Exception, *, skip: bool) -> None:
        """A stored entry that does not decode: raise, or count it, log it and go on."""
        if not skip:
            raise CorruptData(
                f"entry {field_[:60]!r} of map {self.name!r} does not decode ({exc}); "
                "items(skip_corrupt=True) lists the others"
            ) from exc
        self.core.counters.corrupt_entries += 1
        self.corrupt_log(
            "syncmap map %r: left out a corrupt entry %r (%s; %d so far)",
            self.name, field_[:60], exc, self.core.counters.corrupt_entries,
        )  # fmt: skip
