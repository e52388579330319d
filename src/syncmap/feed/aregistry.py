"""Which asyncio feed class a feed URL names: the asyncio twin of ``base.feed_class``.

The same schemes as the thread feeds, each naming a module imported only when a URL uses it, so a
service that never uses Kafka needs no Kafka client; a missing client library fails at that moment
with the ``pip install 'syncmap[<extra>]'`` to run (``base.load_class``).
"""

from __future__ import annotations

from .abase import AsyncFeed
from .base import load_class

_AMODULES: dict[str, tuple[str, str, str]] = {
    "redis": ("aredis_pubsub", "AsyncRedisPubSubFeed", ""),
    "rediss": ("aredis_pubsub", "AsyncRedisPubSubFeed", ""),
    "unix": ("aredis_pubsub", "AsyncRedisPubSubFeed", ""),
    "redis+stream": ("aredis_stream", "AsyncRedisStreamFeed", ""),
    "rediss+stream": ("aredis_stream", "AsyncRedisStreamFeed", ""),
    "amqp": ("arabbitmq", "AsyncRabbitMQFeed", "amqp"),
    "amqps": ("arabbitmq", "AsyncRabbitMQFeed", "amqp"),
    "nats": ("anats", "AsyncNatsFeed", "nats"),
    "tls": ("anats", "AsyncNatsFeed", "nats"),
    "nats+jetstream": ("ajetstream", "AsyncJetStreamFeed", "nats"),
    "kafka": ("akafka", "AsyncKafkaFeed", "kafka"),
}


def async_feed_class(url: str) -> type[AsyncFeed]:
    """The asyncio feed class for ``url``'s scheme (see the module docstring)."""
    cls: type[AsyncFeed] = load_class(url, _AMODULES)
    return cls


def open_async_feed(url: str, topic: str, *, timeout: float = 5.0) -> AsyncFeed:
    """Open the asyncio feed ``url`` names for ``topic`` (one map); nothing connects yet."""
    return async_feed_class(url)(url, topic, timeout=timeout)
