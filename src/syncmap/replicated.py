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
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

from . import forksafe
from .codec import Codec, encode_limited, is_immutable, make_codec
from .config import MapConfig
from .core.nearcache import COPY, Event
from .core.replica import (
    R_CLEAR,
    R_DEL,
    R_PING,
    R_SET,
    R_SYNC,
    R_SYNCED,
    Change,
    Replica,
    ReplicaMessage,
    Slot,
    decode,
    encode,
)
from .errors import (
    ConfigurationError,
    CorruptData,
    FeedError,
    MapClosed,
    NoSnapshotSource,
    SyncMapError,
)
from .events import Fanout
from .feed.base import BEGINNING, Feed, FeedHandler, Subscription, feed_class, open_feed
from .keys import Key, check_map_name, check_node_id, encode_key, normal_key
from .ratelog import RateLimitedLog
from .signing import SigningKey, signing_keys
from .storeonly import _MISSING, StoreOnly, needs_store, no_fence
from .views import SharedMapping
from .watch import Watch

if TYPE_CHECKING:
    from .mapbase import FenceArg

log = logging.getLogger("syncmap.replicated")
Snapshot = Mapping[Key, Any] | Callable[[], Mapping[Key, Any]] | str


_MAC = 32
_SYNC_ATTEMPTS = 20  # about 15 s of back-off


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


MAX_PENDING_ANSWERS = 1024
"""Peers whose sync answer may wait at once (each answer re-sends the whole map)."""


@dataclass(frozen=True, slots=True)
class ReplicaStatistics:
    """Counters of one replicated map on this server since it was opened."""

    entries: int
    applied: int
    ignored: int
    messages: int
    corrupt_messages: int
    syncs_requested: int
    syncs_answered: int
    feed_drops: int
    unauthenticated: int = 0
    sync_requests_dropped: int = 0
    events_dropped: int = 0


