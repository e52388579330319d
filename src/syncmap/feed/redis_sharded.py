"""The change feed of a map on a Redis Cluster (layout 2s): one channel per bucket, sharded.

Each bucket's write scripts ``SPUBLISH`` its change message on the bucket's own channel
(``Layout.bucket_channel``), in the bucket's slot, on the master that owns it: a message costs
one node, not a broadcast over the cluster bus, and arrives in the bucket's order.  The process's
sharded subscriber (``sharded.py``: one ``SSUBSCRIBE`` connection per master) delivers them.

The map sees one feed (:class:`ChannelSet`): **down** as soon as any of its channels is down
(a master's connection lost, a slot moving: messages of that bucket may be lost), **up** again
once every channel is confirmed, which makes the map probe; the probe then flushes only the
buckets whose sequence moved unseen among those whose channel was down meanwhile
(``FeedHandler.on_buckets_up``, ``NearCache.on_feed_up``): a bucket whose channel stayed up
lost nothing, though its newest message may still be on the way when the probe reads it.
Order on a channel's move: on_down -> re-subscribed on the new owner -> confirmed -> on_up
(when it was the last one down) -> the map probes -> a write applied on the new owner before
the confirmation is seen there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from ..store.cluster import ClusterTopology
from .base import FeedHandler, Subscription
from .pubsub import Handler
from .redis_base import RedisFeed
from .sharded import ShardedSubscriber


class ChannelSet:
    """Many channels as one feed for a map's handler (module docstring).  Both drivers use it:
    callbacks may come from several subscriber threads at once, hence the lock."""

    def __init__(self, channels: Sequence[str], handler: FeedHandler) -> None:
        self.channels = list(channels)  # channel i carries bucket i's messages
        self.handler = handler
        self._down = set(self.channels)  # not yet confirmed
        self._lost = set(range(len(self.channels)))  # down since the last time all were up
        self._lock = threading.Lock()

    def handlers(self) -> list[tuple[str, Handler]]:
        return [(ch, Handler(self._message, self._upper(ch), self._downer(ch)))
                for ch in self.channels]  # fmt: skip

    def _message(self, data: bytes) -> None:
        self.handler.on_message(data, None)

    def _upper(self, channel: str) -> Callable[[], None]:
        def up() -> None:
            with self._lock:
                was_down = bool(self._down)
                self._down.discard(channel)
                all_up = was_down and not self._down
                lost, self._lost = (sorted(self._lost), set()) if all_up else ([], self._lost)
            if not all_up:
                return
            if self.handler.on_buckets_up is not None:
                self.handler.on_buckets_up(lost)
            else:
                self.handler.on_up(False)

        return up

    def _downer(self, channel: str) -> Callable[[], None]:
        index = self.channels.index(channel)

        def down() -> None:
            with self._lock:
                self._down.add(channel)
                self._lost.add(index)
            self.handler.on_down()

        return down


class RedisShardedFeed(RedisFeed):
    """A store-mode map's own feed on a sharded topology (never named by a URL)."""

    scheme = "redis"
    durable = False
    ordering = "bucket"  # each bucket's messages in its master's order

    def __init__(self, url: str, topic: str, channels: Sequence[str], *, timeout: float = 5.0,
                 topology: ClusterTopology) -> None:  # fmt: skip
        super().__init__(url, topic, timeout=timeout, topology=topology)
        self.cluster = topology
        self.channels = list(channels)

    def publish(self, payload: bytes, key: bytes | None = None, *, confirm: bool = True) -> None:
        """On every bucket's channel (the map's self-check ping: it proves each master's
        subscription; the first to come back answers it)."""
        for channel in self.channels:
            self._call(("SPUBLISH", channel, payload), write=True)

    def subscribe(self, handler: FeedHandler, start: str | None = None) -> Subscription:
        self._no_start(start)
        sub = _ShardedSubscription(self.cluster, ChannelSet(self.channels, handler))
        self._keep(sub)
        sub.attach()
        return sub


class _ShardedSubscription(Subscription):
    def __init__(self, topology: ClusterTopology, channels: ChannelSet) -> None:
        self.topology = topology
        self.attached = channels.handlers()
        self.subscriber: ShardedSubscriber | None = None

    def attach(self) -> None:
        for channel, handler in self.attached:
            self.subscriber = ShardedSubscriber.attach_to(self.topology, channel, handler)

    def close(self) -> None:
        sub, self.subscriber = self.subscriber, None
        if sub is not None:
            for channel, handler in self.attached:
                sub.detach(channel, handler)
