"""``syncmap.aio.SyncMap``: the store-mode map for asyncio services — drivers only.

Every operation is the same flow the thread driver runs (``syncmap.flows``), driven by the
asyncio driver (``aio/run.py``) against an ``AsyncNodeExecutor``; the feed logic is the thread
engine's (``changes.py``).  What is the façade's own: no I/O in the constructor (open it with
``await SyncMap(...)``, ``async with SyncMap(...) as m`` or ``await m.open()``), coroutines for
everything that may reach Redis, and :meth:`get_cached` for the hit path without an ``await``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Generator, Mapping
from typing import Any, Self, TypeVar

import redis as redis_lib

from ..codec import Codec, encode_limited, make_codec
from ..config import MapConfig
from ..core.nearcache import COPY, INF, SWEEP_ABOVE, Entry, Event, NearCache, is_absent
from ..core.wire import unpack_value
from ..errors import ConfigurationError, MapClosed
from ..feed.arouting import open_async_store_feed  # at import: not on the loop at open()
from ..flows import admin, bulk, reads, writes
from ..flows.effects import Flow
from ..flows.reads import MISSING
from ..flows.state import MapState
from ..flows.writes import Ref, ttl_ms
from ..keys import (
    Entries,
    Key,
    Layout,
    bucket_of,
    check_map_name,
    check_node_id,
    encode_key,
    key_lock,
    normal_key,
)
from ..leasing import lease_prefix
from ..mapbase import fence_args
from ..signing import SigningKey, pads, signing_keys
from ..stats import Presence, Statistics, statistics_of
from ..store.commands import MapCommands
from ..store.eviction import warn_if_evicting
from ..store.topology import Topology, open_topology
from .engine import AsyncEngine
from .events import AsyncWatch
from .lock import Lock
from .run import run

T = TypeVar("T")
_monotonic = time.monotonic
_NOT_OPEN = NearCache(1, capacity=0)  # what the hit path reads before open(): nothing cached


class SyncMap:
    """A map kept in sync across servers, for asyncio: the names of :class:`syncmap.SyncMap`
    as coroutines (``await m.get(k)``, ``await m.set(k, v)``, ...), and ``m.get_cached(k)``."""

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
        # The same nine parameters as syncmap.SyncMap; nothing is opened until open().
        self.name = check_map_name(name)
        self._keys = signing_keys(signing_key)
        self.config = config or MapConfig()
        self.node_id = check_node_id(node_id)
        self._codec = make_codec(codec, value_type)
        self._where = (url, redis, feed)
        self._engine: AsyncEngine | None = None
        self._closed = False
        self._core = _NOT_OPEN  # the hit path reads these two; open() replaces them
        self._entries: dict[Key, Entry] = {}

    # ---- opening and closing -----------------------------------------------------------------

    async def open(self) -> Self:
        """Connect, agree on the map's settings, subscribe and take the baseline probe."""
        if self._engine is not None:
            return self
        cfg, (url, client, feed) = self.config, self._where
        self._topology: Topology = open_topology(url, client, timeout=cfg.socket_timeout)
        self._executor = self._topology.async_executor(deadline=cfg.call_timeout)
        # As the thread driver's SyncMap: a Cluster map's probes wait at most probe_deadline,
        # on the same connections (a view of the executor).
        cluster = self._topology.kind == "cluster"
        self._probe_executor = (self._executor.within(cfg.probe_deadline)
                                if cluster else self._executor)  # fmt: skip
        layout = await self._open_layout()
        feed_obj, target = await open_async_store_feed(feed, self._topology, layout,
                                                       cfg.socket_timeout)  # fmt: skip
        self._cmds = MapCommands(layout, self.node_id, target, codec=self._codec.name,
                                 flags=cfg.guards.script_flags(),
                                 isolate_damage=cfg.guards.damage_isolated,
                                 pads=pads(self._keys[0]) if self._keys else b"")  # fmt: skip
        self._state = MapState(self.name, self._new_core(layout.buckets), self._cmds,
                               self._codec, cfg)  # fmt: skip
        core = self._state.core
        prefix = lease_prefix(target, layout, cfg.ping_leases)  # PING leases, or None
        engine = AsyncEngine(self._state, self._executor, cfg.probe_interval, feed_obj,
                             self._keys, prober=self._probe_executor,
                             lease_prefix=prefix)  # fmt: skip
        self._state.wake_timer = engine.wake_timer
        if cfg.presence:
            presence = Presence(self.node_id, cfg.presence_interval)
            engine.enable_presence(
                # Periodic: the O(1) estimate of hits, not a sum over every entry (issue 16).
                lambda: presence.record(
                    statistics_of(core, engine.events_dropped, exact=False),
                    int(self._state.server_now_ms()),
                ),
                cfg.presence_interval,
            )
        try:
            await engine.start(cfg.self_check_timeout)
        except BaseException:
            await engine.aclose()
            raise
        self._engine = engine
        self._core, self._entries = core, core.entries
        return self

    async def _open_layout(self) -> Layout:
        cfg = self.config
        asked = Layout(cfg.namespace, self.name, cfg.buckets)
        opening = admin.open_map(asked, self._codec.name, stamps=cfg.guards.settings_stamp)
        buckets, codec_name = await run(opening, self._executor)
        if codec_name != self._codec.name:
            raise ConfigurationError(
                f"map {self.name!r} was created with codec {codec_name!r}, not "
                f"{self._codec.name!r}: every server of a map must use the same codec"
            )
        policy = await run(admin.eviction_policy(), self._executor)
        if policy is not None:
            warn_if_evicting(self._executor.where, *policy)
        return Layout(cfg.namespace, self.name, buckets)

    def _new_core(self, buckets: int) -> NearCache:
        cfg = self.config
        core = NearCache(buckets, capacity=cfg.capacity, max_staleness=cfg.max_staleness,
                         guards=cfg.guards, ordered=not self._cmds.relayed,
                         max_stale_age=cfg.stale_age, sweep_above=SWEEP_ABOVE,
                         absent=cfg.cache_absent)  # fmt: skip
        core.check_at = -INF  # the first read passes the slow path (_fetch): the map is busy
        return core

    def __await__(self) -> Generator[Any, None, Self]:
        return self.open().__await__()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the background tasks, close the connections, drop the near cache.  Idempotent."""
        self._closed = True
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.aclose()
            with self._state.guard:
                self._core.forget_all()
            self._core, self._entries = _NOT_OPEN, {}
            await self._executor.aclose()  # and its view's (the probes'): the same connections

    # ---- reads -------------------------------------------------------------------------------

    def get_cached(self, key: Key, default: Any = MISSING) -> Any:
        """The cached value of ``key`` with no I/O and no ``await`` (the sync hit path), or
        ``default`` (``syncmap.aio.MISSING`` unless given) when it is not servable from the
        near cache (then ``await m.get(key)`` reads through) or when the near cache holds the
        key as absent (an absent marker, docs/design.md "Absent keys")."""
        # The sync hit path, inlined (a call costs ~40 ns here): the deadline is read before the
        # entry (see syncmap.SyncMap.__getitem__); a map not open has an empty dict.
        valid_until = self._core.valid_until
        try:
            e = self._entries.get(key)
        except TypeError:
            return default
        if e is not None and key.__class__ is e.kc and _monotonic() < valid_until:
            e.hits += 1
            v = e.value
            if v is not COPY:
                return v
            raw = e.raw
            return default if raw is None else self._codec.decode(raw)  # None: known absent
        return self._cached_slow(key, default)

    def _cached_slow(self, key: Key, default: Any) -> Any:
        """``get_cached`` past the hit path's deadline: if only ``check_at`` had come, the map
        is being read (:meth:`_recheck`), and the entry may be served after all.  No I/O."""
        if self._engine is None or _monotonic() < self._core.check_at:
            return default
        self._recheck(_monotonic())
        e = self._servable(key)
        if e is None:
            return default
        e.hits += 1
        v = e.value
        if v is not COPY:
            return v
        raw = e.raw
        return default if raw is None else self._codec.decode(raw)

    def _recheck(self, now: float) -> None:
        """The map is read (idle leases, leasing.py): its vouches at the busy pace, and hits
        until ``recheck`` from now (``check_at``): how reads that all hit keep the map busy."""
        leasing = None if self._engine is None else self._engine.leasing
        if leasing is not None and leasing.idles:
            leasing.demand(now)
            at = now + leasing.recheck
        else:
            at = INF
        if now >= self._core.check_at:
            with self._state.guard:
                self._core.recheck(at)

    def _servable(self, key: Key) -> Entry | None:
        """The cached entry a hit may serve, or None (as ``syncmap.SyncMap._servable``)."""
        if self._engine is None:
            return None
        valid_until = self._core.valid_until  # before the entry: see syncmap.SyncMap
        try:
            e = self._entries.get(key)
        except TypeError:  # unhashable: the slow path raises KeyTypeError
            return None
        if e is not None and key.__class__ is e.kc and _monotonic() < valid_until:
            return e
        return None

    async def get(self, key: Key, default: Any = None, *, consistent: bool = False) -> Any:
        """The value of ``key`` or ``default``; a cached read does not reach Redis."""
        if not consistent:
            # get_cached, inlined, telling an absent marker (known absent: ``default``, no
            # round trip) from nothing servable (read through).
            valid_until = self._core.valid_until  # before the entry: see syncmap.SyncMap
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
                return default if raw is None else self._codec.decode(raw)
        value, _, _ = await self._fetch(key, consistent=consistent)
        return default if value is MISSING else value

    async def get_with_meta(self, key: Key, *, consistent: bool = False
                            ) -> tuple[Any, int, str]:  # fmt: skip
        """(value or None, version or 0, provenance): as :meth:`syncmap.SyncMap.get_with_meta`."""
        e = None if consistent else self._servable(key)
        if e is not None:
            value, version, source = self._local(e)
            return (None if value is MISSING else value), version, source
        value, version, source = await self._fetch(key, consistent=consistent)
        return (None if value is MISSING else value), version, source

    def _local(self, e: Entry) -> tuple[Any, int, str]:
        """A read served from the near cache: (value or MISSING, version, "local")."""
        e.hits += 1
        if is_absent(e):
            return MISSING, 0, "local"
        v = e.value if e.value is not COPY else self._codec.decode(e.raw)  # type: ignore[arg-type]
        return v, e.version, "local"

    async def contains(self, key: Key) -> bool:
        return await self.get(key, MISSING) is not MISSING

    async def _fetch(self, key: Key, *, consistent: bool) -> tuple[Any, int, str]:
        # The map is read (_recheck); a hit after all when only ``check_at`` had come.
        now = _monotonic()
        due = now >= self._core.check_at
        self._recheck(now)
        if due and not consistent and self._engine is not None:
            e = self._servable(key)
            if e is not None:
                return self._local(e)
        ref = self._locate(key)
        return await self._run(reads.read(self._state, ref.field, ref.key, ref.bucket,
                                          consistent=consistent))  # fmt: skip

    # ---- writes ------------------------------------------------------------------------------

    async def set(self, key: Key, value: Any, *, ttl: float | None = None,
                  fence: Any = None) -> int:  # fmt: skip
        """Store ``value``; returns its version.  As :meth:`syncmap.SyncMap.set`."""
        version, _ = await self._set(key, self._payload(value), "set", "", ttl, fence, value)
        return version

    async def swap(self, key: Key, value: Any, default: Any = None, *, ttl: float | None = None,
                   fence: Any = None) -> Any:  # fmt: skip
        _, old = await self._set(key, self._payload(value), "swap", "", ttl, fence)
        return default if old is None else self._codec.decode(unpack_value(old)[2])

    async def setdefault(self, key: Key, default: Any = None, *, ttl: float | None = None,
                         fence: Any = None) -> Any:  # fmt: skip
        version, old = await self._set(key, self._payload(default), "nx", "", ttl, fence)
        return default if version else self._codec.decode(unpack_value(old)[2])  # type: ignore[arg-type]

    async def compare_and_set(self, key: Key, expected: Any, new: Any, *,
                              ttl: float | None = None, fence: Any = None) -> bool:  # fmt: skip
        ref, data, ms, fenced = (
            self._locate(key),
            self._payload(new),
            ttl_ms(ttl),
            fence_args(fence, self.config.namespace),
        )

        def attempt(mode: str, arg: bytes | str) -> Flow[tuple[int, bytes | None]]:
            return writes.set_value(self._state, ref, data, ttl_ms=ms, mode=mode,
                                    expected=arg, fence=fenced)  # fmt: skip

        return await self._run(writes.compare(self._state, key, expected, "cas", attempt))

    async def _set(self, key: Key, data: bytes, mode: str, expected: bytes | str,
                   ttl: float | None, fence: Any, value: Any = MISSING
                   ) -> tuple[int, bytes | None]:  # fmt: skip
        flow = writes.set_value(self._state, self._locate(key), data, ttl_ms=ttl_ms(ttl),
                                mode=mode, expected=expected,
                                fence=fence_args(fence, self.config.namespace),
                                value=value)  # fmt: skip
        return await self._run(flow)

    async def pop(self, key: Key, default: Any = MISSING, *, fence: Any = None) -> Any:
        version, old = await self._delete(key, fence)
        if not version:
            if default is MISSING:
                raise KeyError(key)
            return default
        return self._codec.decode(unpack_value(old)[2])  # type: ignore[arg-type]

    async def delete(self, key: Key, *, fence: Any = None) -> bool:
        return bool((await self._delete(key, fence))[0])

    async def compare_and_delete(self, key: Key, expected: Any, *, fence: Any = None) -> bool:
        ref, fenced = self._locate(key), fence_args(fence, self.config.namespace)

        def attempt(mode: str, arg: bytes | str) -> Flow[tuple[int, bytes | None]]:
            return writes.delete(self._state, ref, mode=mode, expected=arg, fence=fenced)

        return await self._run(writes.compare(self._state, key, expected, "cad", attempt))

    async def _delete(self, key: Key, fence: Any) -> tuple[int, bytes | None]:
        fenced = fence_args(fence, self.config.namespace)
        return await self._run(writes.delete(self._state, self._locate(key), fence=fenced))

    async def transform(self, key: Key, fn: Callable[[Any], Any | Awaitable[Any]],
                        default: Any = MISSING, *, ttl: float | None = None,
                        fence: Any = None) -> Any:  # fmt: skip
        """Atomically replace the value with ``fn(value)`` (sync or async; optimistic, retried:
        it may run more than once, keep it free of side effects); returns the new value."""
        flow = writes.transform(self._state, self._locate(key), key, fn, default,
                                ttl_ms=ttl_ms(ttl),
                                fence=fence_args(fence, self.config.namespace))  # fmt: skip
        return await self._run(flow)

    async def update(
        self, other: Entries = (), /, *,
        ttl: float | None = None, fence: Any = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        pairs = other.items() if isinstance(other, Mapping) else other
        fenced = fence_args(fence, self.config.namespace)
        self._check_open()
        items = writes.items_of([*pairs, *kwargs.items()], self._state)
        if items:
            replies = await self._run(writes.update(self._state, items, ttl_ms=ttl_ms(ttl),
                                                    fence=fenced))  # fmt: skip
            writes.raise_partial(replies, "update()")

    async def clear(self, *, fence: Any = None) -> None:
        self._check_open()
        fenced = fence_args(fence, self.config.namespace)
        writes.raise_partial(await self._run(writes.clear(self._state, fence=fenced)), "clear()")

    # ---- whole-map reads ---------------------------------------------------------------------

    async def copy(self, *, skip_corrupt: bool = False) -> dict[Key, Any]:
        """A plain dict of every live entry, one round trip (atomic per bucket)."""
        self._check_open()
        return await self._run(bulk.snapshot(self._state, skip_corrupt=skip_corrupt))

    async def items(self, *, skip_corrupt: bool = False) -> list[tuple[Key, Any]]:
        return list((await self.copy(skip_corrupt=skip_corrupt)).items())

    async def keys(self, *, skip_corrupt: bool = False) -> list[Key]:
        return list(await self.copy(skip_corrupt=skip_corrupt))

    async def values(self, *, skip_corrupt: bool = False) -> list[Any]:
        return list((await self.copy(skip_corrupt=skip_corrupt)).values())

    async def len(self) -> int:
        """Live entries in Redis: one probe round trip (which also renews leases)."""
        self._check_open()
        assert self._engine is not None
        await self._engine.probe_once()
        return self._state.live_entries

    async def preload(self, *, limit: int | None = None, retries: int = 3) -> int:
        self._check_open()
        cap = min(self.config.capacity, limit if limit is not None else self.config.capacity)
        return await self._run(bulk.preload(self._state, cap, retries))

    # ---- locks -------------------------------------------------------------------------------

    def lock(self, key: Key, *, lease: float = 30.0, **options: Any) -> Lock:
        """A new asyncio :class:`~syncmap.aio.Lock` for ``key`` of this map, on this map's
        Redis: ``async with m.lock(k) as fence: await m.set(k, v, fence=fence)``."""
        ref = self._locate(key)
        name, tag = key_lock(self._cmds.layout, ref.field, ref.bucket, self._topology.sharded)
        cfg = self.config
        options.setdefault("socket_timeout", cfg.call_timeout or cfg.socket_timeout)
        return Lock(name, lease=lease, namespace=cfg.namespace, topology=self._topology,
                    hash_tag=tag, **options)  # fmt: skip

    # ---- events, statistics ------------------------------------------------------------------

    def subscribe(self, callback: Callable[[Event], Awaitable[None] | None], *,
                  inline: bool = False) -> Callable[[], None]:  # fmt: skip
        """Call ``callback(event)`` (a function or a coroutine function) for every change from
        any server, in a task of its own; ``inline=True``: a quick sync function, called the
        moment the change is applied.  Returns an unsubscriber."""
        self._check_open()
        assert self._engine is not None
        return self._engine.events.subscribe(callback, inline)

    def watch(self, maxsize: int = 10_000) -> AsyncWatch:
        """``async for event in m.watch(): ...``: the changes from now until the map closes."""
        self._check_open()
        assert self._engine is not None
        return self._engine.events.watch(maxsize)

    def statistics(self) -> Statistics:
        self._check_open()
        assert self._engine is not None
        return statistics_of(self._core, self._engine.events_dropped)

    def __repr__(self) -> str:
        state = "open" if self._engine is not None else "closed" if self._closed else "not open"
        return f"<syncmap.aio.SyncMap {self.name!r} {state}>"

    # ---- helpers -----------------------------------------------------------------------------

    async def _run(self, flow: Flow[T]) -> T:
        assert self._engine is not None
        return await run(flow, self._executor, self._engine.relay)

    def _check_open(self) -> None:
        if self._engine is None:
            if self._closed:
                raise MapClosed(f"map {self.name!r} is closed; open a new one")
            raise MapClosed(f"map {self.name!r} is not open yet: `await m.open()` or `async with`")
        self._engine.raise_background_error()

    def _locate(self, key: Key) -> Ref:
        self._check_open()
        field = encode_key(key, self.config.max_key_bytes)
        return Ref(field, normal_key(key), bucket_of(field, self._cmds.layout.buckets))

    def _payload(self, value: Any) -> bytes:
        return encode_limited(self._codec, value, self.config.max_value_bytes)
