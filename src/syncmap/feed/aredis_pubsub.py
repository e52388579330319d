"""``redis://`` feed on asyncio: Redis pub/sub through the loop's one shared subscriber
(``apubsub.py``); the asyncio twin of ``redis_pubsub.py`` (same channel, same promises).

Keeps nothing: a server that was disconnected has lost what was published meanwhile (``on_up``
says ``resumed=False``).  In store mode the write scripts publish on this channel themselves.
"""

from __future__ import annotations

from ..store.topology import Topology
from .abase import AsyncSubscription
from .apubsub import AsyncSubscriber, Handler
from .aredis_base import AsyncRedisFeed
from .base import FeedHandler
from .redis_pubsub import RedisPubSubFeed


class AsyncRedisPubSubFeed(AsyncRedisFeed):
    scheme = "redis"
    durable = False
    ordering = "total"  # one Redis server orders every PUBLISH

    @classmethod
    def topic_for(cls, namespace: str, name: str) -> str:
        return RedisPubSubFeed.topic_for(namespace, name)

    def __init__(
        self, url: str, topic: str, *, timeout: float = 5.0, topology: Topology | None = None
    ) -> None:
        super().__init__(url, topic, timeout=timeout, topology=topology, redis_url=url)

    @property
    def channel(self) -> str:
        return self.topic

    async def publish(
        self, payload: bytes, key: bytes | None = None, *, confirm: bool = True
    ) -> None:
        await self._call(("PUBLISH", self.topic, payload), write=True)

    async def subscribe(self, handler: FeedHandler, start: str | None = None) -> AsyncSubscription:
        """Attach to the loop's subscriber; ``handler.on_up(False)`` follows the confirmation."""
        self._no_start(start)
        inner = Handler(
            lambda data: handler.on_message(data, None),
            lambda: handler.on_up(False),
            handler.on_down,
            lease=handler.lease,
        )
        sub = _PubSubSubscription(self, inner)
        sub.subscriber = AsyncSubscriber.attach_to(self.topology, self.topic, inner)
        self._keep(sub)
        return sub


class _PubSubSubscription(AsyncSubscription):
    def __init__(self, feed: AsyncRedisPubSubFeed, handler: Handler) -> None:
        self.feed, self.handler = feed, handler
        self.subscriber: AsyncSubscriber | None = None

    async def aclose(self) -> None:
        """Nothing more reaches the handler from here on, before any await (idempotent)."""
        sub, self.subscriber = self.subscriber, None
        self.feed._forget(self)
        if sub is not None:
            await sub.detach(self.feed.topic, self.handler)
