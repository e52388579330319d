"""Which feed a store-mode map on asyncio uses, and how its write scripts reach it: the same three
routes as ``routing.py`` (read it for why each exists), with asyncio feeds.

* no feed URL: Redis pub/sub on the store itself, published by the write scripts (in-script
  PUBLISH; on a Cluster, SPUBLISH on each bucket's channel, and with a host-less
  ``redis+stream://`` an XADD to each bucket's log as well: ``bucketlog.py``);
* a ``redis://`` or ``redis+stream://`` feed on the store's own server (same ``run_id``): in-script
  PUBLISH or XADD;
* anything else: relay (``""``), the feed class from the asyncio registry (``aregistry.py``).
"""

from __future__ import annotations

from ..errors import StoreError, SyncMapError
from ..keys import Layout
from ..store.commands import stream_target
from ..store.topology import Topology
from .abase import AsyncFeed
from .aredis_pubsub import AsyncRedisPubSubFeed
from .aregistry import async_feed_class
from .base import FeedUnavailable
from .routing import sharded_route
from .streamlog import run_id_of


async def open_async_store_feed(
    url: str | None, topology: Topology, layout: Layout, timeout: float
) -> tuple[AsyncFeed, str]:
    """Open the feed ``url`` names for a store-mode map; returns it and the scripts' target."""
    if topology.sharded:  # a Cluster: per-bucket channels, SPUBLISH in-script
        from .aredis_sharded import AsyncRedisShardedFeed  # noqa: PLC0415 - Cluster only

        routed = sharded_route(url, topology, layout, timeout, AsyncRedisShardedFeed)
        if routed is not None:
            return routed
    if url is None:
        feed: AsyncFeed = AsyncRedisPubSubFeed("redis (the store)", layout.channel,
                                               timeout=timeout, topology=topology)  # fmt: skip
        return feed, layout.channel
    cls = async_feed_class(url)
    feed = cls(url, cls.topic_for(layout.namespace, layout.name), timeout=timeout)
    feed_topology: Topology | None = getattr(feed, "topology", None)
    if topology.sharded:  # a script of one bucket's slot cannot reach a map-wide channel/stream
        return feed, ""  # on another Redis: relayed
    if feed_topology is None or not await _same_server(feed_topology, topology, feed, timeout):
        return feed, ""
    if isinstance(feed, AsyncRedisPubSubFeed):
        return feed, feed.topic
    return feed, stream_target(feed.topic, int(getattr(feed, "maxlen", 0)))


async def _same_server(a: Topology, b: Topology, feed: AsyncFeed, timeout: float) -> bool:
    try:
        return await _run_id(a, timeout) == await _run_id(b, timeout)
    except SyncMapError as exc:  # unreachable, or an ACL refusing INFO
        await feed.aclose()
        raise FeedUnavailable(
            f"cannot reach the feed's Redis at {feed.describe()} ({exc}): check the URL"
        ) from exc


async def _run_id(topology: Topology, timeout: float) -> str:
    executor = topology.async_executor(timeout=timeout)
    try:
        info: bytes = (await executor.call([("INFO", "server")], write=False))[0]
    finally:
        await executor.aclose()
    run_id = run_id_of(info)
    if run_id is None:
        raise StoreError(f"{executor.where} told no run_id in INFO server")
    return run_id
