"""The ``amqp://`` feed against the machine's RabbitMQ: the conformance suite, then its own faults.

Faults go through a FaultProxy in front of the broker (``syncmap.testing.rabbitmq``), so the
broker other tests share is never stopped: the suite's ``restart`` is every connection reset at
once, which is what a client sees of a broker restart or a network cut.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from syncmap.errors import ConfigurationError
from syncmap.feed.base import FeedUnavailable, PublishOutcomeUnknown, feed_class
from syncmap.feed.rabbitmq import RabbitMQFeed
from syncmap.testing.feedconformance import CHECKS, Collector, FeedKit
from syncmap.testing.proxy import FaultProxy
from syncmap.testing.rabbitmq import (
    BrokerNotFound,
    delete_exchanges,
    exchange_exists,
    proxy_for,
    rabbitmq_url,
    through,
)
from syncmap.testing.wait import wait_until


@pytest.fixture(scope="module")
def amqp_url() -> str:
    try:
        return rabbitmq_url()
    except BrokerNotFound as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the RabbitMQ tests: {exc}", pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture
def proxy(amqp_url: str) -> Iterator[FaultProxy]:
    p = proxy_for(amqp_url)
    try:
        yield p
    finally:
        p.close()


class Feeds:
    """Opens feeds on fresh topics; closes them and deletes their exchanges afterwards."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.opened: list[RabbitMQFeed] = []
        self.topics: list[str] = []

    def topic(self) -> str:
        name = RabbitMQFeed.topic_for("sm", f"t{uuid.uuid4().hex[:12]}")
        self.topics.append(name)
        return name

    def open(self, topic: str, url: str | None = None, *, timeout: float = 5.0) -> RabbitMQFeed:
        feed = RabbitMQFeed(url or self.url, topic, timeout=timeout)
        self.opened.append(feed)
        return feed

    def close(self) -> None:
        for feed in self.opened:
            feed.close()
        delete_exchanges(self.url, self.topics)


@pytest.fixture
def feeds(amqp_url: str) -> Iterator[Feeds]:
    f = Feeds(amqp_url)
    try:
        yield f
    finally:
        f.close()


@pytest.fixture
def kit(feeds: Feeds, proxy: FaultProxy) -> Iterator[FeedKit]:
    """Every feed connects through the proxy; "restart" resets all its connections."""
    proxied = through(proxy, feeds.url)
    k = FeedKit(
        "rabbitmq",
        lambda topic: feeds.open(RabbitMQFeed.topic_for("sm", topic), proxied),
        restart=proxy.reset_all,
    )
    yield k
    feeds.topics.extend(RabbitMQFeed.topic_for("sm", t) for t in k.topics)


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_conformance(kit: FeedKit, check: str) -> None:
    CHECKS[check](kit)


def _subscribed(feed: RabbitMQFeed) -> Collector:
    c = Collector()
    feed.subscribe(c.handler)
    c.wait_up()
    return c


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# ---- without a broker ---------------------------------------------------------------------------


def test_registry_maps_both_schemes() -> None:
    assert feed_class("amqp://h/%2F") is RabbitMQFeed
    assert feed_class("amqps://h/%2F") is RabbitMQFeed


@pytest.mark.parametrize("topic", ["amq.x", "sm." + "n" * 253])
def test_exchange_names_rabbitmq_refuses_are_refused_up_front(topic: str) -> None:
    with pytest.raises(ConfigurationError, match="exchange name"):
        RabbitMQFeed("amqp://127.0.0.1/%2F", topic)


def test_unreachable_broker_fails_fast_and_names_the_url() -> None:
    port = _closed_port()
    feed = RabbitMQFeed(f"amqp://guest:sekrit@127.0.0.1:{port}/%2F", "sm.unreachable")
    try:
        start = time.monotonic()
        with pytest.raises(FeedUnavailable) as info:
            feed.publish(b"x")
        assert time.monotonic() - start < 1.0
        message = str(info.value)
        assert f"127.0.0.1:{port}" in message
        assert "***" in message
        assert "sekrit" not in message
        assert "start it" in message
        # Unconfirmed messages fail later, counted.
        feed.publish(b"y", confirm=False)
        wait_until(lambda: feed.unconfirmed_failures == 1, 5.0, "the failure counted")
        # A subscription returns, keeps trying, and says nothing until it is live.
        c = Collector()
        feed.subscribe(c.handler)
        assert c.ups == []
    finally:
        start = time.monotonic()
        feed.close()
        assert time.monotonic() - start < 2.0


# ---- with the machine's RabbitMQ ----------------------------------------------------------------


def test_wrong_password_says_so(feeds: Feeds, amqp_url: str) -> None:
    bad = amqp_url.replace("guest:guest@", "guest:wrong@")
    if bad == amqp_url:
        pytest.skip("the test URL has no guest:guest credentials to spoil")
    feed = feeds.open(feeds.topic(), bad)
    with pytest.raises(FeedUnavailable, match="user and password"):
        feed.publish(b"x")


def test_subscribe_returns_bound_and_live(feeds: Feeds) -> None:
    topic = feeds.topic()
    pub, sub = feeds.open(topic), feeds.open(topic)
    pub.publish(b"connect first")  # so the next publish follows subscribe() at once
    c = Collector()
    sub.subscribe(c.handler)
    assert c.ups == [False], "on_up comes once the queue is bound, before subscribe() returns"
    pub.publish(b"right after")
    c.wait_count(1)
    assert c.messages == [b"right after"]


