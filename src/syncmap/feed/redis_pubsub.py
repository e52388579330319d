"""``redis://`` feed: Redis pub/sub through the process's one shared subscriber (``pubsub.py``).

Keeps nothing: a server that was disconnected has lost what was published meanwhile (``on_up``
says ``resumed=False``).  In store mode the write scripts publish on this channel themselves, in
the same atomic step as the write, so no message can be lost between a write and its publish.
"""

from __future__ import annotations

from ..store.topology import Topology
from .base import FeedHandler, Subscription
from .pubsub import Handler, Subscriber
from .redis_base import RedisFeed


class RedisPubSubFeed(RedisFeed):
    scheme = "redis"
    durable = False
    ordering = "total"  # one Redis server orders every PUBLISH

    @classmethod
    def topic_for(cls, namespace: str, name: str) -> str:
        return f"{namespace}:{{{name}}}:ch"

    def __init__(
        self, url: str, topic: str, *, timeout: float = 5.0, topology: Topology | None = None
    ) -> None:
        super().__init__(url, topic, timeout=timeout, topology=topology, redis_url=url)

    @property
    def channel(self) -> str:
        return self.topic

    def publish(self, payload: bytes, key: bytes | None = None, *, confirm: bool = True) -> None:
        self._call(("PUBLISH", self.topic, payload), write=True)

    def subscribe(self, handler: FeedHandler, start: str | None = None) -> Subscription:
        self._no_start(start)
        inner = Handler(
            lambda data: handler.on_message(data, None),
            lambda: handler.on_up(False),
            handler.on_down,
            lease=getattr(handler, "lease", None),  # a subclass may skip FeedHandler.__init__
        )
        sub = _PubSubSubscription(self, inner)
        self._keep(sub)
        sub.subscriber = Subscriber.attach_to(self.topology, self.topic, inner)
        return sub


class _PubSubSubscription(Subscription):
    turns = True

    def __init__(self, feed: RedisPubSubFeed, handler: Handler) -> None:
        self.feed, self.handler = feed, handler
        self.subscriber: Subscriber | None = None

    def give_turn(self, timeout: float) -> bool:
        sub = self.subscriber
        return True if sub is None else sub.give_turn(timeout)

    def close(self) -> None:
        sub, self.subscriber = self.subscriber, None
        if sub is not None:
            sub.detach(self.feed.topic, self.handler)
