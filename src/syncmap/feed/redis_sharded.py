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

**With a bucket log** (``redis+stream://`` on the store's cluster, target ``!S``: every write
also XADDs to ``<tag>:log``): a channel confirmed again after a loss first **replays** its
bucket's log from where the map stands (``bucketlog.py``); if the log covers the gap, the bucket
is no longer among the lost ones, so it is not flushed.  Order: on_down -> re-subscribed ->
confirmed -> the channel's live messages are held -> the log is read and the newer entries
applied -> the held live messages applied, in their order -> the channel counts as up.  The
thread driver replays on the subscriber thread that runs the ``on_up`` callback (the callbacks
of the process's sharded subscriber run one at a time, so nothing of that channel is delivered
meanwhile; a replay is one or a few round trips to one master); the asyncio driver replays in a
task, and the hold keeps the channel's live messages back until it is done.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from ..errors import SyncMapError
from ..keys import Layout
from ..ratelog import RateLimitedLog
from ..store.cluster import ClusterTopology
from ..sync.run import run
from .base import FeedHandler, Subscription
from .bucketlog import Verdict, replay_flow
from .pubsub import Handler
from .redis_base import RedisFeed
from .sharded import ShardedSubscriber

log = logging.getLogger("syncmap.feed")
_unread = RateLimitedLog(log)


def apply_verdict(handler: FeedHandler, bucket: int, verdict: Verdict) -> None:
    """Apply a replay's messages through the live path, oldest first, then tell the map (both
    drivers)."""
    for data in verdict.messages:
        handler.on_message(data, None)
    if verdict.why.startswith("unread"):
        _unread("syncmap could not read the log of bucket %d (%s); the bucket is repaired by a "
                "flush instead", bucket, verdict.why)  # fmt: skip
    if handler.on_replayed is not None:
        handler.on_replayed(bucket, verdict.covered, len(verdict.messages))


Done = Callable[[bool], None]
Replayer = Callable[[int, FeedHandler, Done], None]
"""Replay one bucket's log for a handler, then call ``done(covered)`` (at once or later, on the
driver's callback thread or loop)."""


class ChannelSet:
    """Many channels as one feed for a map's handler (module docstring).  Both drivers use it:
    callbacks may come from several subscriber threads at once, hence the lock.  Callbacks of
    one channel never run concurrently (the sharded subscriber runs them one at a time)."""

    def __init__(self, channels: Sequence[str], handler: FeedHandler,
                 replay: Replayer | None = None) -> None:  # fmt: skip
        self.channels = list(channels)  # channel i carries bucket i's messages
        self.handler = handler
        self.replay = replay if handler.position_of is not None else None
        self._down = set(self.channels)  # not yet confirmed
        self._lost = set(range(len(self.channels)))  # down since the last time all were up
        self._gen = [0] * len(self.channels)  # bumped at each on_down of a channel
        self._held: dict[int, tuple[int, list[bytes]]] = {}  # channel -> (gen, live messages
        # held while its replay runs)
        self._lock = threading.Lock()

    def handlers(self) -> list[tuple[str, Handler]]:
        # PING leases: each channel's handler carries the map's lease for its one bucket, so
        # a node's PONG renews only the buckets whose channels that node carries.
        return [(ch, Handler(self._messenger(i), self._upper(i), self._downer(i),
                             lease=self.handler.lease, bucket=i))
                for i, ch in enumerate(self.channels)]  # fmt: skip

    def _messenger(self, index: int) -> Callable[[bytes], None]:
        def message(data: bytes) -> None:
            if self._held:  # rare: only while a replay runs
                with self._lock:
                    held = self._held.get(index)
                    if held is not None:
                        held[1].append(data)
                        return
            self.handler.on_message(data, None)

        return message

    def _upper(self, index: int) -> Callable[[], None]:
        def up() -> None:
            with self._lock:
                replay = (
                    self.replay is not None
                    and index in self._lost
                    and (self.channels[index] in self._down)
                )
                gen = self._gen[index]
                if replay:
                    self._held[index] = (gen, [])
            if replay and self.replay is not None:
                self.replay(
                    index, self.handler, lambda covered: self._replayed(index, gen, covered)
                )
            else:
                self._mark_up(index)

        return up

    def _replayed(self, index: int, gen: int, covered: bool) -> None:
        """The replay of ``index``'s log is applied: the held live messages follow, then the
        channel is up.  A replay that outlived its subscription (the channel went down again
        meanwhile) changes nothing: the next ``on_up`` replays again."""
        with self._lock:
            current = self._gen[index] == gen
            held = self._held.get(index)
            mine = held is not None and held[0] == gen
            if mine:
                del self._held[index]
            if current and covered:
                self._lost.discard(index)
        for data in held[1] if (mine and held is not None) else []:
            self.handler.on_message(data, None)
        if current:
            self._mark_up(index)

    def _mark_up(self, index: int) -> None:
        channel = self.channels[index]
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

    def _downer(self, index: int) -> Callable[[], None]:
        channel = self.channels[index]

        def down() -> None:
            with self._lock:
                self._down.add(channel)
                self._lost.add(index)
                self._gen[index] += 1
                held = self._held.pop(index, None)
            for data in held[1] if held is not None else []:  # they came before the loss
                self.handler.on_message(data, None)
            self.handler.on_down()

        return down


