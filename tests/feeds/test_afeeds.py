"""The asyncio broker feeds (``anats``, ``ajetstream``, ``arabbitmq``, ``akafka``) against real
brokers: round trip and order, ``on_up(resumed)`` after every connection is cut, ``aclose``, and a
loop that nothing of syncmap blocks.

Every test runs its loop in debug mode with a 5 ms slow-callback threshold and fails on any
"Executing ... took" warning (:class:`SlowCallbacks`).  Broker faults (restarts, proxy resets) are
blocking test actions, so they run in a thread (``asyncio.to_thread``), never on the loop.

How connections are cut is the sync tests': NATS restarts its own server (JetStream keeps its file
store, so it resumes); RabbitMQ goes through a FaultProxy whose connections are reset; Kafka
clients dial a proxy in front of Tansu whose connections are reset (the broker keeps its log).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from syncmap.feed.abase import AsyncFeed
from syncmap.feed.ajetstream import AsyncJetStreamFeed
from syncmap.feed.akafka import AsyncKafkaFeed
from syncmap.feed.anats import AsyncNatsFeed
from syncmap.feed.arabbitmq import AsyncRabbitMQFeed
from syncmap.feed.aregistry import async_feed_class
from syncmap.feed.base import FeedHandler, FeedUnavailable, PublishOutcomeUnknown
from syncmap.serverproc import free_port
from syncmap.testing import loopguard, stopping
from syncmap.testing.proxy import FaultProxy
from syncmap.testing.rabbitmq import delete_exchanges, through

KINDS = ["nats", "nats+jetstream", "amqp", "kafka"]
TIMEOUT = 2.0


# ---- the slow-callback guard (tests/conftest.py loop_guard, on every async test) -------------


async def test_the_guard_sees_a_callback_that_blocks(
    loop_guard: loopguard.SlowCallbackLog,
) -> None:
    """Control: the same guard does catch a callback of syncmap's that blocks (then forgets it)."""
    from syncmap.feed.natsbase import InlineDispatch

    blocking = InlineDispatch("control")  # syncmap code, running a callback that blocks
    asyncio.get_running_loop().call_soon(blocking.submit, time.sleep, 4 * loopguard.SLOW_CALLBACK)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert loop_guard.syncmap(), loop_guard.all()
    loop_guard.clear()


# ---- brokers and faults --------------------------------------------------------------------------


@dataclass
class Kit:
    """Feeds of one kind; ``cut()`` takes every connection down (blocking: run it in a thread)."""

    kind: str
    url: str
    cut: Callable[[], None]
    opened: list[AsyncFeed] = field(default_factory=list)
    topics: list[str] = field(default_factory=list)

    def open(self, topic: str, url: str | None = None) -> AsyncFeed:
        cls: Any = {
            "nats": AsyncNatsFeed,
            "nats+jetstream": AsyncJetStreamFeed,
            "amqp": AsyncRabbitMQFeed,
            "kafka": AsyncKafkaFeed,
        }[self.kind]
        feed: AsyncFeed = cls(url or self.url, topic, timeout=TIMEOUT)
        self.opened.append(feed)
        return feed

    def topic(self) -> str:
        name = f"afeeds-{uuid.uuid4().hex[:10]}"
        topic: str = self.opened_class().topic_for("sm", name)
        self.topics.append(topic)
        return topic

    def opened_class(self) -> Any:
        return {"nats": AsyncNatsFeed, "nats+jetstream": AsyncJetStreamFeed,
                "amqp": AsyncRabbitMQFeed, "kafka": AsyncKafkaFeed}[self.kind]  # fmt: skip


@pytest.fixture
def tansu_behind_proxy() -> Iterator[tuple[str, FaultProxy]]:
    from syncmap.testing.tansu import TansuNotFound, TansuServer, find_tansu

    try:
        binary = find_tansu()
    except TansuNotFound as exc:
        pytest.skip(str(exc))
    port = free_port()
    proxy = FaultProxy("127.0.0.1", port).start()
    server = TansuServer(binary=binary, port=port, advertised_port=proxy.port)
    try:
        server.start()
        yield server.url, proxy
    finally:
        server.stop()
        proxy.close()


@pytest.fixture(params=KINDS)
def broker(request: pytest.FixtureRequest) -> Iterator[tuple[str, str, Callable[[], None]]]:
    """(kind, URL, cut), started outside the loop: starting a broker blocks."""
    kind = request.param
    if kind.startswith("nats"):
        from syncmap.testing.nats_server import NatsServer, NatsServerNotFound

        try:
            server = NatsServer().start()
        except NatsServerNotFound as exc:
            pytest.skip(str(exc))
        try:
            yield kind, server.url.replace("nats://", f"{kind}://", 1), server.restart
        finally:
            server.stop()
    elif kind == "amqp":
        from syncmap.testing.rabbitmq import proxy_for

        base = request.getfixturevalue("amqp_broker")
        proxy = proxy_for(base)
        try:
            yield kind, through(proxy, base), proxy.reset_all
        finally:
            proxy.close()
    else:
        url, proxy = request.getfixturevalue("tansu_behind_proxy")
        yield kind, url, proxy.reset_all


@pytest.fixture
async def kit(broker: tuple[str, str, Callable[[], None]]) -> AsyncIterator[Kit]:
    k = Kit(*broker)
    try:
        yield k
    finally:
        for feed in k.opened:
            await feed.aclose()
        if k.kind == "amqp" and k.topics:
            await asyncio.to_thread(delete_exchanges, k.url, k.topics)


