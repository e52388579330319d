"""What the two asyncio Redis feeds share: a topology, commands in the feed's error terms, and
the subscriptions they close (the asyncio twin of ``redis_base.py``)."""

from __future__ import annotations

from typing import Any

from ..errors import StoreUnavailable, WriteOutcomeUnknown
from ..store.executor import Command
from ..store.topology import Topology, open_topology
from .abase import AsyncFeed, AsyncSubscription
from .base import FeedUnavailable, PublishOutcomeUnknown


class AsyncRedisFeed(AsyncFeed):
    """Base of the asyncio ``redis://`` and ``redis+stream://`` feeds: ``topology`` is the Redis
    the feed is on (``arouting.py`` compares its ``run_id`` with the store's).

    Commands go through an :class:`~syncmap.store.anode.AsyncNodeExecutor` of the feed's own,
    which serves the loop the feed is used on (one feed object, one loop).  ``publish`` runs on
    the caller's task; a cancel Python 3.11's ``wait_for`` loses in its send is raised by the
    executor itself (``anode.py``), so a cancelled publish never reports done: it raises
    ``CancelledError`` (sent, outcome unknown)."""

    def __init__(
        self, url: str, topic: str, *, timeout: float = 5.0, topology: Topology | None = None,
        redis_url: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(url, topic, timeout=timeout)
        self.topology = topology or open_topology(redis_url, timeout=timeout)
        self._transport = self.topology.async_executor(timeout=timeout)
        self._subs: list[AsyncSubscription] = []

    async def _call(self, command: Command, *, write: bool) -> Any:
        """One command through the transport, its failures told in the feed's terms: nothing
        sent (:class:`FeedUnavailable`) or sent with no reply (:class:`PublishOutcomeUnknown`)."""
        try:
            return (await self._transport.call([command], write=write))[0]
        except WriteOutcomeUnknown as exc:
            raise PublishOutcomeUnknown(f"{command[0]} on {self.describe()}: {exc}") from exc
        except StoreUnavailable as exc:
            raise FeedUnavailable(f"{command[0]} on {self.describe()} failed: {exc}") from exc

    def _keep(self, sub: AsyncSubscription) -> None:
        self._subs.append(sub)

    def _forget(self, sub: AsyncSubscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)

    async def aclose(self) -> None:
        """Close every subscription and the publishing connections (idempotent)."""
        subs, self._subs = self._subs, []
        for sub in subs:
            await sub.aclose()
        await self._transport.aclose()
