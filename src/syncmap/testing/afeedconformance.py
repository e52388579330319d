"""The feed conformance suite for asyncio feeds (``syncmap.feed.abase.AsyncFeed``): the checks of
``feedconformance.py`` (read its docstring: the contract each one proves), awaited.

Each check is a coroutine function of an :class:`AsyncFeedKit` that raises ``AssertionError``
with a readable message; each asyncio feed's test module runs every check on a real broker.  The
handler's callbacks run on the loop, so :class:`AsyncCollector` waits on an ``asyncio.Event``
(never a sleep).  The kit's ``restart`` is a blocking call (a broker process): the checks run it
in a worker thread, so the loop, and the feed's reader on it, keep running meanwhile.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..errors import ConfigurationError
from ..feed.abase import AsyncFeed, AsyncSubscription
from ..feed.base import BEGINNING, FeedHandler
from .feedconformance import WAIT


@dataclass
class AsyncFeedKit:
    """How to get asyncio feeds of one kind on a real broker, and which faults the test causes."""

    name: str
    open: Callable[[str], AsyncFeed]
    """``open(topic)``: a new feed object (another server) on ``topic``; nothing connects yet."""
    restart: Callable[[], object] | None = None
    """Stop the broker and start it again (blocking; run in a worker thread by the checks)."""
    topics: list[str] = field(default_factory=list)

    def topic(self) -> str:
        t = f"aconf{uuid.uuid4().hex[:12]}"
        self.topics.append(t)
        return t


class AsyncCollector:
    """A handler that records what arrives on the loop, so a check can wait for it."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.positions: list[str | None] = []
        self.ups: list[bool] = []
        self.downs = 0
        self._changed = asyncio.Event()
        self.handler = FeedHandler(self._message, self._up, self._down)

    def _message(self, payload: bytes, position: str | None) -> None:
        self.messages.append(payload)
        self.positions.append(position)
        self._changed.set()

    def _up(self, resumed: bool) -> None:
        self.ups.append(resumed)
        self._changed.set()

    def _down(self) -> None:
        self.downs += 1
        self._changed.set()

    async def wait(
        self, predicate: Callable[[AsyncCollector], bool], what: str, timeout: float = WAIT
    ) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not predicate(self):
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"{what} within {timeout} s (got {len(self.messages)} messages, "
                f"ups={self.ups}, downs={self.downs})"
            ) from None

    async def wait_up(self, count: int = 1) -> None:
        await self.wait(lambda c: len(c.ups) >= count, f"subscription confirmed ({count})")

    async def wait_count(self, n: int) -> None:
        await self.wait(lambda c: len(c.messages) >= n, f"{n} messages delivered")


async def subscribed(
    feed: AsyncFeed, start: str | None = None
) -> tuple[AsyncCollector, AsyncSubscription]:
    c = AsyncCollector()
    sub = await feed.subscribe(c.handler, start)
    await c.wait_up()
    return c, sub


def msgs(tag: str, n: int) -> list[bytes]:
    return [f"{tag}-{i:05d}".encode() for i in range(n)]


async def _close(*feeds: AsyncFeed) -> None:
    for f in feeds:
        await f.aclose()


# ---- the checks --------------------------------------------------------------------------------


async def check_roundtrip(kit: AsyncFeedKit) -> None:
    topic = kit.topic()
    pub, sub_feed = kit.open(topic), kit.open(topic)
    try:
        c, _ = await subscribed(sub_feed)
        sent = msgs("a", 200)
        for m in sent:
            await pub.publish(m, key=m[-3:])
        await c.wait_count(len(sent))
        assert c.messages == sent, f"{kit.name}: messages arrived out of order or altered"
    finally:
        await _close(pub, sub_feed)


async def check_fanout(kit: AsyncFeedKit) -> None:
    topic = kit.topic()
    feeds = [kit.open(topic) for _ in range(4)]
    try:
        collectors = [(await subscribed(f))[0] for f in feeds[1:]]
        sent = msgs("f", 50)
        for m in sent:
            await feeds[0].publish(m)
        for i, c in enumerate(collectors):
            await c.wait_count(len(sent))
            assert c.messages == sent, f"{kit.name}: subscriber {i} got {c.messages[:5]}..."
    finally:
        await _close(*feeds)


async def check_per_publisher(kit: AsyncFeedKit) -> None:
    topic = kit.topic()
    a, b, s1, s2 = (kit.open(topic) for _ in range(4))
    try:
        c1, _ = await subscribed(s1)
        c2, _ = await subscribed(s2)
        sa, sb = msgs("A", 300), msgs("B", 300)

        async def send(feed: AsyncFeed, batch: list[bytes]) -> None:
            for m in batch:
                await feed.publish(m)

        await asyncio.gather(send(a, sa), send(b, sb))  # two publishers, interleaved
        for c in (c1, c2):
            await c.wait_count(600)
            assert [m for m in c.messages if m.startswith(b"A")] == sa, "publisher A reordered"
            assert [m for m in c.messages if m.startswith(b"B")] == sb, "publisher B reordered"
        if type(a).ordering == "total":
            assert c1.messages == c2.messages, (
                f"{kit.name} claims a total order but two subscribers saw different orders"
            )
    finally:
        await _close(a, b, s1, s2)


