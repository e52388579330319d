"""``ReplicatedMap``: replicated mode, no central store.  Every server holds the whole map.

Opened as ``ReplicatedMap(name, feed)``, or by ``open_map(name, feed=...)`` when no store is
configured (``SyncMap`` is always store mode).  It answers ``SyncMap``'s methods with the same
signatures and return types (``tests/integration/test_map_agreement.py``).  Reads
are local dictionary lookups; a write is published on the feed (and confirmed by the broker),
then applied here, so this server reads its own write at once; every server applies every
message with the merge rule of ``core/replica.py`` and converges to the same map.  It is **not
linearizable**: two servers writing one key at once both succeed, and the later hybrid time wins
everywhere.  What needs a single authority (``compare_and_set``, ``transform``, ``setdefault``,
``swap``, locks, ``fence=``, ``consistent=True`` reads) raises :class:`UnsupportedInMode`
naming store mode, instead of pretending (``storeonly.py``).

Start-up, in this order (so nothing published meanwhile is missed):

1. subscribe: a durable feed from its oldest message (the history *is* the snapshot; a compacted
   feed keeps the newest message of every key), a feed that keeps nothing from now on;
2. publish a ping and wait for it to come back: on a log with one order, everything published
   before the ping has then been applied, so the map is loaded;
3. a feed that keeps nothing (or a log that was trimmed) has given us only the present, so the
   past comes from ``snapshot=``: a mapping, a function returning one, or ``"peers"`` (ask the
   servers already running to re-send what they hold).  Without one the map refuses to start
   (:class:`NoSnapshotSource`): an empty map that silently disagrees with its peers is worse.

After a disconnect that may have lost messages (``on_up(resumed=False)``), the server asks its
peers to re-send their state (a *sync*); the merge rule makes a re-sent message that is already
known a no-op, so this is safe however often it happens.

This module is the dict API; start-up, fork, events and life cycle are in ``replicabase.py``,
the feed's messages and syncs in ``replicafeed.py``.
"""

from __future__ import annotations

import queue
import random
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from . import forksafe
from .codec import Codec
from .config import MapConfig
from .core.nearcache import COPY
from .core.replica import ReplicaMessage
from .events import Fanout
from .feed.base import Feed, Subscription, open_feed
from .keys import Entries, Key
from .replicabase import ReplicaBase, ReplicaStatistics, Snapshot
from .replicalogic import _wall_ms, deadline_of
from .signing import SigningKey
from .storeonly import _MISSING, StoreOnly, needs_store, no_fence

if TYPE_CHECKING:
    from .mapbase import FenceArg

__all__ = ["ReplicaStatistics", "ReplicatedMap", "Snapshot"]


