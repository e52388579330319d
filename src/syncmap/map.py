"""``SyncMap``: a dict shared by many servers, near-cached, with Redis as the source of truth."""

from __future__ import annotations

import logging
import os
import queue
import random
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import redis as redis_lib

from . import forksafe
from .codec import Codec, MsgpackCodec, encode_limited, is_immutable, make_codec
from .config import MapConfig
from .core.nearcache import COPY, INF, Entry, Event, FillToken, NearCache
from .core.wire import VALUE_HEAD, unpack_value, unpack_value_epoch
from .engine import Engine
from .errors import (
    ConfigurationError,
    ConflictError,
    CorruptData,
    MapClosed,
    WriteOutcomeUnknown,
)
from .feed.routing import open_store_feed
from .keys import (
    Key,
    Layout,
    LockLayout,
    bucket_of,
    check_lock_name,
    check_map_name,
    check_node_id,
    clip,
    decode_key,
    encode_key,
    key_lock_name,
    normal_key,
)
from .lock import Fence, Lock
from .ratelog import RateLimitedLog
from .replicated import ReplicatedMap
from .signing import SigningKey, pads, signing_keys
from .store.redis_store import RedisStore, warn_if_evicting
from .store.topology import Topology, open_topology
from .views import SharedMapping

log = logging.getLogger("syncmap")
_MISSING: Any = object()
_SCALARS = frozenset({str, int, float, bool, type(None), bytes})
_monotonic = time.monotonic
FenceArg = Fence | Lock | tuple[str, int]
"""What ``fence=`` takes: the token ``acquire()`` returned, the held ``Lock`` itself, or
``(lock name, token)`` (a token passed on from elsewhere, e.g. ``$SYNCMAP_FENCE``)."""