async def check_large(kit: AsyncFeedKit) -> None:
    topic = kit.topic()
    pub, sub_feed = kit.open(topic), kit.open(topic)
    try:
        c, _ = await subscribed(sub_feed)
        big = bytes(range(256)) * 1024  # 256 KiB, every byte value
        await pub.publish(big)
        await c.wait_count(1)
        assert c.messages[0] == big, f"{kit.name}: a 256 KiB message arrived altered"
    finally:
        await _close(pub, sub_feed)


async def check_closed(kit: AsyncFeedKit) -> None:
    topic = kit.topic()
    pub, f1, f2 = kit.open(topic), kit.open(topic), kit.open(topic)
    try:
        c1, s1 = await subscribed(f1)
        c2, _ = await subscribed(f2)
        await pub.publish(b"before")
        await c1.wait_count(1)
        await c2.wait_count(1)
        await s1.aclose()
        await s1.aclose()  # idempotent
        await pub.publish(b"after")
        await c2.wait_count(2)  # the open one got it, so the closed one had its chance too
        assert c1.messages == [b"before"], f"{kit.name}: a closed subscription got {c1.messages}"
    finally:
        await _close(pub, f1, f2)


async def check_positions(kit: AsyncFeedKit) -> None:
    topic = kit.topic()
    pub = kit.open(topic)
    try:
        if not type(pub).durable:
            try:
                await pub.subscribe(AsyncCollector().handler, BEGINNING)
            except ConfigurationError:
                return
            raise AssertionError(f"{kit.name} keeps nothing but accepted subscribe(start=...)")
        await _check_durable_positions(kit, topic, pub)
    finally:
        await pub.aclose()


async def _check_durable_positions(kit: AsyncFeedKit, topic: str, pub: AsyncFeed) -> None:
    empty = await pub.position()
    assert empty is None, f"{kit.name}: an empty topic has position {empty}"
    sent = msgs("p", 10)
    for m in sent[:6]:
        await pub.publish(m)
    mid = await pub.position()
    assert mid is not None, f"{kit.name}: no position after 6 confirmed messages"
    for m in sent[6:]:
        await pub.publish(m)
    reader = kit.open(topic)
    try:
        c, s = await subscribed(reader, mid)
        await c.wait_count(4)
        assert c.messages[:4] == sent[6:], f"{kit.name}: from {mid} got {c.messages}"
        await s.aclose()
        c_all, s_all = await subscribed(reader, BEGINNING)
        await c_all.wait_count(10)
        assert c_all.messages[:10] == sent, f"{kit.name}: BEGINNING gave {c_all.messages}"
        last = c_all.positions[5]  # the last delivered position resumes with nothing repeated
        assert last is not None, f"{kit.name}: a durable feed delivered no position"
        await s_all.aclose()
        c_tail, _ = await subscribed(reader, last)
        await c_tail.wait_count(4)
        assert c_tail.messages[:4] == sent[6:], f"{kit.name}: resume from a delivered position"
    finally:
        await reader.aclose()


async def check_restart(kit: AsyncFeedKit) -> None:
    if kit.restart is None:
        raise AssertionError(f"{kit.name}: this kit cannot restart its broker")
    topic = kit.topic()
    pub, sub_feed = kit.open(topic), kit.open(topic)
    durable = type(pub).durable
    try:
        c, _ = await subscribed(sub_feed)
        await pub.publish(b"one")
        await c.wait_count(1)
        await asyncio.to_thread(kit.restart)
        await c.wait(lambda c: c.downs >= 1, "on_down after the broker restarted")
        await c.wait_up(2)
        assert c.ups[-1] is durable, (
            f"{kit.name}: after a restart on_up(resumed={c.ups[-1]}), expected {durable}"
        )
        await _publish_until_taken(pub, b"two")
        await c.wait(lambda c: b"two" in c.messages, "a message published after the restart")
    finally:
        await _close(pub, sub_feed)


async def _publish_until_taken(pub: AsyncFeed, payload: bytes) -> None:
    """The publisher reconnects on its own; a refusal in between is loud, so retry it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        try:
            await pub.publish(payload)
            return
        except Exception:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)  # reconnect back-off of the publishing side, not a data wait


async def check_compaction(kit: AsyncFeedKit) -> None:
    topic = kit.topic()
    pub = kit.open(topic)
    try:
        if not type(pub).compacted:
            return
        for round_ in range(3):
            for k in (b"x", b"y", b"z"):
                await pub.publish(k + b"=" + str(round_).encode(), key=k)
        await pub.publish(b"x=last", key=b"x")
        reader = kit.open(topic)
        try:
            c, _ = await subscribed(reader, BEGINNING)
            await c.wait(lambda c: b"x=last" in c.messages, "the newest message of key x")
            newest = {m[:1]: m for m in c.messages}
            assert newest == {b"x": b"x=last", b"y": b"y=2", b"z": b"z=2"}, (
                f"{kit.name}: replay gave {newest}"
            )
        finally:
            await reader.aclose()
    finally:
        await pub.aclose()


ACHECKS: dict[str, Callable[[AsyncFeedKit], Awaitable[None]]] = {
    "roundtrip": check_roundtrip,
    "fanout": check_fanout,
    "per_publisher": check_per_publisher,
    "large": check_large,
    "closed": check_closed,
    "positions": check_positions,
    "restart": check_restart,
    "compaction": check_compaction,
}