class ReplicatedMap(StoreOnly, ReplicaBase):
    """A map every server holds whole, kept in step by a message feed (module docstring)."""

    def __init__(
        self,
        name: str,
        feed: str,
        *,
        codec: str | Codec | None = None,
        value_type: Any = None,
        config: MapConfig | None = None,
        node_id: str | None = None,
        snapshot: Snapshot | None = None,
        load_timeout: float = 60.0,
        peers_timeout: float = 2.0,
        signing_key: SigningKey = None,
    ) -> None:
        self._opened_with = (name, feed, dict(
            codec=codec, value_type=value_type, config=config, node_id=node_id,
            snapshot=snapshot, load_timeout=load_timeout, peers_timeout=peers_timeout,
            signing_key=signing_key,
        ))  # fmt: skip
        self._init_logic(name, config, node_id, codec, value_type, signing_key)
        cfg = self.config
        self._closed = False
        self._stopping = threading.Event()
        self._synced = threading.Event()
        self._up = threading.Event()
        # Events as SyncMap delivers them (events.py).  A forked child's re-open keeps the
        # parent's subscribers, as a store-mode map does.
        self._fanout: Fanout = self.__dict__.get("_fanout") or Fanout(f"{name}.replicated")
        self._work = queue.Queue()
        self._worker = threading.Thread(target=self._work_loop, name="syncmap-replica",
                                        daemon=True)  # fmt: skip
        self._feed: Feed = open_feed(feed, type(self)._topic(feed, cfg.namespace, self.name),
                                     timeout=cfg.socket_timeout)  # fmt: skip
        self._sub: Subscription | None = None
        try:
            self._start(snapshot, load_timeout, peers_timeout)
        except BaseException:
            self.close()
            raise
        self._forked = False
        forksafe.register(self)

    # ---- reads -------------------------------------------------------------------------------
    # The hit path (``__getitem__``, ``get``, ``in``): one dict lookup, the key's class, the TTL.
    # Anything else (absent, a tombstone, a key of another class, not a key at all) takes
    # ``_live_slot``, which refuses what store mode refuses (``KeyTypeError``, ``InvalidKey``).

    def __getitem__(self, key: Key) -> Any:
        try:
            slot = self._slots.get(key)
        except TypeError:  # unhashable: _live_slot raises KeyTypeError
            slot = None
        if slot is None or key.__class__ is not slot.kc or slot.payload is None or (
            slot.deadline_ms and slot.deadline_ms <= _wall_ms()
        ):  # fmt: skip
            slot = self._live_slot(key)
            if slot is None:
                raise KeyError(key)
        v = slot.value
        return v if v is not COPY else self._codec.decode(slot.payload)  # type: ignore[arg-type]

    def get(self, key: Key, default: Any = None, *, consistent: bool = False) -> Any:
        """The value of ``key`` or ``default``, from this server's memory (never any I/O).
        ``consistent=True`` raises :class:`UnsupportedInMode`: there is nothing to read
        through to."""
        if consistent:
            raise needs_store("get(consistent=True) (a linearizable read)")
        try:
            slot = self._slots.get(key)
        except TypeError:
            slot = None
        if slot is None or key.__class__ is not slot.kc or slot.payload is None or (
            slot.deadline_ms and slot.deadline_ms <= _wall_ms()
        ):  # fmt: skip
            slot = self._live_slot(key)
            if slot is None:
                return default
        v = slot.value
        return v if v is not COPY else self._codec.decode(slot.payload)  # type: ignore[arg-type]

    def __contains__(self, key: object) -> bool:
        try:
            slot = self._slots.get(key)  # type: ignore[call-overload]
        except TypeError:
            slot = None
        if slot is None or key.__class__ is not slot.kc or slot.payload is None or (
            slot.deadline_ms and slot.deadline_ms <= _wall_ms()
        ):  # fmt: skip
            return self._live_slot(key) is not None  # type: ignore[arg-type]
        return True

    def get_with_meta(self, key: Key, *, consistent: bool = False) -> tuple[Any, int, str]:
        """(value or None, version or 0, ``"local"``): every read is from this server's memory.

        The version is the write's hybrid-clock time, what ``set()`` returned and events carry
        (0 for an entry loaded from ``snapshot=`` that no write has replaced yet)."""
        if consistent:
            raise needs_store("get_with_meta(consistent=True) (a linearizable read)")
        slot = self._live_slot(key)
        return (None, 0, "local") if slot is None else (self._value_of(slot), slot.version[0],
                                                         "local")  # fmt: skip

    def peek(self, key: Key) -> tuple[Any, int] | None:
        """(value, version) held here, or None; no I/O (as every read here).  For tests, tools."""
        slot = self._live_slot(key)
        return None if slot is None else (self._value_of(slot), slot.version[0])

    def __len__(self) -> int:
        return len(self._live_keys())

    def __bool__(self) -> bool:
        return bool(self._live_keys())

    def __iter__(self) -> Iterator[Key]:
        return iter(self._live_keys())

    def copy(self, *, skip_corrupt: bool = False) -> dict[Key, Any]:
        """A plain dict of every live entry, from this server's memory (no I/O).
        ``skip_corrupt`` is accepted as ``SyncMap`` takes it: a replicated map holds no entry
        that does not decode (such a message is dropped on arrival)."""
        return self._live_copy()

    def _popitem_candidates(self) -> list[Key]:
        """Every live key, shuffled so servers draining the map at once mostly pick different
        ones.  ``pop`` here is a read then a delete (no single authority): two servers may both
        return the same entry (docs/dict.md)."""
        keys = list(self)
        random.shuffle(keys)
        return keys

    def preload(self, *, limit: int | None = None, retries: int = 3) -> int:
        """Nothing to load: every server holds the whole map from the start.  Returns what
        ``SyncMap.preload`` returns for a map whose entries are all cached already: 0 entries
        newly cached.  ``limit`` and ``retries`` are accepted for the same signature."""
        self._check_open()
        return 0

    # ---- writes ------------------------------------------------------------------------------

    def __setitem__(self, key: Key, value: Any) -> None:
        self.set(key, value)

    def set(self, key: Key, value: Any, *, ttl: float | None = None, fence: FenceArg | None = None
            ) -> int:  # fmt: skip
        """Store ``value``; returns its version, as ``SyncMap.set`` does.

        The version is the write's hybrid-clock time (``(wall ms << 16) + counter``): it grows
        with every write this server makes, exceeds every version this server has seen, and is
        the ``version`` of the change event and of ``get_with_meta`` for this write.  It orders
        writes to a key (last writer wins), but it is not a store's sequence number: two servers'
        concurrent writes may both return, and the higher version is what every server keeps.

        The write is published (confirmed by the broker), then applied here.  If the publish
        fails nothing is applied here (:class:`~syncmap.feed.base.FeedUnavailable`); if its
        outcome is unknown (``PublishOutcomeUnknown``) nothing is applied either, and the
        message, if it was delivered after all, arrives like any other.  ``fence=`` raises
        :class:`UnsupportedInMode` (a fence is checked by a store).
        """
        if fence is not None:
            raise no_fence("set")
        self._check_open()
        return self._write(*self._set_draft(key, value, deadline_of(ttl)))

    def __delitem__(self, key: Key) -> None:
        if not self.delete(key):
            raise KeyError(key)

    def delete(self, key: Key, *, fence: FenceArg | None = None) -> bool:
        """Delete ``key`` everywhere; returns whether this server held it."""
        if fence is not None:
            raise no_fence("delete")
        self._check_open()
        present = key in self
        self._write(self._delete_draft(key))
        return present

    def pop(self, key: Key, default: Any = _MISSING, *, fence: FenceArg | None = None) -> Any:
        """Remove ``key`` and return its value: a read, then a delete (not atomic here)."""
        if fence is not None:
            raise no_fence("pop")
        value = self.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise KeyError(key)
            return default
        self.delete(key)
        return value

    def update(  # type: ignore[override]
        self, other: Entries = (), /, *,
        ttl: float | None = None, fence: FenceArg | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        """One message per entry (a replicated map has no multi-key atomic step).  Every key
        and value is checked before the first is sent, as ``SyncMap.update`` does."""
        if fence is not None:
            raise no_fence("update")
        drafts = self._update_drafts(other, kwargs, ttl)
        self._check_open()
        for draft, value in drafts:
            self._write(draft, value)

    def clear(self, *, fence: FenceArg | None = None) -> None:
        """Remove every entry written before this call, on every server."""
        if fence is not None:
            raise no_fence("clear")
        self._check_open()
        self._write(self._clear_draft())

    def _write(self, draft: ReplicaMessage, value: Any = None) -> int:
        # Order: take the version -> publish (confirmed) -> apply here.  The echo of our own
        # message may be applied by the feed thread first; then the apply is a no-op.
        msg, outgoing = self._stamp(draft)
        self._send(outgoing)
        return self._applied_own(msg, value)
