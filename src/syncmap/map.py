"""``SyncMap``: a dict shared by many servers, near-cached, with Redis as the source of truth.

This is the façade: argument checks, the lock-free hit path, and ``run(flow)`` for everything
else.  Every operation that reaches Redis is a flow (``syncmap.flows``), run by the thread driver
(``syncmap.sync.run``) against the map's executor (``syncmap.store``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import redis as redis_lib

from . import forksafe
from .codec import Codec, make_codec
from .config import MapConfig
from .core.nearcache import COPY, INF, Entry, NearCache, is_absent
from .core.wire import unpack_value
from .engine import Engine
from .errors import ConfigurationError
from .feed.routing import open_store_feed
from .flows import bulk, reads, writes
from .flows.effects import Flow
from .flows.reads import MISSING
from .flows.state import MapState
from .flows.writes import ttl_ms
from .keys import (
    Entries,
    Key,
    check_map_name,
    check_node_id,
    encode_key,
    normal_key,
)
from .leasing import lease_prefix
from .mapbase import FenceArg, MapBase
from .signing import SigningKey, pads, signing_keys
from .stats import Statistics
from .store.commands import MapCommands
from .store.topology import Topology, open_topology, use_executor
from .watch import Watch

log = logging.getLogger("syncmap")
_MISSING: Any = MISSING
_monotonic = time.monotonic
T = TypeVar("T")
TURN_WAIT = 0.005  # how long a reading thread waits for the feed thread (one switch interval)
TURN_BACKOFF = 0.05  # after a turn that was not taken: check again this much later

__all__ = ["FenceArg", "Statistics", "SyncMap", "Watch"]


class SyncMap(MapBase):
    """A ``MutableMapping`` kept in sync across servers: store mode.  See README, docs/design.md.

    Reads are served from this server's near cache when they can be (nanoseconds), otherwise from
    Redis; every write is one atomic Lua round trip that also publishes the change to every server.
    ``feed=`` picks the change feed (default: Redis pub/sub on the store); for replicated mode
    (no store) use :class:`~syncmap.ReplicatedMap`, or :func:`~syncmap.open_map` to choose by
    ``SYNCMAP_URL``.
    """

    def __init__(
        self,
        name: str,
        url: str | None = None,
        *,
        redis: redis_lib.Redis | None = None,
        codec: str | Codec | None = None,
        value_type: Any = None,
        config: MapConfig | None = None,
        node_id: str | None = None,
        feed: str | None = None,
        signing_key: SigningKey = None,
    ) -> None:
        # Nine parameters, one past STYLE's budget: each is a different concern a user sets at
        # open (where, how values are encoded, settings, identity, feed, message signing).
        self.name = check_map_name(name)
        self._keys = signing_keys(signing_key)
        self.config = cfg = config or MapConfig()
        self._auto_node_id = node_id is None  # a new one in a forked child (it names the pid)
        self.node_id = check_node_id(node_id)
        self._codec = make_codec(codec, value_type)
        if cfg.fast_hits:  # the same map with a hit path that skips the clock (see the class)
            self.__class__ = _FastHitsSyncMap
        self._topology = _open_store(url, redis, feed, cfg.socket_timeout)
        # The process's executor for this topology and these timeouts, shared with its other
        # maps, locks and feeds (store/topology.py use_executor): idle maps hold no connection
        # each.  A Cluster map probes through a view of it (``within``): the same connections,
        # each probe waiting at most ``probe_deadline``, as one hung master must not hold
        # every probe past the other buckets' leases (MapConfig.probe_deadline says why).
        self._executor_keys = [(cfg.socket_timeout, cfg.call_timeout)]
        executor = use_executor(self._topology, cfg.socket_timeout, cfg.call_timeout)
        cluster = self._topology.kind == "cluster"
        self._executor = executor
        self._probe_executor = executor.within(cfg.probe_deadline) if cluster else executor
        layout = self._open_layout()
        feed_obj, target = open_store_feed(feed, self._topology, layout, cfg.socket_timeout)
        self._cmds = MapCommands(layout, self.node_id, target, codec=self._codec.name,
                                 flags=cfg.guards.script_flags(),
                                 isolate_damage=cfg.guards.damage_isolated,
                                 pads=pads(self._keys[0]) if self._keys else b"")  # fmt: skip
        self._buckets = layout.buckets
        self._feed_url = feed
        self._state = MapState(self.name, self._new_core(), self._cmds, self._codec, cfg)
        # The hit path reads these two directly (one attribute each): the fork hook renews them.
        self._core = self._state.core
        self._entries = self._core.entries
        prefix = lease_prefix(target, layout, cfg.ping_leases)  # PING leases, or None
        self._engine = Engine(self._state, self._executor, cfg.probe_interval, feed_obj,
                              self._keys, prober=self._probe_executor,
                              lease_prefix=prefix)  # fmt: skip
        self._state.wake_timer = self._engine.wake_timer
        self._start()
        forksafe.register(self)

    # ---- reads -------------------------------------------------------------------------------

    def __getitem__(self, key: Key) -> Any:
        # The hit path: no lock; one clock read against the earliest lease/TTL deadline, read
        # *before* the entry.  The other order can interleave with the timer: get e; tick lapses
        # every lease, flushes e and sets valid_until to +inf; then e would pass the check.
        valid_until = self._core.valid_until
        try:
            e = self._entries.get(key)
        except TypeError:  # unhashable: the slow path raises KeyTypeError
            e = None
        if e is not None and key.__class__ is e.kc and _monotonic() < valid_until:
            e.hits += 1
            v = e.value
            if v is not COPY:
                return v
            raw = e.raw
            if raw is None:  # an absent marker (core.nearcache.ABSENT_VERSION): known absent
                raise KeyError(key)
            return self._codec.decode(raw)
        return self._load(key)

    def _load(self, key: Key) -> Any:
        """A miss: read through (and maybe cache), or ``KeyError``."""
        value, _, _ = self._fetch(key, consistent=False)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def get(self, key: Key, default: Any = None, *, consistent: bool = False) -> Any:
        """The value of ``key`` or ``default``; ``consistent=True`` reads through to Redis."""
        if not consistent:
            valid_until = self._core.valid_until  # before the entry: see __getitem__
            try:
                e = self._entries.get(key)
            except TypeError:  # unhashable: the slow path raises KeyTypeError
                e = None
            if e is not None and key.__class__ is e.kc and _monotonic() < valid_until:
                e.hits += 1
                v = e.value
                if v is not COPY:
                    return v
                raw = e.raw
                return default if raw is None else self._codec.decode(raw)  # None: absent
        value, _, _ = self._fetch(key, consistent=consistent)
        return default if value is _MISSING else value

    def get_with_meta(self, key: Key, *, consistent: bool = False) -> tuple[Any, int, str]:
        """(value or None, version or 0, provenance): the read and where it came from.

        Provenance: ``"local"`` (the near cache, within ``max_staleness``), ``"redis"``, or
        ``"stale"``: served from the near cache while Redis was unreachable, with
        ``on_store_down="serve_stale"``: older than ``max_staleness`` may be, older than
        ``max_stale_age`` never (docs/outages.md).  For tests and checkers: versions let a
        history be checked for staleness and order.
        """
        e = None if consistent else self._servable(key, self._core.valid_until)
        if e is not None:
            e.hits += 1
            if is_absent(e):
                return None, 0, "local"
            v = e.value if e.value is not COPY else self._codec.decode(e.raw)  # type: ignore[arg-type]
            return v, e.version, "local"
        value, version, source = self._fetch(key, consistent=consistent)
        return (None if value is _MISSING else value), version, source

    def _servable(self, key: Key, valid_until: float | None = None) -> Entry | None:
        """The cached entry a hit may serve, or None (``__getitem__`` and ``get`` inline this).

        Against ``fresh_until`` (leases and TTLs) unless given the hit path's ``valid_until``,
        which is also earlier when the next turn of the feed is due (:meth:`_feed_turn`): tests
        and tools ask whether an entry *may* be served, not whether the slow path is due."""
        if valid_until is None:
            valid_until = self._core.fresh_until  # before the entry: see __getitem__
        try:
            e = self._entries.get(key)
        except TypeError:  # unhashable: the slow path raises KeyTypeError
            return None
        if e is not None and key.__class__ is e.kc and _monotonic() < valid_until:
            return e
        return None

    def _fetch(self, key: Key, *, consistent: bool) -> tuple[Any, int, str]:
        """A read that missed the hit path: (value or _MISSING, version, provenance)."""
        leasing = self._engine.leasing
        if leasing is not None:  # the map is read: its vouches at the busy pace (leasing.py)
            leasing.demand(_monotonic())
        if _monotonic() >= self._core.check_at and not consistent:
            e = self._feed_turn(key)
            if e is not None:  # a hit after all: the hit path's check_at had come
                e.hits += 1
                if is_absent(e):
                    return _MISSING, 0, "local"
                v = e.value if e.value is not COPY else self._codec.decode(e.raw)  # type: ignore[arg-type]
                return v, e.version, "local"
        ref = self._locate(key)
        return self._run(reads.read(self._state, ref.field, ref.key, ref.bucket,
                                    consistent=consistent))  # fmt: skip

    def _feed_turn(self, key: Key) -> Entry | None:
        """Every ``feed_turn`` seconds of hits, the slow path gives the feed's thread its turn:
        if a change waits in its socket, this thread waits (GIL released) until it has been
        applied (docs/design.md, "CPU-bound readers").  Then the entry ``key`` may be served
        from, or None.  A feed whose subscription cannot take turns switches this off."""
        leasing = self._engine.leasing
        # With idle leases, hits pass here at least every ``recheck``: how reads that all hit
        # keep the map busy (``_fetch`` calls ``demand``).
        at = INF if leasing is None or not leasing.idles else _monotonic() + leasing.recheck
        sub = self._engine.subscription
        if self.config.feed_turn and (sub is None or sub.turns):
            taken = sub is None or sub.give_turn(TURN_WAIT)
            at = min(at, _monotonic() + (self.config.feed_turn if taken else TURN_BACKOFF))
        with self._state.guard:
            self._core.recheck(at)
        return self._servable(key)

    def _new_core(self) -> NearCache:
        core = super()._new_core()
        if not self.config.fast_hits:  # the first read's slow path asks the feed (_feed_turn)
            core.check_at = -INF
        return core

    def peek(self, key: Key) -> tuple[Any, int] | None:
        """(value, version) from this server's near cache only; no I/O.  For tests and tools."""
        encode_key(key, self.config.max_key_bytes)  # refuses a bad key with KeyTypeError
        e = self._core.cached_entry(normal_key(key))  # not a flushed one awaiting its sweep
        if e is None:
            return None
        return (e.value if e.value is not COPY else self._codec.decode(e.raw)), e.version  # type: ignore[arg-type]

    # ---- writes ------------------------------------------------------------------------------

    def __setitem__(self, key: Key, value: Any) -> None:
        self.set(key, value)

    def set(self, key: Key, value: Any, *, ttl: float | None = None, fence: FenceArg | None = None
            ) -> int:  # fmt: skip
        """Store ``value``; returns its version.  ``ttl`` in seconds; ``fence`` see docs/locks."""
        data = self._payload(value)
        version, _ = self._set(key, data, "set", "", ttl, fence, value)
        return version

    def swap(self, key: Key, value: Any, default: Any = None, *, ttl: float | None = None,
             fence: FenceArg | None = None) -> Any:  # fmt: skip
        """Store ``value`` and return the previous value (or ``default``)."""
        _, old = self._set(key, self._payload(value), "swap", "", ttl, fence)
        return default if old is None else self._codec.decode(unpack_value(old)[2])

    def setdefault(self, key: Key, default: Any = None, *, ttl: float | None = None,
                   fence: FenceArg | None = None) -> Any:  # fmt: skip
        """The value of ``key``, storing ``default`` first if absent (Go's LoadOrStore)."""
        version, old = self._set(key, self._payload(default), "nx", "", ttl, fence)
        return default if version else self._codec.decode(unpack_value(old)[2])  # type: ignore[arg-type]

    def compare_and_set(self, key: Key, expected: Any, new: Any, *, ttl: float | None = None,
                        fence: FenceArg | None = None) -> bool:  # fmt: skip
        """Store ``new`` only if ``key`` holds a value equal to ``expected``; atomic."""
        ref, data, ms, fenced = (
            self._locate(key),
            self._payload(new),
            ttl_ms(ttl),
            self._fence_of(fence),
        )

        def attempt(mode: str, arg: bytes | str) -> Flow[tuple[int, bytes | None]]:
            return writes.set_value(self._state, ref, data, ttl_ms=ms, mode=mode,
                                    expected=arg, fence=fenced)  # fmt: skip

        return self._run(writes.compare(self._state, key, expected, "cas", attempt))

    def _set(self, key: Key, data: bytes, mode: str, expected: bytes | str,
             ttl: float | None, fence: FenceArg | None, value: Any = _MISSING
             ) -> tuple[int, bytes | None]:  # fmt: skip
        flow = writes.set_value(self._state, self._locate(key), data, ttl_ms=ttl_ms(ttl),
                                mode=mode, expected=expected, fence=self._fence_of(fence),
                                value=value)  # fmt: skip
        return self._run(flow)

    def pop(self, key: Key, default: Any = _MISSING, *, fence: FenceArg | None = None) -> Any:
        """Remove ``key`` and return its value (Go's LoadAndDelete)."""
        version, old = self._delete(key, fence)
        if not version:
            if default is _MISSING:
                raise KeyError(key)
            return default
        return self._codec.decode(unpack_value(old)[2])  # type: ignore[arg-type]

    def __delitem__(self, key: Key) -> None:
        if not self._delete(key, None)[0]:
            raise KeyError(key)

    def delete(self, key: Key, *, fence: FenceArg | None = None) -> bool:
        """Remove ``key``; returns whether it existed."""
        return bool(self._delete(key, fence)[0])

    def compare_and_delete(self, key: Key, expected: Any, *, fence: FenceArg | None = None) -> bool:
        """Remove ``key`` only if it holds a value equal to ``expected``; atomic."""
        ref, fenced = self._locate(key), self._fence_of(fence)

        def attempt(mode: str, arg: bytes | str) -> Flow[tuple[int, bytes | None]]:
            return writes.delete(self._state, ref, mode=mode, expected=arg, fence=fenced)

        return self._run(writes.compare(self._state, key, expected, "cad", attempt))

    def _delete(self, key: Key, fence: FenceArg | None) -> tuple[int, bytes | None]:
        ref = self._locate(key)
        return self._run(writes.delete(self._state, ref, fence=self._fence_of(fence)))

    def transform(self, key: Key, fn: Callable[[Any], Any], default: Any = _MISSING, *,
                  ttl: float | None = None, fence: FenceArg | None = None) -> Any:  # fmt: skip
        """Atomically replace the value with ``fn(value)`` (optimistic, retried); returns it.

        ``fn`` may run more than once: keep it free of side effects.
        """
        flow = writes.transform(self._state, self._locate(key), key, fn, default,
                                ttl_ms=ttl_ms(ttl), fence=self._fence_of(fence))  # fmt: skip
        return self._run(flow)

    def update(  # type: ignore[override]
        self, other: Entries = (), /, *,
        ttl: float | None = None, fence: FenceArg | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        """Store many entries in one round trip (each bucket's part is atomic)."""
        pairs = other.items() if isinstance(other, Mapping) else other
        fenced = self._fence_of(fence)
        self._check_open()
        items = writes.items_of([*pairs, *kwargs.items()], self._state)
        if items:
            replies = self._run(writes.update(self._state, items, ttl_ms=ttl_ms(ttl),
                                              fence=fenced))  # fmt: skip
            writes.raise_partial(replies, "update()")

    def clear(self, *, fence: FenceArg | None = None) -> None:
        """Remove every entry (each bucket atomically; buckets one after another)."""
        self._check_open()
        replies = self._run(writes.clear(self._state, fence=self._fence_of(fence)))
        writes.raise_partial(replies, "clear()")

    # ---- whole-map reads (each one round trip; views and ``|`` in views.py) ------------------

    def copy(self, *, skip_corrupt: bool = False) -> dict[Key, Any]:
        """A plain dict of every live entry, read in one round trip (not one atomic moment).

        ``keys()``, ``items()`` and ``values()`` are live views that read one such snapshot per
        operation.  An entry stored in Redis that does not decode (written by something else, or
        with another codec) raises :class:`CorruptData` naming it; ``skip_corrupt=True`` leaves
        it out instead, counts it (``statistics().corrupt_entries``) and logs it (rate-limited).
        The views take the same keyword; ``iter(m)`` raises."""
        self._check_open()
        return self._run(bulk.snapshot(self._state, skip_corrupt=skip_corrupt))

    def _popitem_candidates(self) -> list[Key]:
        self._check_open()
        return self._run(bulk.pop_candidates(self._state))

    def preload(self, *, limit: int | None = None, retries: int = 3) -> int:
        """Fill this server's near cache with the whole map (up to ``capacity`` or ``limit``
        entries), a few buckets per round trip; returns how many entries it cached.

        Each bucket is installed whole or not at all: a bucket that changed while it was being
        read (a change message, a probe, a write from here) is read again, up to ``retries``
        times, and otherwise left to fill on demand (``NearCache.install_bulk`` says why).
        An entry that does not decode is left out (as ``items(skip_corrupt=True)`` does): it
        is counted each time it is read, logged at most once a minute, and reading that key
        raises :class:`CorruptData`.
        """
        self._check_open()
        cap = min(self.config.capacity, limit if limit is not None else self.config.capacity)
        return self._run(bulk.preload(self._state, cap, retries))

    def __iter__(self) -> Iterator[Key]:
        return iter(self.copy())

    def __len__(self) -> int:
        """Live entries in Redis: one probe round trip (which also renews this server's leases),
        or none when this map counted less than ``max_staleness`` ago and has since neither
        written nor heard of a change: that count is then a read within the staleness contract
        (as fresh as a cached hit), and this server's own writes are in it."""
        self._check_open()
        core = self._core
        counted = self.__dict__.get("_counted") or (None, -1, -INF, 0)
        changes = core._writes + core.counters.messages  # both only grow
        if counted[:2] == (core, changes) and _monotonic() < counted[2] + self.config.max_staleness:
            return int(counted[3])
        sent = _monotonic()  # taken before the probe, as `changes` was: the conservative side
        self._engine.probe_once()
        n = self._engine.live_entries
        self._counted = (core, changes, sent, n)
        return n

    def __bool__(self) -> bool:
        """No I/O when this server caches a servable entry (a hit would prove the map held it
        within ``max_staleness``); otherwise ``len(self) > 0``."""
        if self._core.values_cached() and _monotonic() < self._core.fresh_until:
            return True
        return len(self) > 0

    def __contains__(self, key: object) -> bool:
        return self.get(key, _MISSING) is not _MISSING  # type: ignore[arg-type]


class _FastHitsSyncMap(SyncMap):
    """``MapConfig(fast_hits=True)``: hits skip the clock read (about 60 ns, most of a hit).

    Leases and TTLs are then enforced only by the timer thread.  A process that was paused
    (SIGSTOP, a long GIL-holding call) may serve a hit or two that expired during the pause
    before that thread runs.  Choose it when those microseconds matter more than that window.
    """

    def __getitem__(self, key: Key) -> Any:
        try:
            e = self._entries.get(key)
        except TypeError:  # unhashable: the slow path raises KeyTypeError
            e = None
        if e is not None and key.__class__ is e.kc:
            e.hits += 1
            v = e.value
            if v is not COPY:
                return v
            raw = e.raw
            if raw is None:  # an absent marker: known absent
                raise KeyError(key)
            return self._codec.decode(raw)
        return self._load(key)


def _open_store(url: str | None, redis: redis_lib.Redis | None, feed: str | None,
                timeout: float | None) -> Topology:  # fmt: skip
    """The store's topology.  No store but a feed: the error names replicated mode's classes
    (``SyncMap`` is store mode only; it never falls back to replicated mode)."""
    try:
        return open_topology(url, redis, timeout=timeout)
    except ConfigurationError as exc:
        if feed is None or "no Redis given" not in str(exc):
            raise
        raise ConfigurationError(
            f"{exc}. SyncMap is store mode; for replicated mode (a feed and no store) open "
            f"ReplicatedMap(name, {feed!r}), or open_map(name, feed=...) to choose by SYNCMAP_URL"
        ) from None
