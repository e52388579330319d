"""``kafka://`` on asyncio: the thread driver's :class:`~.kafka.KafkaFeed`, bridged to the loop.

confluent-kafka (librdkafka) has no asyncio API: its calls block (``poll``, ``flush``, the admin
futures), and its callbacks run inside ``poll`` on whichever thread polls.  So this feed is the
sync feed, with all its decisions (topic layout, start offsets, the "same log?" check by topic
id, the hole re-fetch, what a failed publish means), run where blocking costs the loop nothing:

* **Calls** (``publish``, ``position``, ``subscribe``, ``aclose``) run the sync method in the
  loop's default executor (``loop.run_in_executor``) and await it.  A confirmed publish returns
  when the delivery report came, with the sync feed's errors (:class:`FeedUnavailable`: not
  written; :class:`PublishOutcomeUnknown`: may be).  Cancelling the await does not cancel the
  publish: the thread finishes it, so a cancelled publish's outcome is unknown to the caller
  (which is how the asyncio flow driver already treats a cancelled write).
* **Deliveries**: each subscription's consumer polls on a thread of its own (the sync feed's);
  every handler callback it makes is handed to the loop with ``loop.call_soon_threadsafe`` and
  runs there, in the order the thread made them.  At most :data:`WINDOW` messages wait on the
  loop at a time: beyond that the consumer thread waits (the backlog stays in the broker), so a
  busy loop is not flooded.  ``on_up`` of a new subscription runs before ``subscribe`` returns
  (the thread hands it over before the sync ``subscribe`` returns, and the loop runs callbacks in
  the order they were handed over).

After a subscription's ``aclose`` nothing more reaches its handler (callbacks still queued for the
loop are dropped there) and its thread has ended.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

# The client library itself, first: kafka.py may be imported already, so only this import tells
# a missing confluent-kafka apart (base.load_class: "pip install 'syncmap[kafka]'").
import confluent_kafka  # noqa: F401

from .abase import AsyncFeed, AsyncSubscription
from .base import FeedHandler, FeedUnavailable, Subscription
from .kafka import KafkaFeed, _settings

log = logging.getLogger(__name__)
T = TypeVar("T")

WINDOW = 1000
"""Messages a subscription's thread may have handed to the loop and not yet delivered."""
_SLOT_WAIT = 0.1  # how often a thread waiting for the loop checks whether it was closed


class AsyncKafkaFeed(AsyncFeed):
    """``kafka://host:port[,host:port...][?options]``: see ``kafka.py`` for the layout."""

    scheme = "kafka"
    durable = True
    compacted = True
    ordering = "total"
    extra = "kafka"

    @classmethod
    def topic_for(cls, namespace: str, name: str) -> str:
        return KafkaFeed.topic_for(namespace, name)

    def __init__(self, url: str, topic: str, *, timeout: float = 5.0) -> None:
        super().__init__(url, topic, timeout=timeout)
        _settings(url, timeout)  # a malformed URL fails here, not at the first call
        self._feed: KafkaFeed | None = None
        self._opening = asyncio.Lock()
        self._subs: list[AsyncKafkaSubscription] = []
        self._closed = False

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(fn, *args, **kwargs)
        )

    async def _sync(self) -> KafkaFeed:
        """The sync feed, made on first use (its clients start threads: not on the loop)."""
        if self._closed:
            raise FeedUnavailable(f"the feed {self.describe()} ({self.topic}) is closed")
        if self._feed is None:
            async with self._opening:
                if self._feed is None:
                    self._feed = await self._run(
                        KafkaFeed, self.url, self.topic, timeout=self.timeout
                    )
        return self._feed

    async def publish(self, payload: bytes, key: bytes | None = None, *,
                      confirm: bool = True) -> None:  # fmt: skip
        feed = await self._sync()
        await self._run(feed.publish, payload, key, confirm=confirm)

    async def position(self) -> str | None:
        feed = await self._sync()
        return await self._run(feed.position)

    async def subscribe(
        self, handler: FeedHandler, start: str | None = None
    ) -> AsyncKafkaSubscription:
        feed = await self._sync()
        bridge = LoopBridge(asyncio.get_running_loop(), handler, f"kafka {self.topic}")
        try:
            sub = await self._run(feed.subscribe, bridge.handler, start)
        except BaseException:
            bridge.close()
            raise
        live = AsyncKafkaSubscription(self, bridge, sub)
        self._subs.append(live)
        return live

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subs):
            await sub.aclose()
        async with self._opening:  # a feed being made meanwhile is closed too
            if self._feed is not None:
                await self._run(self._feed.close)


class AsyncKafkaSubscription(AsyncSubscription):
    def __init__(self, feed: AsyncKafkaFeed, bridge: LoopBridge, sub: Subscription) -> None:
        self._feed, self._bridge, self._sub = feed, bridge, sub
        self._closed = False

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._bridge.close()  # first: nothing more reaches the handler from here on
        if self in self._feed._subs:
            self._feed._subs.remove(self)
        await self._feed._run(self._sub.close)  # stops and joins the consumer thread


class LoopBridge:
    """A handler for a thread that runs ``target``'s callbacks on ``loop`` instead, in order.

    Made and closed on the loop; its :attr:`handler` is called on the feed's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, target: FeedHandler, name: str) -> None:
        self._loop, self._target, self._name = loop, target, name
        self._slots = threading.Semaphore(WINDOW)
        self._closed = False
        self.handler = FeedHandler(self._message, self._up, self._down)

    def close(self) -> None:
        self._closed = True

    # ---- on the feed's thread ----------------------------------------------------------------

    def _message(self, payload: bytes, position: str | None) -> None:
        # Wait for room on the loop: the consumer thread waits, never the loop.
        while not self._slots.acquire(timeout=_SLOT_WAIT):
            if self._closed:
                return
        self._post(self._deliver, payload, position)

    def _up(self, resumed: bool) -> None:
        self._post(self._event, self._target.on_up, resumed)

    def _down(self) -> None:
        self._post(self._event, self._target.on_down)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._closed = True

    # ---- on the loop ---------------------------------------------------------------------------

    def _deliver(self, payload: bytes, position: str | None) -> None:
        try:
            self._event(self._target.on_message, payload, position)
        finally:
            self._slots.release()

    def _event(self, fn: Callable[..., None], *args: Any) -> None:
        if self._closed:
            return
        try:
            fn(*args)
        except Exception:  # one handler's bug must not end the subscription
            log.exception("syncmap feed %s: a subscriber's callback failed", self._name)
