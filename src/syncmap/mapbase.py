"""How a store-mode map is opened, forked, observed and closed: the plumbing under the façade.

``SyncMap`` (map.py) is the dict API; this base holds what every operation relies on: the map's
state and executor, the engine (background loops), ``run(flow)``, argument checks, and the life
cycle.  Split from map.py to keep each module one concept (STYLE: ~400 lines).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Self, TypeVar

from .codec import Codec, encode_limited
from .config import MapConfig
from .core.nearcache import SWEEP_ABOVE, Entry, Event, NearCache
from .engine import Engine
from .errors import ConfigurationError, MapClosed
from .feed.routing import open_store_feed
from .flows import admin
from .flows.effects import Flow
from .flows.state import MapState
from .flows.writes import Ref
from .keys import (
    Key,
    Layout,
    LockLayout,
    bucket_of,
    check_lock_name,
    check_node_id,
    encode_key,
    key_lock,
    normal_key,
)
from .lock import Fence, Lock
from .stats import Presence, Statistics, statistics_of
from .store.commands import MapCommands
from .store.eviction import warn_if_evicting
from .store.executor import Executor
from .store.topology import Topology, done_with_executor
from .sync.run import run
from .views import SharedMapping
from .watch import Watch

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("syncmap")
T = TypeVar("T")
FenceArg = Fence | Lock | tuple[str, int]
"""What ``fence=`` takes: the token ``acquire()`` returned, the held ``Lock`` itself, or
``(lock name, token)`` (a token passed on from elsewhere, e.g. ``$SYNCMAP_FENCE``)."""


class MapBase(SharedMapping):
    """The plumbing of :class:`~syncmap.SyncMap` (its ``__init__`` sets these attributes)."""

    name: str
    node_id: str
    config: MapConfig
    _codec: Codec
    _topology: Topology
    _executor: Executor
    _executor_keys: list[tuple[float | None, float | None]]  # (timeout, deadline), per use
    _cmds: MapCommands
    _state: MapState
    _engine: Engine
    _core: NearCache
    _entries: dict[Key, Entry]
    _buckets: int
    _feed_url: str | None
    _auto_node_id: bool

    def _open_layout(self) -> Layout:
        """Load the scripts, agree on the map's settings with the store, warn about eviction."""
        cfg = self.config
        asked = Layout(cfg.namespace, self.name, cfg.buckets)
        opening = admin.open_map(asked, self._codec.name, stamps=cfg.guards.settings_stamp)
        buckets, codec_name = self._run(opening)
        if codec_name != self._codec.name:
            raise ConfigurationError(
                f"map {self.name!r} was created with codec {codec_name!r}, not "
                f"{self._codec.name!r}: every server of a map must use the same codec"
            )
        policy = self._run(admin.eviction_policy())
        if policy is not None:
            warn_if_evicting(self._executor.where, *policy)
        return Layout(cfg.namespace, self.name, buckets)

    def _start(self) -> None:
        cfg = self.config
        if cfg.presence:
            presence = Presence(self.node_id, cfg.presence_interval)
            self._engine.enable_presence(
                # Periodic: the O(1) estimate of hits, not a sum over every entry (issue 16).
                lambda: presence.record(
                    statistics_of(self._core, self._engine.events_dropped, exact=False),
                    int(self._state.server_now_ms()),
                ),
                cfg.presence_interval,
                self._topology.key,
            )
        try:
            self._engine.start(cfg.self_check_timeout)
        except BaseException:
            self._engine.close()
            raise

    def _new_core(self) -> NearCache:
        cfg = self.config
        # Relayed messages (target "") from two writers of one bucket may arrive in either order.
        return NearCache(self._buckets, capacity=cfg.capacity, max_staleness=cfg.max_staleness,
                         guards=cfg.guards, ordered=not self._cmds.relayed,
                         max_stale_age=cfg.stale_age, holds=not cfg.fast_hits,
                         # fast_hits reads no valid_until: a flushed entry must be gone at once
                         sweep_above=None if cfg.fast_hits else SWEEP_ABOVE,
                         absent=cfg.cache_absent)  # fmt: skip

    def _run(self, flow: Flow[T]) -> T:
        return run(flow, self._executor, self._engine.relay if hasattr(self, "_engine") else _no)

    def _after_fork_in_child(self) -> None:
        """In a forked child, before ``fork()`` returns there (``forksafe``): the map starts
        over as if opened in the child.  An empty near cache (the parent's entries would lose
        their guarantees: no subscription vouches for them here), a fresh guard (a parent's
        thread may have held it at the fork), a node id naming the child's pid, and an engine
        that subscribes and starts its threads on the first call (:meth:`_check_open`).  The hit
        path finds nothing cached until then, so every read takes that path."""
        if self._auto_node_id:
            self.node_id = self._cmds.origin = check_node_id(None)
        self._state.core = self._core = self._new_core()
        self._state.guard = threading.Lock()
        self._entries = self._core.entries
        self._engine.forked()

    def _start_in_child(self) -> None:
        """Open this process's own feed and start the engine: a forked child's first call."""
        engine = self._engine
        with engine.start_lock:
            if not engine.needs_start or engine.closed:
                return
            feed, _ = open_store_feed(self._feed_url, self._topology, self._cmds.layout,
                                      self.config.socket_timeout)  # fmt: skip
            try:
                engine.restart(feed, self.config.self_check_timeout)
            except BaseException:
                feed.close()
                raise

    # ---- locks -------------------------------------------------------------------------------

    def lock(self, key: Key, *, lease: float = 30.0, **options: Any) -> Lock:
        """A new :class:`~syncmap.Lock` for ``key`` of this map, on this map's Redis.

        ``with users.lock("alice") as fence: users.set("alice", v, fence=fence)``.  Each call
        makes a new owner; ``options`` are Lock's (``replicas``, ``on_lost``, ...).
        """
        field, _, bucket = self._locate(key)
        name, tag = key_lock(self._cmds.layout, field, bucket, self._topology.sharded)
        # The map's call_timeout bounds its locks' round trips too (each socket operation).
        cfg = self.config
        options.setdefault("socket_timeout", cfg.call_timeout or cfg.socket_timeout)
        return Lock(name, lease=lease, namespace=cfg.namespace, topology=self._topology,
                    hash_tag=tag, **options)  # fmt: skip

    def _fence_of(self, fence: FenceArg | None) -> tuple[str, str, int] | None:
        return fence_args(fence, self.config.namespace)

    # ---- events, statistics, life cycle ------------------------------------------------------

    def subscribe(
        self, callback: Callable[[Event], None], *, inline: bool = False
    ) -> Callable[[], None]:
        """Call ``callback(event)`` for every change from any server; returns an unsubscriber.

        Callbacks run on a thread of their own, so a slow one never delays invalidations.
        ``inline=True`` runs it on the feed thread the moment the change is applied (lowest
        latency): it must be quick and must not block or call back into the map's I/O.
        """
        self._check_open()
        return self._engine.subscribe(callback, inline)

    def watch(self, maxsize: int = 10_000) -> Watch:
        """Iterate over change events as they happen: ``with m.watch() as events: ...``."""
        self._check_open()
        return Watch(self._engine, self._engine.watch_queue(maxsize))

    def statistics(self) -> Statistics:
        return statistics_of(self._core, self._engine.events_dropped)

    def __repr__(self) -> str:
        s = self.statistics()
        state = "closed" if self._engine.closed else "open"
        return (
            f"<SyncMap {self.name!r} {state} on {self._executor.where}: {s.entries} cached, "
            f"hits={s.hits} misses={s.misses} invalidations={s.invalidations} "
            f"resyncs={s.resyncs}>"
        )

    def close(self) -> None:
        """Stop the background threads and drop the near cache.  Idempotent."""
        if not self._engine.closed:
            self._engine.close()
            with self._state.guard:
                self._core.forget_all()
            # Shared with the process's other maps (store/topology.py use_executor): the last
            # map to close closes their idle connections.
            for timeout, deadline in self._executor_keys:
                done_with_executor(self._topology, timeout, deadline)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- helpers -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._engine.closed:
            raise MapClosed(f"map {self.name!r} is closed; open a new SyncMap")
        if self._engine.needs_start:
            self._start_in_child()
        self._engine.raise_background_error()

    def _locate(self, key: Key) -> Ref:
        self._check_open()
        field = encode_key(key, self.config.max_key_bytes)
        return Ref(field, normal_key(key), bucket_of(field, self._buckets))

    def _payload(self, value: Any) -> bytes:
        return encode_limited(self._codec, value, self.config.max_value_bytes)


def fence_args(fence: Any, namespace: str) -> tuple[str, str, int] | None:
    """(lock name, fence counter key, token) for the write scripts, from what ``fence=`` takes:
    a Fence, a held lock of either driver (anything with a ``fence`` Fence), or (name, token)."""
    if fence is None:
        return None
    if not isinstance(fence, Fence | tuple) and isinstance(getattr(fence, "fence", None), Fence):
        fence = fence.fence  # LockLost here if its lease ran out
    if isinstance(fence, Fence):
        return fence.lock, fence.key, int(fence)
    if (
        isinstance(fence, tuple) and len(fence) == 2 and isinstance(fence[0], str)
        and isinstance(fence[1], int) and not isinstance(fence[1], bool)
    ):  # fmt: skip
        name, token = fence
        return name, LockLayout(namespace, check_lock_name(name)).fence, token
    raise TypeError(
        f"fence must be the Fence that Lock.acquire() returned, a Lock, or (lock name, "
        f"token), not {fence!r}"
    )


def _no(messages: list[bytes]) -> None:
    raise AssertionError("no feed yet: nothing may be published while the map opens")
