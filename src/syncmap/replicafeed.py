"""The thread driver of a replicated map's feed side: the worker thread that sends sync requests
and answers.

Every decision (verify, decode, apply a message; which peers wait for an answer, and what an
answer re-sends) is :class:`~syncmap.replicalogic.ReplicaLogic`'s, shared with the asyncio map
(``aio/replicated.py``); the feed's threads call its ``_on_message``, ``_on_up`` and ``_on_down``.
This layer publishes what the logic hands it, on the worker thread, with retries.  The lowest
layer of :class:`~syncmap.ReplicatedMap` (replicated.py), under ``replicabase.py``.
"""

from __future__ import annotations

import queue
import threading

from .events import Fanout
from .feed.base import Feed
from .replicalogic import Outgoing, ReplicaLogic, Work, _wall_ms, log
from .views import SharedMapping

__all__ = ["ReplicaFeed", "_wall_ms", "log"]

SYNC_ATTEMPTS = 20  # about 15 s of back-off


class ReplicaFeed(ReplicaLogic, SharedMapping):
    """The feed side of :class:`~syncmap.ReplicatedMap` (its ``__init__`` sets these attributes)."""

    _feed: Feed
    _fanout: Fanout
    _stopping: threading.Event
    _work: queue.Queue[Work]
    _synced: threading.Event
    _up: threading.Event

    def _work_loop(self) -> None:
        while (item := self._work.get()) is not None:
            what, peer = item
            if what == "answer":
                self._answer_taken(peer)
            # A broker that just came back may still refuse (Redis loading its data, a NATS
            # server re-creating its streams): retry, or this server (or the peer) would stay
            # behind with nothing left to ask again.  Backing off on the stop event, not a sleep
            # standing in for synchronisation.
            for attempt in range(SYNC_ATTEMPTS):
                try:
                    if what == "request":
                        self._request_sync()
                    else:
                        self._answer_sync(peer)
                    break
                except Exception as exc:
                    log.warning("syncmap %s: sync %s failed (%s); attempt %d of %d", self.name,
                                what, exc, attempt + 1, SYNC_ATTEMPTS)  # fmt: skip
                    if self._stopping.wait(min(0.05 * 2**attempt, 1.0)):
                        return

    def _request_sync(self) -> None:
        self._synced.clear()
        self._send(self._sync_request())

    def _answer_sync(self, peer: str) -> None:
        for outgoing in self._sync_answer(peer):
            self._send(outgoing)

    def _send(self, outgoing: Outgoing) -> None:
        data, key, confirm = outgoing
        self._feed.publish(data, key=key, confirm=confirm)
