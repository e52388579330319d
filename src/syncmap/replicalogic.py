"""What a replicated map decides, whatever drives it: the driver-independent half of its mode.

Both drivers share it: the thread map (``replicated.py`` over ``replicabase.py`` and
``replicafeed.py``: feed threads and a worker thread) and the asyncio map (``aio/replicated.py``:
the loop's feeds and a worker task).  Nothing here does I/O, waits or sleeps: it verifies,
decodes and applies a feed message with the merge rule of ``core/replica.py``, seals the messages
a driver publishes (writes, pings, sync requests and answers), keeps the pending sync answers
bounded, decides where a starting map's past comes from, and answers local reads.  A driver
publishes what it is handed and waits on the flags it passed in (``threading.Event`` or
``asyncio.Event``: both ``set()``); it runs these methods on its feed's thread or on the loop.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

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
from .errors import ConfigurationError, CorruptData, MapClosed, NoSnapshotSource, SyncMapError
from .keys import Entries, Key, check_map_name, check_node_id, encode_key, normal_key
from .ratelog import RateLimitedLog
from .signing import SigningKey, signing_keys

log = logging.getLogger("syncmap.replicated")

_MAC = 32
MAX_PENDING_ANSWERS = 1024
"""Peers whose sync answer may wait at once (each answer re-sends the whole map)."""

Snapshot = Mapping[Key, Any] | Callable[[], Mapping[Key, Any]] | str
Work = tuple[str, str] | None
"""A worker's job: ("request", "") or ("answer", peer); None stops the worker."""
Outgoing = tuple[bytes, bytes | None, bool]
"""A sealed message to publish: (data, key, confirm)."""


class Flag(Protocol):
    def set(self) -> None: ...


class WorkQueue(Protocol):
    def put_nowait(self, item: Work, /) -> None: ...


class EventSink(Protocol):
    dropped: int

    @property
    def wanted(self) -> bool: ...

    def emit(self, event: Event) -> None: ...


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


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def deadline_of(ttl: float | None) -> int:
    """The wall-clock expiry (ms) of a write with ``ttl`` seconds, 0 for none; ``ttl`` is
    checked as ``SyncMap`` checks it."""
    if ttl is None:
        return 0
    if not ttl > 0:
        raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
    return _wall_ms() + max(1, round(ttl * 1000))