@dataclass(frozen=True, slots=True)
class Statistics:
    """Counters of one map on this server since it was opened."""

    hits: int
    misses: int
    invalidations: int
    resyncs: int
    entries: int
    evictions: int
    expirations: int
    gaps: int
    epoch_changes: int
    lost_detected: int
    lease_lapses: int
    fills_rejected: int
    messages: int
    corrupt_messages: int
    events_dropped: int = 0
    """Events a ``subscribe()`` callback or ``watch()`` never got: its queue was full."""
    gap_overflows: int = 0
    """Buckets flushed because a relayed feed held too many early messages (``MAX_AHEAD``)."""
    corrupt_entries: int = 0
    """Stored entries that did not decode, left out by ``preload()`` or ``skip_corrupt=True``."""
    forged_messages: int = 0
    """Change messages dropped for want of a valid signature (a map with ``signing_key``)."""
    digest_mismatches: int = 0
    """Buckets restarted because the store's digest chain differed from the messages applied."""
    stale_reads: int = 0
    """Reads served stale while Redis was unreachable (``on_store_down="serve_stale"``)."""

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class SyncMap(SharedMapping):
    """A ``MutableMapping`` kept in sync across servers.  See README and docs/design.md.

    Reads are served from this server's near cache when they can be (nanoseconds), otherwise from
    Redis; every write is one atomic Lua round trip that also publishes the change to every server.
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
        # Nine parameters, one past STYLE's budget: signing_key must be a keyword of SyncMap itself,
        # since SyncMap(name, feed=...) builds a ReplicatedMap from the same keywords (__new__).
        self.name = check_map_name(name)
        self._keys = signing_keys(signing_key)
        self.config = cfg = config or MapConfig()
        self._auto_node_id = node_id is None  # a new one in a forked child (it names the pid)
        self.node_id = check_node_id(node_id)
        self._codec = make_codec(codec, value_type)
        # MessagePack without a value type gives these scalars back unchanged (JSON does not:
        # it turns inf into null), so a writer may cache what it wrote without decoding it.
        self._plain_codec = isinstance(self._codec, MsgpackCodec) and self._codec.value_type is None
        topology = self._client(url, redis)
        layout = Layout(cfg.namespace, self.name, cfg.buckets)
        store = RedisStore(topology, layout, self.node_id)
        store.load_scripts()
        buckets, codec_name = store.ensure_meta(cfg.buckets, self._codec.name,
                                                stamps=cfg.guards.settings_stamp)  # fmt: skip
        warn_if_evicting(store)
        store.close()
        if codec_name != self._codec.name:
            raise ConfigurationError(
                f"map {name!r} was created with codec {codec_name!r}, not {self._codec.name!r}: "
                "every server of a map must use the same codec"
            )
        layout = Layout(cfg.namespace, self.name, buckets)
        feed_obj, target = open_store_feed(feed, topology, layout, cfg.socket_timeout)
        self._store = RedisStore(topology, layout, self.node_id, target, codec=self._codec.name,
                                 flags=cfg.guards.script_flags(),
                                 isolate_damage=cfg.guards.damage_isolated,
                                 pads=pads(self._keys[0]) if self._keys else b"",
                                 deadline=cfg.call_timeout)  # fmt: skip
        self._buckets = buckets
        self._feed_url = feed
        self._core = self._new_core()
        self._entries = self._core.entries  # the hit path reads this dict directly
        self._engine = Engine(self._core, self._store, cfg.probe_interval, feed_obj, self._keys)
        self._corrupt_log = RateLimitedLog(log)
        if cfg.presence:
            self._presence_last: tuple[float, int, int] | None = None
            self._presence_started = 0
            self._engine.enable_presence(self._presence_record, cfg.presence_interval)
        try:
            self._engine.start(cfg.self_check_timeout)
        except BaseException:
            self._engine.close()
            raise
        forksafe.register(self)

    def _new_core(self) -> NearCache:
        cfg = self.config
        # Relayed messages (target "") from two writers of one bucket may arrive in either order.
        return NearCache(self._buckets, capacity=cfg.capacity, max_staleness=cfg.max_staleness,
                         guards=cfg.guards, ordered=self._store.target != "",
                         max_stale_age=cfg.stale_age)  # fmt: skip

    def _after_fork_in_child(self) -> None:
        """In a forked child, before ``fork()`` returns there (``forksafe``): the map starts
        over as if opened in the child.  An empty near cache (the parent's entries would lose
        their guarantees: no subscription vouches for them here), a node id naming the child's
        pid, and an engine that subscribes and starts its threads on the first call
        (:meth:`_check_open`).  The hit path finds nothing cached until then, so every read
        takes that path."""
        if self._auto_node_id:
            self.node_id = self._store.origin = check_node_id(None)
        self._core = self._new_core()
        self._entries = self._core.entries
        self._engine.forked(self._core)

    def _start_in_child(self) -> None:
        """Open this process's own feed and start the engine: a forked child's first call."""
        engine = self._engine
        with engine.start_lock:
            if not engine.needs_start or engine.closed:
                return
            layout = self._store.layout
            feed, _ = open_store_feed(self._feed_url, self._store.topology, layout,
                                      self.config.socket_timeout)  # fmt: skip
            try:
                engine.restart(feed, self.config.self_check_timeout)
            except BaseException:
                feed.close()
                raise

    def _client(self, url: str | None, client: redis_lib.Redis | None) -> Topology:
        return open_topology(url, client, timeout=self.config.socket_timeout)

    # ---- reads -------------------------------------------------------------------------------

    def __new__(cls, *args: Any, config: MapConfig | None = None, **kwargs: Any) -> SyncMap:
        """``feed=`` without ``url=`` or ``redis=``: replicated mode (no store); see below."""
        store = (len(args) > 1 and args[1] is not None) or kwargs.get("url") or kwargs.get("redis")
        if kwargs.get("feed") is not None and not store:
            # Not a SyncMap, so Python does not run SyncMap.__init__ on it: it is complete.
            return ReplicatedMap(*args[:1], config=config, **kwargs)  # type: ignore[return-value]
        chosen = _FastHitsSyncMap if config is not None and config.fast_hits else cls
        return super().__new__(chosen)

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
            return self._codec.decode(e.raw)  # type: ignore[arg-type]
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
                return v if v is not COPY else self._codec.decode(e.raw)  # type: ignore[arg-type]
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
        e = None if consistent else self._servable(key)
        if e is not None:
            e.hits += 1
            v = e.value if e.value is not COPY else self._codec.decode(e.raw)  # type: ignore[arg-type]
            return v, e.version, "local"
        value, version, source = self._fetch(key, consistent=consistent)
        return (None if value is _MISSING else value), version, source

    def _servable(self, key: Key) -> Entry | None:
        """The cached entry a hit may serve, or None (``__getitem__`` and ``get`` inline this)."""
        valid_until = self._core.valid_until  # before the entry: see __getitem__
        try:
            e = self._entries.get(key)
        except TypeError:  # unhashable: the slow path raises KeyTypeError
            return None
        if e is not None and key.__class__ is e.kc and _monotonic() < valid_until:
            return e
        return None

    def _fetch(self, key: Key, *, consistent: bool) -> tuple[Any, int, str]:
        """A read that missed the hit path: (value or _MISSING, version, provenance)."""
        field, nkey, bucket = self._locate(key)
        now = _monotonic()
        hit = None
        with self._engine.lock:
            if now >= self._core.valid_until:
                self._core.tick(now)  # do not wait for the timer thread (we may have been paused)
            if self._core.max_stale_age and not consistent:
                # serve_stale: while a bucket is stale every read comes here (valid_until is
                # in the past); serve from the cache at once, without waiting on a dead store.
                hit = self._core.cached(nkey, now)
            if hit is None:
                token = self._core.begin_fill(nkey, bucket)
                if not consistent:
                    self._core.counters.misses += 1
        if hit is not None:
            e, stale = hit
            e.hits += 1
            v = e.value if e.value is not COPY else self._codec.decode(e.raw)  # type: ignore[arg-type]
            return v, e.version, "stale" if stale else "local"
        try:
            raw = self._store.hget(bucket, field)
        except BaseException:
            self._abort(token)
            raise
        return (*self._settle_read(token, raw), "redis")

    def _settle_read(self, token: FillToken, raw: bytes | None) -> tuple[Any, int]:
        """Install what a read returned (if nothing newer was seen meanwhile) and return it."""
        if raw is not None:
            try:
                version, deadline_ms, epoch, payload = unpack_value_epoch(raw)
            except BaseException:
                self._abort(token)
                raise
            if not deadline_ms or deadline_ms > self._engine.server_now_ms():
                try:
                    value = self._codec.decode(payload)
                except BaseException:
                    self._abort(token)
                    raise
                self._install(token, version, deadline_ms, payload, value, epoch, own=False)
                return value, version
        with self._engine.lock:
            self._core.fill_absent(token)
        return _MISSING, 0

    def _install(self, token: FillToken, version: int, deadline_ms: int, payload: bytes,
                 value: Any, epoch: int, *, own: bool) -> None:  # fmt: skip
        """Offer a read's (or this server's own write's) value to the cache."""
        now = time.monotonic()
        deadline = self._engine.local_deadline(deadline_ms, now) if deadline_ms else INF
        shared = is_immutable(value)
        cached, raw = (value, None) if shared else (COPY, payload)
        with self._engine.lock:
            if own:
                self._core.wrote(token, now, version, cached, raw, deadline, epoch=epoch)
            else:
                self._core.complete_fill(token, now, version, cached, raw, deadline, epoch)
        if deadline != INF:
            self._engine.wake_timer()

    def _abort(self, token: FillToken) -> None:
        with self._engine.lock:
            self._core.abort_fill(token)

    def peek(self, key: Key) -> tuple[Any, int] | None:
        """(value, version) from this server's near cache only; no I/O.  For tests and tools."""
        encode_key(key, self.config.max_key_bytes)  # refuses a bad key with KeyTypeError
        e = self._entries.get(normal_key(key))
        if e is None:
            return None
        return (e.value if e.value is not COPY else self._codec.decode(e.raw)), e.version  # type: ignore[arg-type]

    # ---- writes ------------------------------------------------------------------------------

    def __setitem__(self, key: Key, value: Any) -> None:
        self.set(key, value)

    def set(self, key: Key, value: Any, *, ttl: float | None = None, fence: FenceArg | None = None
            ) -> int:  # fmt: skip
        """Store ``value``; returns its version.  ``ttl`` in seconds; ``fence`` see docs/locks."""
        payload = self._payload(value)
        version, _ = self._set(key, payload, "set", "", ttl, fence, value)
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
        new_payload = self._payload(new)
        return self._compare(
            key,
            expected,
            "cas",
            lambda mode, arg: self._set(key, new_payload, mode, arg, ttl, fence),
        )

    def _compare(
        self, key: Key, expected: Any, mode: str,
        attempt: Callable[[str, bytes | str], tuple[int, bytes | None]],
    ) -> bool:  # fmt: skip
        """The compare-and-X loop: one round trip when the bytes match, a retry when only the
        values do (equal dicts in another key order), ``ConflictError`` if it keeps losing."""
        arg: bytes | str = self._payload(expected)
        for _ in range(self.config.transform_retries):
            version, old = attempt(mode, arg)
            if version:
                return True
            if old is None:
                return False
            old_version, _, old_epoch, old_payload = unpack_value_epoch(old)
            if self._codec.decode(old_payload) != expected:
                return False
            # Equal value, other bytes: pin to that write, by epoch and version (a version
            # alone may name another write once versions restarted under a new epoch).
            mode, arg = "ver", f"{old_epoch}:{old_version}"
        raise ConflictError(f"compare-and-{mode} of {clip(key)} kept losing races; retry later")

    def _set(self, key: Key, payload: bytes, mode: str, expected: bytes | str,
             ttl: float | None, fence: FenceArg | None, value: Any = _MISSING
             ) -> tuple[int, bytes | None]:  # fmt: skip
        field, nkey, bucket = self._locate(key)
        cmd = self._store.script("set", bucket, field, payload, _ttl_ms(ttl), mode, expected,
                                 fence=self._fence_of(fence))  # fmt: skip
        token, reply = self._write(nkey, cmd, bucket)
        version, deadline_ms, old = reply[:3]
        if version:
            # What readers will decode.  The untyped msgpack codec gives back what was stored
            # (same types, equal values: docs/values.md), so the value itself serves; a mutable
            # one is cached as bytes by _install anyway.
            plain = value is not _MISSING and self._plain_codec
            stored = value if plain else self._codec.decode(payload)
            self._install(token, version, deadline_ms, payload, stored, int(reply[3]), own=True)
        else:
            self._settle_read(token, old)  # the refusal told us the live value
        return int(version), old

    def pop(self, key: Key, default: Any = _MISSING, *, fence: FenceArg | None = None) -> Any:
        """Remove ``key`` and return its value (Go's LoadAndDelete)."""
        version, old = self._delete(key, "del", "", fence)
        if not version:
            if default is _MISSING:
                raise KeyError(key)
            return default
        return self._codec.decode(unpack_value(old)[2])  # type: ignore[arg-type]

    def __delitem__(self, key: Key) -> None:
        if not self._delete(key, "del", "", None)[0]:
            raise KeyError(key)

    def delete(self, key: Key, *, fence: FenceArg | None = None) -> bool:
        """Remove ``key``; returns whether it existed."""
        return bool(self._delete(key, "del", "", fence)[0])

    def compare_and_delete(self, key: Key, expected: Any, *, fence: FenceArg | None = None) -> bool:
        """Remove ``key`` only if it holds a value equal to ``expected``; atomic."""
        return self._compare(
            key, expected, "cad", lambda mode, arg: self._delete(key, mode, arg, fence)
        )

    def _delete(self, key: Key, mode: str, expected: bytes | str, fence: FenceArg | None
                ) -> tuple[int, bytes | None]:  # fmt: skip
        field, nkey, bucket = self._locate(key)
        fenced = self._fence_of(fence)
        cmd = self._store.script("delete", bucket, field, mode, expected, fence=fenced)
        token, reply = self._write(nkey, cmd, bucket)
        version, old = reply[:2]
        if version:
            with self._engine.lock:
                self._core.wrote(token, time.monotonic(), version, deleted=True,
                                 epoch=int(reply[2]))  # fmt: skip
        else:
            self._settle_read(token, old)
        return int(version), old

    def transform(self, key: Key, fn: Callable[[Any], Any], default: Any = _MISSING, *,
                  ttl: float | None = None, fence: FenceArg | None = None) -> Any:  # fmt: skip
        """Atomically replace the value with ``fn(value)`` (optimistic, retried); returns it.

        ``fn`` may run more than once: keep it free of side effects.
        """
        field, _, bucket = self._locate(key)
        for attempt in range(self.config.transform_retries):
            if attempt:  # lost a race: back off a little, jittered, so contenders spread out
                time.sleep(random.uniform(0, min(0.02, 0.0002 * 2**attempt)))
            raw = self._store.hget(bucket, field)
            version, deadline_ms, epoch, payload = (
                unpack_value_epoch(raw) if raw else (0, 0, 0, b"")
            )
            if raw is not None and (not deadline_ms or deadline_ms > self._engine.server_now_ms()):
                current = self._codec.decode(payload)
            elif default is _MISSING:
                raise KeyError(key)
            else:
                current, version, epoch = default, 0, 0
            new = fn(current)
            # The write happens only if the value read is still there: same epoch and version.
            expected = f"{epoch}:{version}"
            applied, _ = self._set(key, self._payload(new), "ver", expected, ttl, fence)
            if applied:
                return new
        raise ConflictError(
            f"transform({clip(key)}) lost {self.config.transform_retries} optimistic retries to "
            "concurrent writers; retry later or protect the key with a lock"
        )

    def update(  # type: ignore[override]
        self, other: Mapping[Key, Any] | Iterable[tuple[Key, Any]] = (), /, *,
        ttl: float | None = None, fence: FenceArg | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        """Store many entries in one round trip (each bucket's part is atomic)."""
        pairs = other.items() if isinstance(other, Mapping) else other
        fenced = self._fence_of(fence)
        per_bucket: dict[int, list[tuple[Key, bytes, bytes]]] = {}
        for key, value in [*pairs, *kwargs.items()]:
            field, nkey, bucket = self._locate(key)
            per_bucket.setdefault(bucket, []).append((nkey, field, self._payload(value)))
        cmds, plan, buckets = [], [], []
        for bucket, items in per_bucket.items():
            for i in range(0, len(items), 1000):  # keep each script short for Redis
                chunk = items[i : i + 1000]
                args = [a for _, f, p in chunk for a in (f, p)]
                cmds.append(self._store.script("mset", bucket, _ttl_ms(ttl), *args, fence=fenced))
                plan.append(chunk)
                buckets.append(bucket)
        if not cmds:
            return
        self._check_open()
        with self._engine.lock:
            before = {b: self._core.epoch_snapshot(b) for b in set(buckets)}
        try:
            replies = self._store.call(cmds, write=True, partial=True)
        except WriteOutcomeUnknown:
            with self._engine.lock:
                for chunk in plan:
                    for nkey, _, _ in chunk:
                        self._core.drop(nkey)
            raise
        with self._engine.lock:
            now = time.monotonic()
            for reply, chunk, bucket in zip(replies, plan, buckets, strict=True):
                if isinstance(reply, Exception):
                    continue
                first, epoch = int(reply[0]), int(reply[1])
                self._core.learn_epoch_if(bucket, epoch, first, now, before[bucket])
                for i, (nkey, _, _) in enumerate(chunk):
                    self._core.note_write(nkey, first + i)
        _raise_partial(replies, "update()")

    # ---- locks -------------------------------------------------------------------------------

    def lock(self, key: Key, *, lease: float = 30.0, **options: Any) -> Lock:
        """A new :class:`~syncmap.Lock` for ``key`` of this map, on this map's Redis.

        ``with users.lock("alice") as fence: users.set("alice", v, fence=fence)``.  Each call
        makes a new owner; ``options`` are Lock's (``replicas``, ``on_lost``, ...).
        """
        field, _, _ = self._locate(key)
        return Lock(key_lock_name(self.name, field), lease=lease, namespace=self.config.namespace,
                    topology=self._store.topology, **options)  # fmt: skip

    def _fence_of(self, fence: FenceArg | None) -> tuple[str, str, int] | None:
        """(lock name, fence counter key, token) for the write scripts."""
        if fence is None:
            return None
        if isinstance(fence, Lock):
            fence = fence.fence  # LockLost here if its lease ran out
        if isinstance(fence, Fence):
            return fence.lock, fence.key, int(fence)
        if (
            isinstance(fence, tuple) and len(fence) == 2 and isinstance(fence[0], str)
            and isinstance(fence[1], int) and not isinstance(fence[1], bool)
        ):  # fmt: skip
            name, token = fence
            return name, LockLayout(self.config.namespace, check_lock_name(name)).fence, token
        raise TypeError(
            f"fence must be the Fence that Lock.acquire() returned, a Lock, or (lock name, "
            f"token), not {fence!r}"
        )

    def clear(self, *, fence: FenceArg | None = None) -> None:
        """Remove every entry (each bucket atomically; buckets one after another)."""
        self._check_open()
        fenced = self._fence_of(fence)
        cmds = [self._store.script("clear", b, fence=fenced) for b in range(self._buckets)]
        with self._engine.lock:
            before = [self._core.epoch_snapshot(b) for b in range(self._buckets)]
        replies = self._store.call(cmds, write=True, partial=True)
        with self._engine.lock:
            now = time.monotonic()
            for bucket, reply in enumerate(replies):
                if not isinstance(reply, Exception) and reply[0]:
                    self._core.learn_epoch_if(bucket, int(reply[1]), int(reply[0]), now,
                                              before[bucket])  # fmt: skip
                    self._core.cleared(bucket, int(reply[0]))
        _raise_partial(replies, "clear()")

    def _write(self, nkey: Key, cmd: tuple[Any, ...], bucket: int) -> tuple[FillToken, Any]:
        with self._engine.lock:
            token = self._core.begin_fill(nkey, bucket)
        try:
            reply = self._store.call([cmd], write=True)[0]
        except WriteOutcomeUnknown:
            with self._engine.lock:
                self._core.abort_fill(token)
                self._core.drop(nkey)
            raise
        except BaseException:
            self._abort(token)
            raise
        return token, reply

    # ---- whole-map reads (each one round trip; views and ``|`` in views.py) ------------------

    def copy(self, *, skip_corrupt: bool = False) -> dict[Key, Any]:
        """A plain dict of every live entry, read in one round trip (not one atomic moment).

        ``keys()``, ``items()`` and ``values()`` are live views that read one such snapshot per
        operation.  An entry stored in Redis that does not decode (written by something else, or
        with another codec) raises :class:`CorruptData` naming it; ``skip_corrupt=True`` leaves
        it out instead, counts it (``statistics().corrupt_entries``) and logs it (rate-limited).
        The views take the same keyword; ``iter(m)`` raises."""
        self._check_open()
        now_ms = self._engine.server_now_ms()
        out = {}
        for pairs in self._store.bucket_items(range(self._buckets)):
            for field, raw in pairs:
                try:
                    _, deadline_ms, payload = unpack_value(raw)
                    if not deadline_ms or deadline_ms > now_ms:
                        out[decode_key(field)] = self._codec.decode(payload)
                except Exception as exc:  # a user's codec may raise anything
                    self._corrupt_entry(field, exc, skip=skip_corrupt)
        return out

    def _popitem_candidates(self) -> list[Key]:
        """Keys of the first non-empty group of 8 buckets from a random one on (so contenders
        spread out): a round trip per group; [] when every bucket read was empty.  HGETALL, not
        HKEYS: the least-privilege ACL of docs/protocol.md §9 grants the one, not the other."""
        self._check_open()
        start = random.randrange(self._buckets)
        order = [(start + i) % self._buckets for i in range(self._buckets)]
        for i in range(0, len(order), 8):
            keys = []
            for pairs in self._store.bucket_items(order[i : i + 8]):
                for field, _ in pairs:
                    try:
                        keys.append(decode_key(field))
                    except CorruptData:  # no key to pop it by; items() reports it
                        continue
            if keys:
                random.shuffle(keys)
                return keys
        return []

    def _corrupt_entry(self, field: bytes, exc: Exception, *, skip: bool) -> None:
        """A stored entry that does not decode: raise, or count it, log it and go on."""
        if not skip:
            raise CorruptData(
                f"entry {field[:60]!r} of map {self.name!r} does not decode ({exc}); "
                "items(skip_corrupt=True) lists the others"
            ) from exc
        self._core.counters.corrupt_entries += 1
        self._corrupt_log(
            "syncmap map %r: left out a corrupt entry %r (%s; %d so far)",
            self.name, field[:60], exc, self._core.counters.corrupt_entries,
        )  # fmt: skip

    def preload(self, *, limit: int | None = None, retries: int = 3) -> int:
        """Fill this server's near cache with the whole map (up to ``capacity`` or ``limit``
        entries), a few buckets per round trip; returns how many entries it cached.

        Each bucket is installed whole or not at all: a bucket that changed while it was being
        read (a change message, a probe, a write from here) is read again, up to ``retries``
        times, and otherwise left to fill on demand (``NearCache.complete_bulk`` says why).
        An entry that does not decode is left out (as ``items(skip_corrupt=True)`` does): it
        is counted each time it is read, logged at most once a minute, and reading that key
        raises :class:`CorruptData`.
        """
        self._check_open()
        cap = min(self.config.capacity, limit if limit is not None else self.config.capacity)
        todo, cached = list(range(self._buckets)), 0
        for _ in range(retries + 1):
            again = []
            for i in range(0, len(todo), 8):
                chunk = todo[i : i + 8]
                with self._engine.lock:
                    tokens = [self._core.begin_bulk(b) for b in chunk]
                replies = self._store.bucket_items(chunk)
                for bucket, token, pairs in zip(chunk, tokens, replies, strict=True):
                    entries = self._bulk_entries(pairs, cap - cached)
                    with self._engine.lock:
                        n = self._core.complete_bulk(token, time.monotonic(), entries)
                    if n == 0 and entries:
                        again.append(bucket)
                    cached += n
                    if cached >= cap:
                        self._engine.wake_timer()
                        return cached
            if not again:
                break
            todo = again
        self._engine.wake_timer()
        return cached

    def _bulk_entries(
        self, pairs: list[tuple[bytes, bytes]], room: int
    ) -> list[tuple[Key, int, int, Any, bytes | None, float]]:
        """Decode a bucket's (field, stored value) pairs for ``complete_bulk``.  The per-entry
        work is inlined (names bound locally, the common str key decoded here): at a million
        entries every call counts."""
        now, now_ms = time.monotonic(), self._engine.server_now_ms()
        head, size, decode, scalars = (
            VALUE_HEAD.unpack_from,
            VALUE_HEAD.size,
            self._codec.decode,
            _SCALARS,
        )
        local_deadline = self._engine.local_deadline
        out: list[tuple[Key, int, int, Any, bytes | None, float]] = []
        append = out.append
        for field, stored in pairs[: max(room, 0)]:
            try:  # free unless it raises (Python 3.11+)
                version, deadline_ms, epoch = head(stored)
                if deadline_ms and deadline_ms <= now_ms:
                    continue
                payload = stored[size:]
                value = decode(payload)
                key = field[1:].decode() if field[:1] == b"s" else decode_key(field)
            except Exception as exc:  # struct.error, UnicodeDecodeError, CorruptData, a codec's
                self._corrupt_entry(field, exc, skip=True)
                continue
            deadline = local_deadline(deadline_ms, now) if deadline_ms else INF
            if value.__class__ in scalars or is_immutable(value):
                append((key, version, epoch, value, None, deadline))
            else:
                append((key, version, epoch, COPY, payload, deadline))
        return out

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
        if self._entries and _monotonic() < self._core.valid_until:
            return True
        return len(self) > 0

    def __contains__(self, key: object) -> bool:
        return self.get(key, _MISSING) is not _MISSING  # type: ignore[arg-type]

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
        c = self._core.counters
        return Statistics(
            hits=self._core.hits(), misses=c.misses, invalidations=c.invalidations,
            resyncs=c.resyncs, entries=len(self._entries), evictions=c.evictions,
            expirations=c.expirations, gaps=c.gaps, epoch_changes=c.epoch_changes,
            lost_detected=c.lost_detected, lease_lapses=c.lease_lapses,
            fills_rejected=c.fills_rejected, messages=c.messages,
            corrupt_messages=c.corrupt_messages, events_dropped=self._engine.events_dropped,
            gap_overflows=c.gap_overflows, corrupt_entries=c.corrupt_entries,
            forged_messages=c.forged_messages, digest_mismatches=c.digest_mismatches,
            stale_reads=c.stale_reads,
        )  # fmt: skip

    def _presence_record(self) -> dict[str, Any]:
        """This server's presence record (JSON-ready) for ``syncmap top``; see docs/protocol.md.

        Runs on the probe thread every ``presence_interval``; the per-second rates are over the
        time since the previous record."""
        s = self.statistics()
        now_ms = int(self._engine.server_now_ms())
        if not self._presence_started:
            self._presence_started = now_ms
        mono, reads = time.monotonic(), s.hits + s.misses
        last, self._presence_last = self._presence_last, (mono, reads, s.invalidations)
        rate_r = rate_i = 0.0
        if last is not None and mono > last[0]:
            rate_r = (reads - last[1]) / (mono - last[0])
            rate_i = (s.invalidations - last[2]) / (mono - last[0])
        return {
            "node": self.node_id, "host": socket.gethostname(), "pid": os.getpid(),
            "started": self._presence_started, "updated": now_ms,
            "every": self.config.presence_interval, "entries": s.entries, "hits": s.hits,
            "misses": s.misses, "hit_ratio": round(s.hit_ratio, 4),
            "invalidations": s.invalidations, "resyncs": s.resyncs,
            "lost_detected": s.lost_detected, "messages": s.messages,
            "reads_per_s": round(rate_r, 1), "invalidations_per_s": round(rate_i, 1),
        }  # fmt: skip

    def __repr__(self) -> str:
        s = self.statistics()
        state = "closed" if self._engine.closed else "open"
        return (
            f"<SyncMap {self.name!r} {state} on {self._store.where}: {s.entries} cached, "
            f"hits={s.hits} misses={s.misses} invalidations={s.invalidations} "
            f"resyncs={s.resyncs}>"
        )

    def close(self) -> None:
        """Stop the background threads and drop the near cache.  Idempotent."""
        if not self._engine.closed:
            self._engine.close()
            with self._engine.lock:
                self._entries.clear()
            self._store.close()

    def __enter__(self) -> SyncMap:
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

    def _locate(self, key: Key) -> tuple[bytes, Key, int]:
        self._check_open()
        field = encode_key(key, self.config.max_key_bytes)
        return field, normal_key(key), bucket_of(field, self._buckets)

    def _payload(self, value: Any) -> bytes:
        return encode_limited(self._codec, value, self.config.max_value_bytes)


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
            return self._codec.decode(e.raw)  # type: ignore[arg-type]
        return self._load(key)


class Watch:
    """An iterator over a map's change events; close it (or use ``with``) to stop."""

    def __init__(self, engine: Engine, q: queue.Queue[Event | None]) -> None:
        self._engine, self._q = engine, q

    def __iter__(self) -> Iterator[Event]:
        while (event := self._q.get()) is not None:
            yield event

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after ``timeout`` seconds (or when the map closed)."""
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        """Stop watching: a ``for e in watch`` loop (in any thread) ends after the events
        already queued."""
        self._engine.unwatch(self._q)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _raise_partial(replies: list[Any], what: str) -> None:
    """Raise the first refusal of a multi-bucket write, saying how much of it was applied."""
    failed = [r for r in replies if isinstance(r, Exception)]
    if failed:
        first = failed[0]
        done = len(replies) - len(failed)
        first.args = (f"{first.args[0] if first.args else first}; {what} applied {done} of "
                      f"{len(replies)} bucket parts (each part is atomic on its own)",)  # fmt: skip
        raise first


def _ttl_ms(ttl: float | None) -> int:
    if ttl is None:
        return 0
    if not ttl > 0:
        raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
    return max(1, round(ttl * 1000))
