"""Which feed a store-mode map uses, and how its write scripts reach it.

Three routes, from the strongest to the weakest (docs/feeds.md):

* **in-script PUBLISH**: the feed is Redis pub/sub on the store's own server (the default; on a
  Redis Cluster each bucket's channel, with ``SPUBLISH``: ``redis_sharded.py``).  The
  write script publishes in the same atomic step as the write: no message can be lost between
  them; only the subscriber can miss it (the probe catches that).
* **in-script XADD**: the feed is a Redis Stream on the store's own server.  Same atomic step, and
  the log keeps the message, so a reconnecting server resumes with nothing lost.  On a Redis
  Cluster, ``redis+stream://`` without a host: the sharded channels, and each bucket's script
  also XADDs to the bucket's own log in its slot (``!S``), which a server replays when a
  channel comes back after a loss instead of flushing the bucket (``bucketlog.py``).
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

from collections.abc import Callable
from typing import Any

from ..errors import StoreError, SyncMapError
from ..keys import Layout
from ..store.commands import SHARDED_TARGET, logged_target, stream_target
from ..store.topology import Topology
from .base import Feed, FeedUnavailable, feed_class
from .bucketlog import cluster_stream_maxlen, nodes_of
from .redis_pubsub import RedisPubSubFeed


def open_store_feed(
    url: str | None, topology: Topology, layout: Layout, timeout: float
) -> tuple[Feed, str]:
    """Open the feed ``url`` names for a store-mode map; returns it and the scripts' target."""
    if topology.sharded:  # a Cluster: per-bucket channels, SPUBLISH in-script
        routed = sharded_route(url, topology, layout, timeout)
        if routed is not None:
            return routed
    if url is None:
        feed: Feed = RedisPubSubFeed("redis (the store)", layout.channel, timeout=timeout,
                                     topology=topology)  # fmt: skip
        return feed, layout.channel
    cls = feed_class(url)
    feed = cls(url, cls.topic_for(layout.namespace, layout.name), timeout=timeout)
    feed_topology: Topology | None = getattr(feed, "topology", None)
    if topology.sharded:  # a script of one bucket's slot cannot reach a map-wide channel/stream
        return feed, ""  # on another Redis: relayed
    if feed_topology is None or not _same_server(feed_topology, topology, feed, timeout):
        return feed, ""
    if isinstance(feed, RedisPubSubFeed):
        return feed, feed.topic
    return feed, stream_target(feed.topic, int(getattr(feed, "maxlen", 0)))


def sharded_route(
    url: str | None, topology: Topology, layout: Layout, timeout: float,
    sharded_class: Callable[..., Any] | None = None,
) -> tuple[Any, str] | None:  # fmt: skip
    """On a Cluster (layout 2s): no feed URL -> each bucket's channel, SPUBLISH in-script
    (``!s``); a host-less ``redis+stream://`` -> the same, and a log per bucket XADDed in-script
    (``!S:<maxlen>``, ``bucketlog.py``); None: another feed (relayed).  ``sharded_class``: the
    sharded feed to open (the thread driver's by default; the asyncio driver passes its own)."""
    from ..store.cluster import ClusterTopology  # noqa: PLC0415 - Cluster only

    if sharded_class is None:
        from .redis_sharded import RedisShardedFeed  # noqa: PLC0415

        sharded_class = RedisShardedFeed
    assert isinstance(topology, ClusterTopology)  # the one sharded topology
    maxlen = None if url is None else cluster_stream_maxlen(url, lambda: nodes_of(topology))
    if url is not None and maxlen is None:
        return None
    feed = sharded_class("redis (the store)", layout.channel, layout.bucket_channels(),
                      timeout=timeout, topology=topology,
                      log=None if maxlen is None else layout)  # fmt: skip
    return feed, SHARDED_TARGET if maxlen is None else logged_target(maxlen)


def _same_server(a: Topology, b: Topology, feed: Feed, timeout: float) -> bool:
    try:
        return _run_id(a, timeout) == _run_id(b, timeout)
    except SyncMapError as exc:  # unreachable, or an ACL refusing INFO
        feed.close()
        raise FeedUnavailable(
            f"cannot reach the feed's Redis at {feed.describe()} ({exc}): check the URL"
        ) from exc


def _run_id(topology: Topology, timeout: float) -> str:
    executor = topology.executor(timeout=timeout)
    try:
        info: bytes = executor.call([("INFO", "server")], write=False)[0]
    finally:
        executor.close()
    for line in info.splitlines():
        if line.startswith(b"run_id:"):
            return line.removeprefix(b"run_id:").decode()
    raise StoreError(f"{executor.where} told no run_id in INFO server")
