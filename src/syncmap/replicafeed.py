"""What a replicated map does with its feed: messages in, sync requests and answers out.

Every message is verified (when the map signs), decoded and applied with the merge rule of
``core/replica.py``; a peer's sync request is queued (one pending answer per peer, at most
``MAX_PENDING_ANSWERS``) and answered by the worker thread, which re-sends this server's state.
The lowest layer of :class:`~syncmap.ReplicatedMap` (replicated.py), under ``replicabase.py``;
split from replicated.py to keep each module one concept (STYLE: ~400 lines).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import queue
import threading
import time
from typing import Any

from .codec import Codec, is_immutable
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
    decode,
    encode,
)
from .errors import CorruptData, SyncMapError
from .events import Fanout
from .feed.base import Feed
from .keys import encode_key
from .ratelog import RateLimitedLog
from .views import SharedMapping

log = logging.getLogger("syncmap.replicated")

_MAC = 32
_SYNC_ATTEMPTS = 20  # about 15 s of back-off


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


MAX_PENDING_ANSWERS = 1024
"""Peers whose sync answer may wait at once (each answer re-sends the whole map)."""


class ReplicaFeed(SharedMapping):
    """The feed side of :class:`~syncmap.ReplicatedMap` (its ``__init__`` sets these attributes)."""

    name: str
    node_id: str
    config: MapConfig
    _codec: Codec
    _keys: tuple[bytes, ...]
    _key: bytes | None
    _replica: Replica
    _lock: threading.Lock
    _stopping: threading.Event
    _feed: Feed
    _fanout: Fanout
    _work: queue.Queue[tuple[str, str] | None]
    _pings: dict[bytes, threading.Event]
    _synced: threading.Event
    _up: threading.Event
    _first_resumed: bool | None
    _answers_due: set[str]
    _corrupt_log: RateLimitedLog
    _messages: int
    _corrupt: int
    _unauthenticated: int
    _syncs_requested: int
    _syncs_answered: int
    _sync_requests_dropped: int
    _drops: int

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

    def _emit(self, change: Change, origin: str) -> None:
        fanout = self._fanout
        if fanout.wanted:
            fanout.emit(Event(change.key, change.op, change.version[0],
                              change.version[1] or origin))  # fmt: skip

    def _cached(self, value: Any, payload: bytes) -> Any:
        return value if is_immutable(value) else COPY