class ReplicaLogic:
    """The decisions of a replicated map (module docstring).  A driver calls :meth:`_init_logic`,
    then sets ``_fanout``, ``_work`` (a queue the worker drains), ``_up`` and ``_synced``."""

    _fanout: EventSink
    _work: WorkQueue
    _up: Flag
    _synced: Flag

    def _init_logic(self, name: str, config: MapConfig | None, node_id: str | None,
                    codec: str | Codec | None, value_type: Any,
                    signing_key: SigningKey) -> None:  # fmt: skip
        self.name = check_map_name(name)
        self.config = config or MapConfig()
        self.node_id = check_node_id(node_id)
        self._codec = make_codec(codec, value_type)
        # One key or several: the first signs, all verify (rotation, signing.py).
        self._keys = signing_keys(signing_key)
        self._key = self._keys[0] if self._keys else None
        self._replica = Replica()
        self._slots: dict[Key, Any] = self._replica.slots  # the read path looks here directly
        self._lock = threading.Lock()  # never held across an await or a publish
        self._messages = self._corrupt = self._unauthenticated = 0
        self._syncs_requested = self._syncs_answered = self._sync_requests_dropped = 0
        self._drops = 0
        self._corrupt_log = RateLimitedLog(log)  # a flood of bad messages: one line a minute
        # Peers with an answer queued: one pending answer (the whole state, sent when its turn
        # comes) covers every request that peer makes meanwhile, so the work queue holds at most
        # MAX_PENDING_ANSWERS answers however many requests arrive.
        self._answers_due: set[str] = set()
        self._pings: dict[bytes, Callable[[], None]] = {}
        self._first_resumed: bool | None = None

    # ---- the feed's callbacks ----------------------------------------------------------------

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
            # lost when it reaches no one, and nothing would ask again.)  The worker sends both.
            self._work.put_nowait(("request", ""))
            self._work.put_nowait(("answer", ""))

    def _on_down(self) -> None:
        self._drops += 1

    def _on_message(self, data: bytes, _position: str | None) -> None:
        self._messages += 1
        msg = self._open_envelope(data)
        if msg is None:
            return
        if msg.op == R_PING:
            arrived = self._pings.get(msg.field)
            if arrived is not None:
                arrived()
        elif msg.op == R_SYNC:
            if msg.origin != self.node_id:
                self._queue_answer(msg.origin)
        elif msg.op == R_SYNCED:
            if msg.field == self.node_id.encode():
                self._synced.set()
        else:
            try:
                change = self._apply(msg)
            except (CorruptData, SyncMapError) as exc:
                self._corrupt += 1
                self._corrupt_log("syncmap %s: could not apply a message (%s; %d so far)",
                                  self.name, exc, self._corrupt)  # fmt: skip
                return
            if change is not None:
                self._emit(change, msg.origin)

    def _open_envelope(self, data: bytes) -> ReplicaMessage | None:
        """The message ``data`` carries, or None (counted, logged) when it is not this map's
        signed message or does not parse."""
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
                return None
            data = body
        try:
            return decode(data)
        except CorruptData as exc:
            self._corrupt += 1
            self._corrupt_log("syncmap %s: dropped a malformed message (%s; %d so far)",
                              self.name, exc, self._corrupt)  # fmt: skip
            return None

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
        self._work.put_nowait(("answer", peer))

    def _answer_taken(self, peer: str) -> None:
        """The worker starts ``peer``'s answer: a request from now on needs another one."""
        with self._lock:
            self._answers_due.discard(peer)

    def _sync_request(self) -> Outgoing:
        """The request asking every peer to re-send what it holds."""
        self._syncs_requested += 1
        msg = ReplicaMessage(R_SYNC, 0, self.node_id)
        return self._seal(msg), b"\x00sync:" + self.node_id.encode(), True

    def _sync_answer(self, peer: str) -> Iterator[Outgoing]:
        """Every slot (tombstones too) with its own version, then "done" (confirmed) for
        ``peer``.  The state is copied under the lock first: none is held while publishing."""
        self._syncs_answered += 1
        with self._lock:
            cleared = self._replica.cleared
            slots = list(self._replica.state())
        if cleared[0]:
            yield self._seal(ReplicaMessage(R_CLEAR, cleared[0], cleared[1])), None, False
        for key, slot in slots:
            field = encode_key(key, self.config.max_key_bytes)
            hlc, origin = slot.version
            if slot.payload is None:
                msg = ReplicaMessage(R_DEL, hlc, origin, field)
            else:
                msg = ReplicaMessage(R_SET, hlc, origin, field, slot.payload, slot.deadline_ms)
            yield self._seal(msg), field, False
        yield self._seal(ReplicaMessage(R_SYNCED, 0, self.node_id, peer.encode())), None, True

    # ---- start-up ----------------------------------------------------------------------------

    def _ping(self, arrived: Callable[[], None]) -> tuple[bytes, Outgoing]:
        """(nonce, the ping to publish): ``arrived()`` is called when it comes back; the driver
        removes ``_pings[nonce]`` once done waiting."""
        nonce = os.urandom(16)
        self._pings[nonce] = arrived
        msg = ReplicaMessage(R_PING, 0, self.node_id, nonce)
        return nonce, (self._seal(msg), b"\x00ping:" + self.node_id.encode(), True)

    def _past_source(self, snapshot: object, durable: bool, where: str) -> str | None:
        """After the ping came back, where the past comes from: None when the feed delivered
        it (a durable log that was not trimmed), ``"peers"``, or ``"snapshot"`` (load the
        ``snapshot=`` mapping, or what its function returns).  A feed that keeps nothing with
        no snapshot source is refused (``NoSnapshotSource``)."""
        if durable and self._first_resumed is not False:
            return None
        if snapshot is None:
            why = "keeps no messages" if not durable else (
                "no longer holds its whole history (it was trimmed)")  # fmt: skip
            raise NoSnapshotSource(
                f"replicated map {self.name!r}: the feed {where} {why}, so a "
                "server that starts now cannot learn what was written before. Pass snapshot="
                "'peers' (ask the running servers), a mapping or a function returning one "
                "(snapshot={} to start empty), or use a durable feed (nats+jetstream://, "
                "kafka://, redis+stream://)"
            )
        if isinstance(snapshot, str):
            if snapshot != "peers":
                raise ConfigurationError(f"snapshot={snapshot!r}: use 'peers', or a mapping")
            return "peers"
        return "snapshot"

    def _load(self, data: Mapping[Key, Any]) -> None:
        """Entries of a ``snapshot=`` mapping, at version zero: every real write beats them."""
        with self._lock:
            for key, value in data.items():
                field = encode_key(key, self.config.max_key_bytes)
                payload = self._payload(value)
                self._replica.load(normal_key(key), field, payload, self._cached(value, payload))

    # ---- writes: draft -> stamp (the version) -> publish (the driver) -> applied here --------

    def _set_draft(self, key: Key, value: Any, deadline_ms: int) -> tuple[ReplicaMessage, Any]:
        """The unstamped message setting ``key`` and the value to keep for readers."""
        field = encode_key(key, self.config.max_key_bytes)
        payload = self._payload(value)
        draft = ReplicaMessage(R_SET, 0, self.node_id, field, payload, deadline_ms)
        return draft, self._cached(value, payload)

    def _update_drafts(self, other: Entries,
                       kwargs: Mapping[str, Any], ttl: float | None
                       ) -> list[tuple[ReplicaMessage, Any]]:  # fmt: skip
        """One draft per entry, every key and value checked before the first is sent."""
        pairs = other.items() if isinstance(other, Mapping) else other
        deadline = deadline_of(ttl)
        return [self._set_draft(k, v, deadline) for k, v in [*pairs, *kwargs.items()]]

    def _delete_draft(self, key: Key) -> ReplicaMessage:
        return ReplicaMessage(R_DEL, 0, self.node_id, encode_key(key, self.config.max_key_bytes))

    def _clear_draft(self) -> ReplicaMessage:
        return ReplicaMessage(R_CLEAR, 0, self.node_id)

    def _stamp(self, draft: ReplicaMessage) -> tuple[ReplicaMessage, Outgoing]:
        """The write with its version (this server's hybrid clock), and its sealed form."""
        with self._lock:
            hlc = self._replica.clock.tick(_wall_ms())
        msg = ReplicaMessage(draft.op, hlc, draft.origin, draft.field, draft.payload,
                             draft.deadline_ms)  # fmt: skip
        return msg, (self._seal(msg), msg.field or None, True)

    def _applied_own(self, msg: ReplicaMessage, value: Any) -> int:
        """Apply our own write once the broker confirmed it.  Its echo may have been applied by
        the feed first; then this is a no-op.  Returns the write's version."""
        with self._lock:
            change = self._replica.apply(msg, value)
        if change is not None:
            self._emit(change, self.node_id)
        return msg.hlc

    # ---- local reads -------------------------------------------------------------------------

    def _live_slot(self, key: Key) -> Slot | None:
        """The live slot of ``key`` looked up by its plain form, or None; a key store mode
        would refuse is refused here too."""
        encode_key(key, self.config.max_key_bytes)
        slot: Slot | None = self._slots.get(normal_key(key))
        return slot if slot is not None and slot.live(_wall_ms()) else None

    def _find(self, key: Key) -> Slot | None:
        """The hit path's lookup (one dict look, the key's class, the TTL), else
        :meth:`_live_slot`, which refuses what store mode refuses."""
        try:
            slot: Slot | None = self._slots.get(key)
        except TypeError:  # unhashable: _live_slot raises KeyTypeError
            slot = None
        if slot is None or key.__class__ is not slot.kc or slot.payload is None or (
            slot.deadline_ms and slot.deadline_ms <= _wall_ms()
        ):  # fmt: skip
            return self._live_slot(key)
        return slot

    def _value_of(self, slot: Slot) -> Any:
        v = slot.value
        return v if v is not COPY else self._codec.decode(slot.payload)  # type: ignore[arg-type]

    def _live_keys(self) -> list[Key]:
        now = _wall_ms()
        with self._lock:
            return [k for k, s in self._slots.items() if s.live(now)]

    def _live_copy(self) -> dict[Key, Any]:
        now = _wall_ms()
        with self._lock:
            live = [(k, s.value, s.payload) for k, s in self._slots.items() if s.live(now)]
        return {k: v if v is not COPY else self._codec.decode(p) for k, v, p in live}

    # ---- helpers -----------------------------------------------------------------------------

    def _seal(self, msg: ReplicaMessage) -> bytes:
        """The message's bytes, followed by its HMAC-SHA256 when the map has a signing key."""
        data = encode(msg)
        return data if self._key is None else data + _mac(self._key, data)

    def _emit(self, change: Change, origin: str) -> None:
        fanout = self._fanout
        if fanout.wanted:
            fanout.emit(Event(change.key, change.op, change.version[0],
                              change.version[1] or origin))  # fmt: skip

    def _cached(self, value: Any, payload: bytes) -> Any:
        return value if is_immutable(value) else COPY

    def _payload(self, value: Any) -> bytes:
        return encode_limited(
            self._codec,
            value,
            self.config.max_value_bytes,
            " (and check the broker's message size limit)",
        )

    def statistics(self) -> ReplicaStatistics:
        now = _wall_ms()
        with self._lock:  # the replica's own slots: statistics stay readable after close
            entries = sum(1 for s in self._replica.slots.values() if s.live(now))
        return ReplicaStatistics(
            entries=entries, applied=self._replica.applied, ignored=self._replica.ignored,
            messages=self._messages, corrupt_messages=self._corrupt,
            syncs_requested=self._syncs_requested, syncs_answered=self._syncs_answered,
            feed_drops=self._drops, unauthenticated=self._unauthenticated,
            sync_requests_dropped=self._sync_requests_dropped,
            events_dropped=self._fanout.dropped,
        )  # fmt: skip


class Refusing(dict[Key, Any]):
    """A closed (or not yet opened) map's stand-in for its slots: every read raises
    ``MapClosed``, as on a closed ``SyncMap`` (the hit path pays nothing for the check)."""

    def __init__(self, message: str) -> None:
        super().__init__()
        self._message = message

    def get(self, key: Key, default: Any = None) -> Any:
        raise MapClosed(self._message)

    def values(self) -> Any:
        raise MapClosed(self._message)

    def items(self) -> Any:
        raise MapClosed(self._message)
