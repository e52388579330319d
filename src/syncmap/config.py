"""Settings of a map, grouped so no constructor grows past a handful of parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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
    cache_absent: bool = True
    """Cache "no such key" too: a read that finds no field leaves an *absent marker* in the near
    cache, under the same lease and fill-race rules as a value, so the next read of that key
    is answered locally (docs/design.md, "Absent keys").  Markers count against ``capacity``."""
    presence: bool = True
    """Refresh a small presence and statistics record in Redis (``syncmap top`` reads it)."""
    presence_interval: float = 10.0
    """Seconds between presence refreshes; readers ignore a record older than three of them.
    10 s (2 s before issue 16): each refresh is a command per map on Redis, which an idle fleet
    of 1,000 processes x 10 maps paid as 10,000 commands/s; ``syncmap top`` shows rates over
    this period, and a server that died lingers there up to three of them."""
    on_store_down: Literal["raise", "serve_stale"] = "raise"
    """When Redis is unreachable or hung: ``"raise"`` (the strict contract) serves cached reads
    until their lease lapses (at most ``max_staleness``), then raises ``StoreUnavailable``;
    ``"serve_stale"`` keeps serving what is cached, flagged (``get_with_meta`` says ``"stale"``)
    and counted (``statistics().stale_reads``), up to ``max_stale_age``.  docs/outages.md."""
    max_stale_age: float = 60.0
    """serve_stale only: no read is older than this (seconds since Redis last vouched for its
    bucket).  Must exceed ``max_staleness``."""
    call_timeout: float | None = None
    """A deadline for each call's round trip to Redis (connect, send, reply and the one retry
    of a read), in seconds: a hung Redis costs a call at most this long.  None: each socket
    operation waits up to ``socket_timeout`` instead (a read may then wait for two)."""
    wait_replicas: int = 0
    """Durability: after each write, wait until this many replicas hold it (Redis ``WAIT``, in the
    same round trip).  0 (default): asynchronous replication; a failover may lose writes
    acknowledged just before it.  A write that fewer replicas confirmed within ``wait_timeout``
    raises :class:`~syncmap.errors.NotReplicated`: it was applied on the master and may or may
    not survive a failover.  docs/deploying.md, Sentinel."""
    wait_timeout: float = 0.5
    """Seconds a write waits for ``wait_replicas`` replicas (``WAIT``'s timeout)."""
    ping_leases: bool = True
    """Renew the near cache's leases by PINGs on the process's shared subscriber connection
    instead of probing every bucket every ``max_staleness / 4`` (docs/design.md, "PING
    leases"): on the in-script routes of a standalone or Sentinel Redis (the map's channel)
    and of a Cluster (each bucket's sharded channel; each master's connection vouches for its
    own buckets), both drivers, where Redis allows ``CLIENT TRACKING``.  Elsewhere (relayed
    feeds, streams) maps probe as before.  False: always probe (the old behaviour)."""
    feed_turn: float = 0.0002
    """A thread that reads the map without ever releasing the GIL (a CPU-bound loop of hits)
    checks about this often (seconds) whether the feed's connection has a change waiting, and
    if so waits until the feed's thread has applied it (docs/design.md, "CPU-bound readers"):
    the next hit then sees the write, instead of up to the GIL switch interval (5 ms) later.
    Costs one slow-path call (~2 us) per period while a thread reads.  0: off.  The Redis
    pub/sub and sharded pub/sub feeds only; not with ``fast_hits`` (its hits read no clock)."""
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
        self._check_outage_policy()
        if not 0 <= self.wait_replicas <= 100 or not 0.001 <= self.wait_timeout <= 60:
            raise ConfigurationError(
                f"wait_replicas={self.wait_replicas}, wait_timeout={self.wait_timeout}: use "
                "0..100 replicas and 0.001..60 s"
            )
        if self.feed_turn != 0 and not 0.00001 <= self.feed_turn <= 1:
            raise ConfigurationError(f"feed_turn={self.feed_turn}: use 0 (off) or 0.00001..1 s")
        if self.max_value_bytes > 512 * 1024 * 1024:
            raise ConfigurationError("max_value_bytes cannot exceed Redis's 512 MiB string limit")

    def _check_outage_policy(self) -> None:
        if self.on_store_down not in ("raise", "serve_stale"):
            raise ConfigurationError(
                f"on_store_down={self.on_store_down!r}: use 'raise' or 'serve_stale'"
            )
        serve_stale = self.on_store_down == "serve_stale"
        if serve_stale and not self.max_staleness < self.max_stale_age <= 86400:
            raise ConfigurationError(
                f"max_stale_age={self.max_stale_age}: use more than max_staleness "
                f"({self.max_staleness} s) and at most 86400 s"
            )
        if self.call_timeout is not None and not 0.01 <= self.call_timeout <= 3600:
            raise ConfigurationError(f"call_timeout={self.call_timeout}: use 0.01..3600 s")
        if self.fast_hits and serve_stale:
            raise ConfigurationError(
                "fast_hits=True skips the clock on hits, so it cannot tell a stale entry from a "
                "fresh one: choose fast_hits or on_store_down='serve_stale'"
            )

    @property
    def stale_age(self) -> float:
        """``max_stale_age`` in serve_stale mode, else 0 (strict)."""
        return self.max_stale_age if self.on_store_down == "serve_stale" else 0.0

    @property
    def probe_interval(self) -> float:
        return self.max_staleness / 4

    @property
    def probe_deadline(self) -> float:
        """How long a Cluster map's probe waits for its masters: the probe interval (Δ/4), or
        ``call_timeout`` if shorter.  Why: with one master hung, every probe waits this long
        for it before the other masters' answers renew their buckets' leases, each to the
        probe's send time + Δ.  Probes then leave every max(Δ/4, wait) and are applied a wait
        later, so the answering buckets stay covered only while 2 x wait < Δ - margin; waiting
        ``call_timeout`` (or ``socket_timeout``, 5 s) would let every bucket lapse."""
        interval = self.probe_interval
        return interval if self.call_timeout is None else min(interval, self.call_timeout)