def test_handler_that_raises_does_not_stop_deliveries(feeds: Feeds) -> None:
    topic = feeds.topic()
    pub, sub = feeds.open(topic), feeds.open(topic)
    c = Collector()
    record = c.handler.on_message

    def on_message(payload: bytes, position: str | None) -> None:
        record(payload, position)
        if payload == b"boom":
            raise RuntimeError("handler bug")

    c.handler.on_message = on_message
    sub.subscribe(c.handler)
    c.wait_up()
    pub.publish(b"boom")
    pub.publish(b"next")
    c.wait_count(2)
    assert c.messages == [b"boom", b"next"]
    assert c.downs == 0


def test_unconfirmed_messages_arrive_in_order_even_after_close(feeds: Feeds) -> None:
    topic = feeds.topic()
    pub, sub = feeds.open(topic), feeds.open(topic)
    c = _subscribed(sub)
    sent = [b"u%04d" % i for i in range(500)]
    for m in sent:
        pub.publish(m, confirm=False)
    pub.close()  # sends what is queued on the open connection first
    c.wait_count(len(sent))
    assert c.messages == sent
    assert pub.unconfirmed_failures == 0
    with pytest.raises(FeedUnavailable, match="closed"):
        pub.publish(b"late")
    pub.close()  # idempotent


def test_publish_after_the_last_subscriber_took_the_exchange_away(
    feeds: Feeds, amqp_url: str
) -> None:
    topic = feeds.topic()
    pub, first, second = feeds.open(topic), feeds.open(topic), feeds.open(topic)
    c1 = _subscribed(first)
    pub.publish(b"one")
    c1.wait_count(1)
    first.close()
    # Its exclusive queue went with its connection, and the auto-delete exchange with the queue.
    wait_until(lambda: not exchange_exists(amqp_url, topic), 5.0, "the exchange auto-deleted")
    pub.publish(b"to nobody")  # 404 on the open channel: declared again and sent again
    c2 = _subscribed(second)
    pub.publish(b"two")
    c2.wait_count(1)
    assert c2.messages == [b"two"]


def test_connection_cut_mid_stream(feeds: Feeds, proxy: FaultProxy) -> None:
    topic = feeds.topic()
    pub, sub = feeds.open(topic), feeds.open(topic, through(proxy, feeds.url))
    c = _subscribed(sub)
    stop = threading.Event()
    sent: list[bytes] = []

    def pump() -> None:
        while not stop.is_set():
            m = b"s%06d" % len(sent)
            pub.publish(m)
            sent.append(m)

    t = threading.Thread(target=pump)
    t.start()
    try:
        c.wait_count(50)
        proxy.reset_all()
        c.wait(lambda c: c.downs == 1, "on_down after the cut")
        c.wait_up(2)
    finally:
        stop.set()
        t.join()
    after = [b"a%03d" % i for i in range(50)]
    for m in after:
        pub.publish(m)
    c.wait(lambda c: c.messages[-50:] == after, "every message published after the new on_up")
    assert c.ups == [False, False]
    assert c.downs == 1
    streamed = [m for m in c.messages if m.startswith(b"s")]
    assert streamed == sorted(set(streamed)), "reordered or duplicated around the cut"
    assert set(streamed) <= set(sent)


@pytest.mark.parametrize("cut", ["reset_all", "close_all"])
def test_idle_publisher_whose_connection_was_cut_reconnects(
    feeds: Feeds, proxy: FaultProxy, cut: str
) -> None:
    topic = feeds.topic()
    pub, sub = feeds.open(topic, through(proxy, feeds.url)), feeds.open(topic)
    c = _subscribed(sub)
    pub.publish(b"before")
    c.wait_count(1)
    connections = proxy.total_connections
    getattr(proxy, cut)()  # RST or FIN while the publisher sits idle
    start = time.monotonic()
    pub.publish(b"after")  # nothing was sent on the dead connection: one reconnect is safe
    assert time.monotonic() - start < pub.timeout
    assert proxy.total_connections == connections + 1
    c.wait_count(2)
    assert c.messages == [b"before", b"after"]


def test_publish_into_a_stalled_connection_gives_up_at_the_timeout(
    feeds: Feeds, proxy: FaultProxy
) -> None:
    topic = feeds.topic()
    pub = feeds.open(topic, through(proxy, feeds.url), timeout=1.0)
    c = _subscribed(feeds.open(topic))
    pub.publish(b"1")
    c.wait_count(1)
    proxy.stall()
    start = time.monotonic()
    with pytest.raises(PublishOutcomeUnknown):
        pub.publish(b"2")  # sent, never confirmed
    assert 0.9 < time.monotonic() - start < 2.0
    start = time.monotonic()
    with pytest.raises(FeedUnavailable, match="nothing was sent"):
        pub.publish(b"3")  # queued behind "2", withdrawn at its timeout
    assert time.monotonic() - start < 2.0
    proxy.heal()
    pub.publish(b"4")
    c.wait(lambda c: b"4" in c.messages, "a message published after the stall")
    assert b"3" not in c.messages, "a withdrawn message was sent after all"


def test_stalled_consumer_connection_is_found_by_heartbeats(
    feeds: Feeds, proxy: FaultProxy
) -> None:
    topic = feeds.topic()
    heartbeat = 1
    pub = feeds.open(topic)
    sub = feeds.open(topic, through(proxy, feeds.url) + f"?heartbeat={heartbeat}", timeout=2.0)
    c = _subscribed(sub)
    pub.publish(b"before")
    c.wait_count(1)
    proxy.stall()  # no FIN, no RST: only silence
    # pika looks for received bytes every heartbeat + 5 s: a stall is found within two checks.
    c.wait(lambda c: c.downs == 1, "the stall noticed", timeout=2 * (heartbeat + 5) + 5)
    assert c.ups == [False], "reconnected through a stalled proxy?"
    proxy.heal()
    c.wait_up(2)
    pub.publish(b"after")
    c.wait(lambda c: b"after" in c.messages, "a message after the connection was rebuilt")
