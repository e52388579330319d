"""How a replicated map opens, loads, forks, reports and closes: the plumbing under the façade.

``ReplicatedMap`` (replicated.py) is the dict API; this base holds start-up (subscribe, catch up,
the ``snapshot=`` source), the re-open of a forked child, events, statistics and the life cycle,
on top of the feed side (``replicafeed.py``).  Split from replicated.py to keep each module one
concept (STYLE: ~400 lines).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Self

from . import forksafe
from .codec import encode_limited
from .core.nearcache import Event
from .core.replica import R_PING, ReplicaMessage, Slot
from .errors import ConfigurationError, FeedError, MapClosed, NoSnapshotSource
from .feed.base import BEGINNING, FeedHandler, Subscription, feed_class
from .keys import Key, encode_key, normal_key
from .replicafeed import ReplicaFeed, _wall_ms, log
from .watch import Watch

Snapshot = Mapping[Key, Any] | Callable[[], Mapping[Key, Any]] | str


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


class ReplicaBase(ReplicaFeed):
    """The plumbing of :class:`~syncmap.ReplicatedMap` (its ``__init__`` sets these attributes)."""

    _opened_with: tuple[str, str, dict[str, Any]]
    _slots: dict[Key, Slot]
    _closed: bool
    _forked: bool
    _worker: threading.Thread
    _sub: Subscription | None

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


_reopen_lock = threading.RLock()


@forksafe.at_fork
def _fresh_reopen_lock() -> None:
    global _reopen_lock
    _reopen_lock = threading.RLock()


class _ReopenOnUse(dict[Key, Any]):
    """A forked child's stand-in for a replicated map's slots: the first look re-opens the map
    (``ReplicatedMap._reopen_in_child``) and is answered from the re-opened map's slots."""

    def __init__(self, owner: ReplicaBase) -> None:
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
