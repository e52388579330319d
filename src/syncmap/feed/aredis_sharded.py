"""The asyncio twin of ``redis_sharded.py``: a map's per-bucket sharded channels on a Redis
Cluster, through the loop's sharded subscriber (``asharded.py``).  The same channels, the same
:class:`~syncmap.feed.redis_sharded.ChannelSet` (down when any channel is, up when all are)."""

from __future__ import annotations

from collections.abc import Sequence

from ..store.cluster import ClusterTopology
from .abase import AsyncSubscription
from .aredis_base import AsyncRedisFeed
from .asharded import AsyncShardedSubscriber
from .base import FeedHandler
from .redis_sharded import ChannelSet


class AsyncRedisShardedFeed(AsyncRedisFeed):
    """A store-mode map's own feed on a sharded topology, on asyncio."""

    scheme = "redis"
    durable = False
    ordering = "bucket"

    def __init__(self, url: str, topic: str, channels: Sequence[str], *, timeout: float = 5.0,
                 topology: ClusterTopology) -> None:  # fmt: skip
        super().__init__(url, topic, timeout=timeout, topology=topology)
        self.cluster = topology
        self.channels = list(channels)

    async def publish(
        self, payload: bytes, key: bytes | None = None, *, confirm: bool = True
    ) -> None:
        """On every bucket's channel, as the thread driver's (the self-check ping)."""
        for channel in self.channels:
            await self._call(("SPUBLISH", channel, payload), write=True)

    async def subscribe(self, handler: FeedHandler, start: str | None = None) -> AsyncSubscription:
        self._no_start(start)
        sub = _ShardedSubscription(self, ChannelSet(self.channels, handler))
        for channel, inner in sub.attached:
            sub.subscriber = AsyncShardedSubscriber.attach_to(self.cluster, channel, inner)
        self._keep(sub)
        return sub


class _ShardedSubscription(AsyncSubscription):
    def __init__(self, feed: AsyncRedisShardedFeed, channels: ChannelSet) -> None:
        self.feed = feed
        self.attached = channels.handlers()
        self.subscriber: AsyncShardedSubscriber | None = None

    async def aclose(self) -> None:
        """Nothing more reaches the handler from here on, before any await (idempotent)."""
        sub, self.subscriber = self.subscriber, None
        self.feed._forget(self)
        if sub is not None:
            for channel, handler in self.attached:
                await sub.detach(channel, handler)
