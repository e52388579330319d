"""How a replicated map opens, loads, forks, reports and closes: the plumbing under the façade.

``ReplicatedMap`` (replicated.py) is the dict API; this base holds start-up (subscribe, catch up,
the ``snapshot=`` source), the re-open of a forked child, events, statistics and the life cycle,
on top of the feed side (``replicafeed.py``).  Split from replicated.py to keep each module one
concept (STYLE: ~400 lines).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, Self

from . import forksafe
from .core.nearcache import Event
from .errors import FeedError, MapClosed
from .feed.base import BEGINNING, FeedHandler, Subscription, feed_class
from .keys import Key
from .replicafeed import ReplicaFeed, log
from .replicalogic import Refusing, ReplicaStatistics, Snapshot
from .watch import Watch

__all__ = ["ReplicaBase", "ReplicaStatistics", "Snapshot"]


class ReplicaBase(ReplicaFeed):
    """The plumbing of :class:`~syncmap.ReplicatedMap` (its ``__init__`` sets these attributes)."""

    _opened_with: tuple[str, str, dict[str, Any]]
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
        self._wait_for_ping(load_timeout if durable else self.config.self_check_timeout)
        source = self._past_source(snapshot, durable, self._feed.describe())
        if source == "peers":
            self._request_sync()
            if not self._synced.wait(peers):
                log.info("syncmap %s: no peer answered within %s s; starting from what the feed "
                         "delivers", self.name, peers)  # fmt: skip
        elif source == "snapshot":
            assert snapshot is not None and not isinstance(snapshot, str)
            self._load(snapshot if isinstance(snapshot, Mapping) else snapshot())

    def _wait_for_ping(self, timeout: float) -> None:
        """Publish a ping and wait for it: the feed works, and (on a log) we have caught up."""
        arrived = threading.Event()
        nonce, ping = self._ping(arrived.set)
        try:
            self._send(ping)
            if not arrived.wait(timeout):
                raise FeedError(
                    f"a test message published on {self._feed.topic} ({self._feed.describe()}) "
                    f"did not come back within {timeout} s: this server would never see other "
                    "writes"
                )
        finally:
            self._pings.pop(nonce, None)

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

    def close(self) -> None:
        """Stop the feed and the background threads; reads then raise ``MapClosed`` as
        ``SyncMap``'s do.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._slots = Refusing(  # the read paths' next look raises MapClosed
            f"replicated map {self.name!r} is closed; open a new one"
        )
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
