"""Settings of a map, grouped so no constructor grows past a handful of parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

from .core.nearcache import Guards
from .errors import ConfigurationError


@dataclass(frozen=True, slots=True)
class MapConfig:
    """Tunables of one :class:`~syncmap.SyncMap`.  The defaults suit most services.

    ``max_staleness`` is the contract: a cached read reflects every write acknowledged more than
    this many seconds earlier, whatever happens to the feed.  Probes run every quarter of it.
    """

    buckets: int = 16
    capacity: int = 100_000
    max_staleness: float = 1.0
    max_key_bytes: int = 64 * 1024
    max_value_bytes: int = 8 * 1024 * 1024
    namespace: str = "sm"
    transform_retries: int = 32
    self_check_timeout: float = 5.0
    socket_timeout: float = 5.0
    fast_hits: bool = False
    """Skip the clock on cache hits: faster, but a paused process may serve an expired entry
    until its timer thread runs (see ``SyncMap`` docs).  Off by default."""
    presence: bool = True
    """Refresh a small presence and statistics record in Redis (``syncmap top`` reads it)."""
    presence_interval: float = 2.0
    """Seconds between presence refreshes; readers ignore a record older than three of them."""
    guards: Guards = field(default_factory=Guards)
    """Test-only: switch one protection off to prove a scenario test catches the bug."""

    def __post_init__(self) -> None:
        if not 1 <= self.buckets <= 4096:
            raise ConfigurationError(f"buckets={self.buckets}: use 1..4096")
        if self.capacity < 0:
            raise ConfigurationError(f"capacity={self.capacity}: use 0 (no cache) or more")
        if not 0.01 <= self.max_staleness <= 3600:
            raise ConfigurationError(f"max_staleness={self.max_staleness}: use 0.01..3600 s")
        if not 0.05 <= self.presence_interval <= 3600:
            raise ConfigurationError(
                f"presence_interval={self.presence_interval}: use 0.05..3600 s"
            )
        if self.max_value_bytes > 512 * 1024 * 1024:
            raise ConfigurationError("max_value_bytes cannot exceed Redis's 512 MiB string limit")

    @property
    def probe_interval(self) -> float:
        return self.max_staleness / 4