# ---- helpers -------------------------------------------------------------------------------------


class Collector:
    """A handler whose callbacks record what arrives (they run on the loop)."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.positions: list[str | None] = []
        self.ups: list[bool] = []
        self.downs = 0
        self.handler = FeedHandler(self._message, self.ups.append, self._down)

    def _message(self, payload: bytes, position: str | None) -> None:
        self.messages.append(payload)
        self.positions.append(position)

    def _down(self) -> None:
        self.downs += 1

    async def wait(self, cond: Callable[[Collector], bool], what: str, within: float = 15) -> None:
        deadline = time.monotonic() + within
        while not cond(self):
            if time.monotonic() > deadline:
                seen = f"ups={self.ups} downs={self.downs} messages={self.messages[-5:]}"
                raise AssertionError(f"timed out waiting for {what}: {seen}")
            await asyncio.sleep(0.01)  # polling a condition, with a deadline


async def eventually(publish: Callable[[], Awaitable[None]], within: float = 15) -> None:
    """Publish until the broker takes it (the feed may still be reconnecting)."""
    deadline = time.monotonic() + within
    while True:
        try:
            await publish()
            return
        except (FeedUnavailable, PublishOutcomeUnknown):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)  # retry back-off


# ---- the tests -----------------------------------------------------------------------------------


async def test_round_trip_in_order_with_on_up_first(kit: Kit) -> None:
    topic = kit.topic()
    sub_feed, pub = kit.open(topic), kit.open(topic)
    c = Collector()
    await sub_feed.subscribe(c.handler)
    assert c.ups == [sub_feed.durable], "on_up ran before subscribe returned"
    sent = [f"m{i:03d}".encode() for i in range(60)]
    for i, m in enumerate(sent):
        await pub.publish(m, key=m, confirm=i % 3 != 1)
    await pub.publish(b"end")
    await c.wait(lambda c: b"end" in c.messages, "every message")
    assert c.messages == [*sent, b"end"], "one publisher's messages arrive in order, once"
    if sub_feed.durable:
        positions = [int(p) for p in c.positions if p is not None]
        assert positions == sorted(positions) and len(positions) == len(c.messages)


async def test_on_up_after_every_connection_is_cut(kit: Kit) -> None:
    topic = kit.topic()
    sub_feed, pub = kit.open(topic), kit.open(topic)
    c = Collector()
    await sub_feed.subscribe(c.handler)
    await pub.publish(b"one")
    await c.wait(lambda c: b"one" in c.messages, "the first message")
    await asyncio.to_thread(kit.cut)
    await c.wait(lambda c: c.downs >= 1 and len(c.ups) >= 2, "on_down, then on_up")
    assert c.ups[-1] is sub_feed.durable, f"resumed={c.ups[-1]} after the cut"
    await eventually(lambda: pub.publish(b"two"))
    await c.wait(lambda c: b"two" in c.messages, "a message after the cut")
    assert c.messages.count(b"one") == 1 or sub_feed.durable is False


async def test_aclose_stops_delivery_and_leaves_no_task(kit: Kit) -> None:
    before = asyncio.all_tasks()
    topic = kit.topic()
    closing, witness_feed, pub = kit.open(topic), kit.open(topic), kit.open(topic)
    gone, witness = Collector(), Collector()
    sub = await closing.subscribe(gone.handler)
    await witness_feed.subscribe(witness.handler)
    await pub.publish(b"before")
    await gone.wait(lambda c: b"before" in c.messages, "delivery before aclose")
    await sub.aclose()
    await sub.aclose()  # idempotent
    await pub.publish(b"after")
    await witness.wait(lambda c: b"after" in c.messages, "the witness got the later message")
    assert b"after" not in gone.messages, "delivered after aclose"
    for feed in (closing, witness_feed, pub):
        await feed.aclose()
    with pytest.raises(FeedUnavailable):
        await pub.publish(b"closed")
    deadline = time.monotonic() + 5
    while (left := asyncio.all_tasks() - before - {asyncio.current_task()}) and (
        time.monotonic() < deadline
    ):
        await asyncio.sleep(0.01)  # cancelled tasks of the client libraries wind down
    assert not left, f"tasks left after aclose: {left}"


# ---- closing at any moment -----------------------------------------------------------------------

STOP_CYCLES = {"nats": 15, "nats+jetstream": 10, "amqp": 10, "kafka": 3}
"""Open/close cycles per feed (a Kafka subscription starts a consumer thread: slow, so few)."""


async def test_a_feed_closes_at_any_moment(kit: Kit) -> None:
    """Subscribe, publish, and close the subscription and the feed at a varying moment: each
    ``aclose()`` returns within ``stopping.CLOSE_BOUND`` and no task is left
    (``syncmap.aiotasks``)."""
    topic = kit.topic()

    async def open_feed() -> Callable[[], Awaitable[None]]:
        feed = async_feed_class(kit.url)(kit.url, topic, timeout=0.5)
        sub = await feed.subscribe(Collector().handler)
        await feed.publish(b"x", confirm=False)

        async def close() -> None:
            await sub.aclose()
            await feed.aclose()

        return close

    slowest = await stopping.cycle(open_feed, STOP_CYCLES[kit.kind], spread=0.05)
    print(f"\nslowest {kit.kind} close: {slowest:.3f} s")