class ReplicatedMap(StoreOnly, SharedMapping):
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
        self.name = check_map_name(name)
        self.config = cfg = config or MapConfig()
        self.node_id = check_node_id(node_id)
        self._codec = make_codec(codec, value_type)
        # One key or several: the first signs, all verify (rotation, signing.py).
        self._keys = signing_keys(signing_key)
        self._key = self._keys[0] if self._keys else None
        self._unauthenticated = 0
        self._replica = Replica()
        self._slots = self._replica.slots  # the read path looks here directly
        self._lock = threading.Lock()
        self._closed = False
        self._stopping = threading.Event()
        self._messages = self._corrupt = self._syncs_requested = self._syncs_answered = 0
        self._corrupt_log = RateLimitedLog(log)  # a flood of bad messages: one line a minute
        # Peers with an answer queued: one pending answer (the whole state, sent when its turn
        # comes) covers every request that peer makes meanwhile, so the work queue holds at most
        # MAX_PENDING_ANSWERS answers however many requests arrive.
        self._answers_due: set[str] = set()
        self._sync_requests_dropped = 0
        self._drops = 0
        self._pings: dict[bytes, threading.Event] = {}
        self._synced = threading.Event()
        self._up = threading.Event()
        self._first_resumed: bool | None = None
        # Events as SyncMap delivers them (events.py).  A forked child's re-open keeps the
        # parent's subscribers, as a store-mode map does.
        self._fanout: Fanout = self.__dict__.get("_fanout") or Fanout(f"{name}.replicated")
        self._work: queue.Queue[tuple[str, str] | None] = queue.Queue()
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

    def _after_fork_in_child(self) -> None:
        """In a forked child (``forksafe``): the inherited copy hears no change any more (its
        subscription and worker are the parent's), so the first read or write in the child opens
        the map again exactly as the constructor did (feed, log replay or snapshot)."""
        if self._closed:
            return
        self._lock = threading.Lock()
        self._forked = True
        self._fanout.forked()
        self._slots = _ReopenOnUse(self)  # the read path's first look re-opens the map

    def _reopen_in_child(self) -> None:
        with _reopen_lock:
            if self._forked:
                name, feed, options = self._opened_with
                self.__init__(name, feed, **options)  # type: ignore[misc]
                self._fanout.start()  # the callbacks' thread was the parent's

    @staticmethod
    def _topic(url: str, namespace: str, name: str) -> str:
        return feed_class(url).topic_for(namespace, f"{name}.replicated")

    # ---- start-up ----------------------------------------------------------------------------

    def _start(self, snapshot: Snapshot | None, load_timeout: float, peers: float) -> None:
        durable = type(self._feed).durable
        handler = FeedHandler(self._on_message, self._on_up, self._on_down)
        self._worker.start()
        self._sub = self._feed.subscribe(handler, BEGINNING if durable else None)
        if not self._up.wait(self.config.self_check_timeout):
            raise FeedError(
                f"could not subscribe to {self._feed.topic} on {self._feed.describe()} within "
                f"{self.config.self_check_timeout} s; check the broker and the permissions"
            )
        self._ping(load_timeout if durable else self.config.self_check_timeout)
        complete = durable and self._first_resumed is not False
        if complete:
            return
        if snapshot is None:
            why = (
                "keeps no messages"
                if not durable
                else "no longer holds its whole history (it was trimmed)"
            )
            raise NoSnapshotSource(
                f"replicated map {self.name!r}: the feed {self._feed.describe()} {why}, so a "
                "server that starts now cannot learn what was written before. Pass snapshot="
                "'peers' (ask the running servers), a mapping or a function returning one "
                "(snapshot={} to start empty), or use a durable feed (nats+jetstream://, "
                "kafka://, redis+stream://)"
            )
        if isinstance(snapshot, str):
            if snapshot != "peers":
                raise ConfigurationError(f"snapshot={snapshot!r}: use 'peers', or a mapping")
            self._request_sync()
            if not self._synced.wait(peers):
                log.info("syncmap %s: no peer answered within %s s; starting from what the feed "
                         "delivers", self.name, peers)  # fmt: skip
            return
        data = snapshot() if callable(snapshot) else snapshot
        with self._lock:
            for key, value in data.items():
                field = encode_key(key, self.config.max_key_bytes)
                payload = self._payload(value)
                self._replica.load(normal_key(key), field, payload, self._cached(value, payload))

    def _ping(self, timeout: float) -> None:
        """Publish a ping and wait for it: the feed works, and (on a log) we have caught up."""
        nonce = os.urandom(16)
        arrived = self._pings[nonce] = threading.Event()
        msg = ReplicaMessage(R_PING, 0, self.node_id, nonce)
        self._feed.publish(self._seal(msg), key=b"\x00ping:" + self.node_id.encode())
        if not arrived.wait(timeout):
            raise FeedError(
                f"a test message published on {self._feed.topic} ({self._feed.describe()}) did "
                f"not come back within {timeout} s: this server would never see other writes"
            )
        del self._pings[nonce]

    # ---- the feed ----------------------------------------------------------------------------

    def _on_up(self, resumed: bool) -> None:
        if self._first_resumed is None:
            self._first_resumed = resumed
            self._up.set()
            return
        if not resumed:
            # Messages may be lost both ways, and the peers' own subscriptions may still be down
            # (a broker restart drops everyone; they come back one by one).  So ask the peers to
            # re-send, *and* re-send our state unasked: whoever comes back last, its request
            # reaches the ones already up, and its push reaches them too.  (A request alone is
            # lost when it reaches no one, and nothing would ask again.)  Worker thread.
            self._work.put(("request", ""))
            self._work.put(("answer", ""))

    def _on_down(self) -> None:
        self._drops += 1

    def _on_message(self, data: bytes, _position: str | None) -> None:
        self._messages += 1
        if self._key is not None:
            body, mac = data[:-_MAC], data[-_MAC:]
            if len(data) < _MAC or not any(
                hmac.compare_digest(mac, _mac(k, body)) for k in self._keys
            ):
                self._unauthenticated += 1
                if self._unauthenticated == 1 or self._unauthenticated % 1000 == 0:
                    log.warning(
                        "syncmap %s: dropped a message without this map's signature (%d so far)",
                        self.name, self._unauthenticated,
                    )  # fmt: skip
                return
            data = body
        try:
            msg = decode(data)
        except CorruptData as exc:
            self._corrupt += 1
            self._corrupt_log("syncmap %s: dropped a malformed message (%s; %d so far)",
                              self.name, exc, self._corrupt)  # fmt: skip
            return
        if msg.op == R_PING:
            waiter = self._pings.get(msg.field)
            if waiter is not None:
                waiter.set()
            return
        if msg.op == R_SYNC:
            if msg.origin != self.node_id:
                self._queue_answer(msg.origin)
            return
        if msg.op == R_SYNCED:
            if msg.field == self.node_id.encode():
                self._synced.set()
            return
        try:
            change = self._apply(msg)
        except (CorruptData, SyncMapError) as exc:
            self._corrupt += 1
            self._corrupt_log("syncmap %s: could not apply a message (%s; %d so far)",
                              self.name, exc, self._corrupt)  # fmt: skip
            return
        if change is not None:
            self._emit(change, msg.origin)

    def _apply(self, msg: ReplicaMessage) -> Change | None:
        with self._lock:
            if not self._replica.would_apply(msg):
                self._replica.ignored += 1
                self._replica.clock.observe(msg.hlc)
                return None
        value = None
        if msg.op == R_SET:
            value = self._cached(self._codec.decode(msg.payload), msg.payload)
        with self._lock:
            return self._replica.apply(msg, value)

    # ---- sync: re-sending state to a peer that may have missed messages ----------------------

    def _request_sync(self) -> None:
        self._syncs_requested += 1
        self._synced.clear()
        msg = ReplicaMessage(R_SYNC, 0, self.node_id)
        self._feed.publish(self._seal(msg), key=b"\x00sync:" + self.node_id.encode())

    def _queue_answer(self, peer: str) -> None:
        with self._lock:
            if peer in self._answers_due:
                return
            if len(self._answers_due) >= MAX_PENDING_ANSWERS:
                self._sync_requests_dropped += 1
                full = True
            else:
                self._answers_due.add(peer)
                full = False
        if full:  # that peer asks again after its next lossy reconnect
            self._corrupt_log("syncmap %s: %d peers already wait for a sync answer; a request "
                              "from %r was dropped (%d so far)", self.name, MAX_PENDING_ANSWERS,
                              peer[:80], self._sync_requests_dropped)  # fmt: skip
            return
        self._work.put(("answer", peer))

    def _work_loop(self) -> None:
        while (item := self._work.get()) is not None:
            what, peer = item
            if what == "answer":
                with self._lock:  # a request from now on needs an answer sent after this one
                    self._answers_due.discard(peer)
            # A broker that just came back may still refuse (Redis loading its data, a NATS
            # server re-creating its streams): retry, or this server (or the peer) would stay
            # behind with nothing left to ask again.  Backing off on the stop event, not a sleep
            # standing in for synchronisation.
            for attempt in range(_SYNC_ATTEMPTS):
                try:
                    if what == "request":
                        self._request_sync()
                    else:
                        self._answer_sync(peer)
                    break
                except Exception as exc:
                    log.warning("syncmap %s: sync %s failed (%s); attempt %d of %d", self.name,
                                what, exc, attempt + 1, _SYNC_ATTEMPTS)  # fmt: skip
                    if self._stopping.wait(min(0.05 * 2**attempt, 1.0)):
                        return

    def _answer_sync(self, peer: str) -> None:
        """Re-send every slot (tombstones too) with its own version, then say so."""
        self._syncs_answered += 1
        with self._lock:
            cleared = self._replica.cleared
            slots = list(self._replica.state())
        if cleared[0]:
            self._send(ReplicaMessage(R_CLEAR, cleared[0], cleared[1]), None, confirm=False)
        for key, slot in slots:
            field = encode_key(key, self.config.max_key_bytes)
            hlc, origin = slot.version
            if slot.payload is None:
                self._send(ReplicaMessage(R_DEL, hlc, origin, field), field, confirm=False)
            else:
                m = ReplicaMessage(R_SET, hlc, origin, field, slot.payload, slot.deadline_ms)
                self._send(m, field, confirm=False)
        self._send(ReplicaMessage(R_SYNCED, 0, self.node_id, peer.encode()), None, confirm=True)

    def _send(self, msg: ReplicaMessage, field: bytes | None, *, confirm: bool) -> None:
        self._feed.publish(self._seal(msg), key=field, confirm=confirm)

    def _seal(self, msg: ReplicaMessage) -> bytes:
        """The message's bytes, followed by its HMAC-SHA256 when the map has a signing key."""
        data = encode(msg)
        return data if self._key is None else data + _mac(self._key, data)

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

    def _live_slot(self, key: Key) -> Slot | None:
        """The live slot of ``key`` looked up by its plain form, or None; a key store mode
        would refuse is refused here too."""
        encode_key(key, self.config.max_key_bytes)
        slot = self._slots.get(normal_key(key))
        return slot if slot is not None and slot.live(_wall_ms()) else None

    def _value_of(self, slot: Slot) -> Any:
        v = slot.value
        return v if v is not COPY else self._codec.decode(slot.payload)  # type: ignore[arg-type]

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
        now = _wall_ms()
        with self._lock:
            return sum(1 for s in self._slots.values() if s.live(now))

    def __bool__(self) -> bool:
        now = _wall_ms()
        with self._lock:
            return any(s.live(now) for s in self._slots.values())

    def __iter__(self) -> Iterator[Key]:
        now = _wall_ms()
        with self._lock:
            keys = [k for k, s in self._slots.items() if s.live(now)]
        return iter(keys)

    def copy(self, *, skip_corrupt: bool = False) -> dict[Key, Any]:
        """A plain dict of every live entry, from this server's memory (no I/O).
        ``skip_corrupt`` is accepted as ``SyncMap`` takes it: a replicated map holds no entry
        that does not decode (such a message is dropped on arrival)."""
        now = _wall_ms()
        with self._lock:
            live = [(k, s.value, s.payload) for k, s in self._slots.items() if s.live(now)]
        return {k: v if v is not COPY else self._codec.decode(p) for k, v, p in live}  # type: ignore[arg-type]

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
        field = encode_key(key, self.config.max_key_bytes)
        payload = self._payload(value)
        msg = ReplicaMessage(R_SET, 0, self.node_id, field, payload, _deadline(ttl))
        return self._write(msg, self._cached(value, payload))

    def __delitem__(self, key: Key) -> None:
        if not self.delete(key):
            raise KeyError(key)

    def delete(self, key: Key, *, fence: FenceArg | None = None) -> bool:
        """Delete ``key`` everywhere; returns whether this server held it."""
        if fence is not None:
            raise no_fence("delete")
        self._check_open()
        present = key in self
        field = encode_key(key, self.config.max_key_bytes)
        self._write(ReplicaMessage(R_DEL, 0, self.node_id, field))
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
        self, other: Mapping[Key, Any] | Iterable[tuple[Key, Any]] = (), /, *,
        ttl: float | None = None, fence: FenceArg | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        """One message per entry (a replicated map has no multi-key atomic step).  Every key
        and value is checked before the first is sent, as ``SyncMap.update`` does."""
        if fence is not None:
            raise no_fence("update")
        pairs = other.items() if isinstance(other, Mapping) else other
        deadline = _deadline(ttl)
        limit = self.config.max_key_bytes
        drafts = [(encode_key(k, limit), self._payload(v), v) for k, v in [*pairs, *kwargs.items()]]
        self._check_open()
        for field, payload, value in drafts:
            self._write(ReplicaMessage(R_SET, 0, self.node_id, field, payload, deadline),
                        self._cached(value, payload))  # fmt: skip

    def clear(self, *, fence: FenceArg | None = None) -> None:
        """Remove every entry written before this call, on every server."""
        if fence is not None:
            raise no_fence("clear")
        self._check_open()
        self._write(ReplicaMessage(R_CLEAR, 0, self.node_id))

    def _write(self, draft: ReplicaMessage, value: Any = None) -> int:
        # Order: take the version -> publish (confirmed) -> apply here.  The echo of our own
        # message may be applied by the feed thread first; then the apply below is a no-op.
        with self._lock:
            hlc = self._replica.clock.tick(_wall_ms())
        msg = ReplicaMessage(draft.op, hlc, draft.origin, draft.field, draft.payload,
                             draft.deadline_ms)  # fmt: skip
        self._feed.publish(self._seal(msg), key=msg.field or None)
        with self._lock:
            change = self._replica.apply(msg, value)
        if change is not None:
            self._emit(change, self.node_id)
        return hlc

    # ---- events, statistics, life cycle ------------------------------------------------------

    def subscribe(
        self, callback: Callable[[Event], None], *, inline: bool = False
    ) -> Callable[[], None]:
        """Call ``callback(event)`` for every change applied here; returns an unsubscriber.

        As in store mode, callbacks run on a thread of their own, so a slow one never delays
        applying changes; ``inline=True`` runs it on the thread that applied the change (the
        feed's, or the writer's for its own write): it must be quick.  ``event.version`` is
        the write's hybrid-clock version (what ``set()`` returned on the writing server)."""
        self._check_open()
        return self._fanout.subscribe(callback, inline)

    def watch(self, maxsize: int = 10_000) -> Watch:
        """Iterate over change events as they happen: ``with m.watch() as events: ...``."""
        self._check_open()
        return Watch(self._fanout, self._fanout.watch_queue(maxsize))

    def _emit(self, change: Change, origin: str) -> None:
        fanout = self._fanout
        if fanout.wanted:
            fanout.emit(Event(change.key, change.op, change.version[0],
                              change.version[1] or origin))  # fmt: skip

    def statistics(self) -> ReplicaStatistics:
        now = _wall_ms()
        with self._lock:  # the replica's own slots: statistics stay readable after close()
            entries = sum(1 for s in self._replica.slots.values() if s.live(now))
        return ReplicaStatistics(
            entries=entries, applied=self._replica.applied, ignored=self._replica.ignored,
            messages=self._messages, corrupt_messages=self._corrupt,
            syncs_requested=self._syncs_requested, syncs_answered=self._syncs_answered,
            feed_drops=self._drops, unauthenticated=self._unauthenticated,
            sync_requests_dropped=self._sync_requests_dropped,
            events_dropped=self._fanout.dropped,
        )  # fmt: skip

    def close(self) -> None:
        """Stop the feed and the background threads; reads then raise ``MapClosed`` as
        ``SyncMap``'s do.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._slots = _Closed(self.name)  # the read paths' next look raises MapClosed
        self._stopping.set()
        if self._sub is not None:
            self._sub.close()
        self._work.put(None)
        if self._worker.is_alive() and self._worker is not threading.current_thread():
            self._worker.join(timeout=5)
        self._fanout.stop()
        self._feed.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        entries = self.statistics().entries  # len(self) raises once closed
        return (f"<ReplicatedMap {self.name!r} on {self._feed.describe()}, {entries} entries"
                f"{' (closed)' if self._closed else ''}>")  # fmt: skip

    def _check_open(self) -> None:
        if self._closed:
            raise MapClosed(f"replicated map {self.name!r} is closed; open a new one")
        if self._forked:
            self._reopen_in_child()

    def _payload(self, value: Any) -> bytes:
        return encode_limited(
            self._codec,
            value,
            self.config.max_value_bytes,
            " (and check the broker's message size limit)",
        )

    def _cached(self, value: Any, payload: bytes) -> Any:
        return value if is_immutable(value) else COPY


def _deadline(ttl: float | None) -> int:
    """The wall-clock expiry (ms) of a write with ``ttl`` seconds, 0 for none; ``ttl`` is
    checked as ``SyncMap`` checks it."""
    if ttl is None:
        return 0
    if not ttl > 0:
        raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
    return _wall_ms() + max(1, round(ttl * 1000))


_reopen_lock = threading.RLock()


@forksafe.at_fork
def _fresh_reopen_lock() -> None:
    global _reopen_lock
    _reopen_lock = threading.RLock()


class _ReopenOnUse(dict[Key, Any]):
    """A forked child's stand-in for a replicated map's slots: the first look re-opens the map
    (``ReplicatedMap._reopen_in_child``) and is answered from the re-opened map's slots."""

    def __init__(self, owner: ReplicatedMap) -> None:
        super().__init__()
        self._owner = owner

    def _real(self) -> dict[Key, Any]:
        self._owner._reopen_in_child()
        return self._owner._slots

    def get(self, key: Key, default: Any = None) -> Any:
        return self._real().get(key, default)

    def values(self) -> Any:
        return self._real().values()

    def items(self) -> Any:
        return self._real().items()


class _Closed(dict[Key, Any]):
    """A closed map's stand-in for its slots: every read raises ``MapClosed``, as on a closed
    ``SyncMap`` (the hit path pays nothing for the check)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    def _refuse(self) -> MapClosed:
        return MapClosed(f"replicated map {self._name!r} is closed; open a new one")

    def get(self, key: Key, default: Any = None) -> Any:
        raise self._refuse()

    def values(self) -> Any:
        raise self._refuse()

    def items(self) -> Any:
        raise self._refuse()
