"""The asyncio twin of ``redis_sharded.py``: a map's per-bucket sharded channels on a Redis
Cluster, through the loop's sharded subscriber (``asharded.py``).  The same channels, the same
:class:`~syncmap.feed.redis_sharded.ChannelSet` (down when any channel is, up when all are).

With a bucket log (target ``!S``) a channel back after a loss replays its log in a task of the
loop (``bucketlog.py``), never blocking it; ``ChannelSet`` holds the channel's live messages
until the replay is applied.  The tasks end with the subscription (cancelled by ``aclose``)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ..aio.run import run
from ..aiotasks import stop_tasks
from ..errors import SyncMapError
from ..keys import Layout
from ..store.cluster import ClusterTopology
from .abase import AsyncSubscription
from .aredis_base import AsyncRedisFeed
from .asharded import AsyncShardedSubscriber
from .base import FeedHandler
from .bucketlog import Verdict, replay_flow
from .redis_sharded import ChannelSet, Done, apply_verdict


class AsyncRedisShardedFeed(AsyncRedisFeed):
    """A store-mode map's own feed on a sharded topology, on asyncio."""

    scheme = "redis"
    durable = False
    ordering = "bucket"

    def __init__(self, url: str, topic: str, channels: Sequence[str], *, timeout: float = 5.0,
                 topology: ClusterTopology, log: Layout | None = None) -> None:  # fmt: skip
        super().__init__(url, topic, timeout=timeout, topology=topology)
        self.cluster = topology
        self.channels = list(channels)
        self.log = log  # the map's layout when its buckets keep a log (target ``!S``)
        self._replays: set[asyncio.Task[None]] = set()

    def _replay(self, bucket: int, handler: FeedHandler, done: Done) -> None:
        """On the loop: start ``bucket``'s replay in a task (``done`` runs when it is applied)."""
        assert self.log is not None and handler.position_of is not None
        cached = handler.position_of(bucket)
        if cached is None:
            done(False)
            return
        task = asyncio.get_running_loop().create_task(
            self._replay_task(self.log, bucket, cached, handler, done),
            name="syncmap-bucket-replay",
        )
        self._replays.add(task)
        task.add_done_callback(self._replays.discard)

    async def _replay_task(self, layout: Layout, bucket: int, cached: tuple[int | None, int],
                           handler: FeedHandler, done: Done) -> None:  # fmt: skip
        try:
            verdict = await run(replay_flow(layout, bucket, cached), self._transport)
        except SyncMapError as exc:  # the master unreachable, or refusing: flush as ever
            verdict = Verdict(False, [], f"unread: {exc}")
        apply_verdict(handler, bucket, verdict)
        done(verdict.covered)

    async def stop_replays(self) -> None:
        """Cancel the replays in flight (the subscription is closing)."""
        tasks, self._replays = list(self._replays), set()
        await stop_tasks(tasks)

    async def publish(
        self, payload: bytes, key: bytes | None = None, *, confirm: bool = True
    ) -> None:
        """On every bucket's channel, as the thread driver's (the self-check ping)."""
        for channel in self.channels:
            await self._call(("SPUBLISH", channel, payload), write=True)

    async def subscribe(self, handler: FeedHandler, start: str | None = None) -> AsyncSubscription:
        self._no_start(start)
        replay = self._replay if self.log is not None else None
        sub = _ShardedSubscription(self, ChannelSet(self.channels, handler, replay))
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
        await self.feed.stop_replays()
