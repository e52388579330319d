"""Which feed a store-mode map uses, and how its write scripts reach it.

Three routes, from the strongest to the weakest (docs/feeds.md):

* **in-script PUBLISH**: the feed is Redis pub/sub on the store's own server (the default).  The
  write script publishes in the same atomic step as the write: no message can be lost between
  them; only the subscriber can miss it (the probe catches that).
* **in-script XADD**: the feed is a Redis Stream on the store's own server.  Same atomic step, and
  the log keeps the message, so a reconnecting server resumes with nothing lost.
* **relay**: any other feed (RabbitMQ, NATS, JetStream, Kafka, or Redis on another server).  The
  script hands the message back with its reply and the writer publishes it after the write.  A
  crash or a broker outage in between loses the message; every other server's sequence probe then
  sees the bucket move without it and drops the bucket within ``max_staleness``.  Two writers'
  messages for one bucket may also arrive out of order, so the near cache waits for the missing
  sequence numbers instead of treating every jump as a loss (``NearCache(ordered=False)``).

"Same server" is decided by Redis's ``run_id``, so a feed URL that reaches the store's Redis by
another address (a proxy, a Unix socket) still gets the atomic route.
"""

from __future__ import annotations

import redis

from ..keys import Layout
from ..store.commands import stream_target
from .base import Feed, FeedUnavailable, feed_class
from .redis_pubsub import RedisPubSubFeed


def open_store_feed(
    url: str | None, client: redis.Redis, layout: Layout, timeout: float
) -> tuple[Feed, str]:
    """Open the feed ``url`` names for a store-mode map; returns it and the scripts' target."""
    if url is None:
        feed: Feed = RedisPubSubFeed("redis (the store)", layout.channel, timeout=timeout,
                                     client=client)  # fmt: skip
        return feed, layout.channel
    cls = feed_class(url)
    feed = cls(url, cls.topic_for(layout.namespace, layout.name), timeout=timeout)
    feed_client: redis.Redis | None = getattr(feed, "client", None)
    if feed_client is None or not _same_server(feed_client, client, feed):
        return feed, ""
    if isinstance(feed, RedisPubSubFeed):
        return feed, feed.topic
    return feed, stream_target(feed.topic, int(getattr(feed, "maxlen", 0)))


def _same_server(a: redis.Redis, b: redis.Redis, feed: Feed) -> bool:
    try:
        return bool(_run_id(a) == _run_id(b))
    except redis.RedisError as exc:
        feed.close()
        raise FeedUnavailable(
            f"cannot reach the feed's Redis at {feed.describe()} ({exc}): check the URL"
        ) from exc


def _run_id(client: redis.Redis) -> str:
    info = client.info("server")
    return str(info["run_id"])