class RedisShardedFeed(RedisFeed):
    """A store-mode map's own feed on a sharded topology (never named by a URL)."""

    scheme = "redis"
    durable = False
    ordering = "bucket"  # each bucket's messages in its master's order

    def __init__(self, url: str, topic: str, channels: Sequence[str], *, timeout: float = 5.0,
                 topology: ClusterTopology, log: Layout | None = None) -> None:  # fmt: skip
        super().__init__(url, topic, timeout=timeout, topology=topology)
        self.cluster = topology
        self.channels = list(channels)
        self.log = log  # the map's layout when its buckets keep a log (target ``!S``)

    def _replay(self, bucket: int, handler: FeedHandler, done: Done) -> None:
        """Replay ``bucket``'s log on this (the subscriber's) thread, then ``done``."""
        assert self.log is not None and handler.position_of is not None
        cached = handler.position_of(bucket)
        if cached is None:
            done(False)
            return
        try:
            verdict = run(replay_flow(self.log, bucket, cached), self._transport)
        except SyncMapError as exc:  # the master unreachable, or refusing: flush as ever
            verdict = Verdict(False, [], f"unread: {exc}")
        apply_verdict(handler, bucket, verdict)
        done(verdict.covered)

    def publish(self, payload: bytes, key: bytes | None = None, *, confirm: bool = True) -> None:
        """On every bucket's channel (the map's self-check ping: it proves each master's
        subscription; the first to come back answers it)."""
        for channel in self.channels:
            self._call(("SPUBLISH", channel, payload), write=True)

    def subscribe(self, handler: FeedHandler, start: str | None = None) -> Subscription:
        self._no_start(start)
        replay = self._replay if self.log is not None else None
        sub = _ShardedSubscription(self.cluster, ChannelSet(self.channels, handler, replay))
        self._keep(sub)
        sub.attach()
        return sub


class _ShardedSubscription(Subscription):
    turns = True

    def __init__(self, topology: ClusterTopology, channels: ChannelSet) -> None:
        self.topology = topology
        self.attached = channels.handlers()
        self.subscriber: ShardedSubscriber | None = None

    def give_turn(self, timeout: float) -> bool:
        sub = self.subscriber
        return True if sub is None else sub.give_turn(timeout)

    def attach(self) -> None:
        for channel, handler in self.attached:
            self.subscriber = ShardedSubscriber.attach_to(self.topology, channel, handler)

    def close(self) -> None:
        sub, self.subscriber = self.subscriber, None
        if sub is not None:
            for channel, handler in self.attached:
                sub.detach(channel, handler)
