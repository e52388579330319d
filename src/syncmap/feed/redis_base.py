"""What the two Redis feeds share: a topology, commands in the feed's error terms, subscriptions."""

from __future__ import annotations

import threading
from typing import Any

from ..errors import StoreUnavailable, WriteOutcomeUnknown
from ..store.executor import Command
from ..store.topology import Topology, open_topology
from .base import Feed, FeedUnavailable, PublishOutcomeUnknown, Subscription


class RedisFeed(Feed):
    """Base of ``redis://`` and ``redis+stream://``: ``topology`` is the Redis the feed is on (the
    store routing compares its ``run_id`` with the store's, ``feed/routing.py``)."""

    def __init__(
        self, url: str, topic: str, *, timeout: float = 5.0, topology: Topology | None = None,
        redis_url: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(url, topic, timeout=timeout)
        self.topology = topology or open_topology(redis_url, timeout=timeout)
        # The process's shared executor for this Redis (issue 16): a map's feed publishes only
        # its start-up ping (and, relayed, its changes), so a connection of its own per map sat
        # idle; one per process and timeout serves them all.  Never closed by a feed.
        self._transport = self.topology.shared_executor(timeout)
        self._subs: list[Subscription] = []
        self._lock = threading.Lock()

    def _call(self, command: Command, *, write: bool) -> Any:
        """One command through the transport, its failures told in the feed's terms."""
        try:
            return self._transport.call([command], write=write)[0]
        except WriteOutcomeUnknown as exc:
            raise PublishOutcomeUnknown(f"{command[0]} on {self.describe()}: {exc}") from exc
        except StoreUnavailable as exc:
            raise FeedUnavailable(f"{command[0]} on {self.describe()} failed: {exc}") from exc

    def _keep(self, sub: Subscription) -> None:
        with self._lock:
            self._subs.append(sub)

    def close(self) -> None:
        with self._lock:
            subs, self._subs = self._subs, []
        for sub in subs:
            sub.close()
