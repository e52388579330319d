"""``nats+jetstream://`` against a real nats-server: the conformance suite, crashes, resumes."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import NoReturn

import pytest

from syncmap.errors import ConfigurationError
from syncmap.feed import aioloop, natsbase
from syncmap.feed import jetstream as js_feed
from syncmap.feed.base import (
    BEGINNING,
    Feed,
    FeedHandler,
    FeedUnavailable,
    PublishOutcomeUnknown,
    open_feed,
)
from syncmap.feed.jetstream import JetStreamFeed
from syncmap.testing.feedconformance import CHECKS, Collector, FeedKit
from syncmap.testing.nats_server import NatsServer, NatsServerNotFound, find_nats_server
from syncmap.testing.wait import wait_until

TIMEOUT = 2.0


def no_binary(exc: NatsServerNotFound) -> NoReturn:
    """Skip locally, but fail in CI: a CI run must not go green by skipping every NATS test."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the NATS tests: {exc}", pytrace=False)
    pytest.skip(str(exc))


@pytest.fixture(scope="module")
def nats_binary() -> str:
    try:
        return find_nats_server()
    except NatsServerNotFound as exc:
        no_binary(exc)


@pytest.fixture
def server(nats_binary: str) -> Iterator[NatsServer]:
    """A nats-server of this test's own (JetStream on, its own store), free to kill."""
    srv = NatsServer(binary=nats_binary).start()
    try:
        yield srv
    finally:
        srv.stop()


def js_url(server: NatsServer, query: str = "") -> str:
    return server.url.replace("nats://", "nats+jetstream://", 1) + query


@pytest.fixture
def feeds(server: NatsServer) -> Iterator[list[Feed]]:
    opened: list[Feed] = []
    yield opened
    for feed in opened:
        feed.close()


def open_js(
    server: NatsServer, feeds: list[Feed], topic: str = "t", query: str = ""
) -> JetStreamFeed:
    feed = JetStreamFeed(
        js_url(server, query), JetStreamFeed.topic_for("sm", topic), timeout=TIMEOUT
    )
    feeds.append(feed)
    return feed


@pytest.fixture
def kit(server: NatsServer, feeds: list[Feed]) -> FeedKit:
    return FeedKit("jetstream", lambda t: open_js(server, feeds, t), restart=server.restart)


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_conformance(kit: FeedKit, check: str) -> None:
    CHECKS[check](kit)


def test_the_registry_opens_jetstream_urls(server: NatsServer, feeds: list[Feed]) -> None:
    feed = open_feed(js_url(server), JetStreamFeed.topic_for("sm", "reg"), timeout=TIMEOUT)
    feeds.append(feed)
    assert type(feed) is JetStreamFeed


def test_killed_and_restarted_while_publishing(server: NatsServer, feeds: list[Feed]) -> None:
    """SIGKILL mid-run: every message JetStream acknowledged reaches the subscriber exactly as
    published, in stream order, and the subscriber says it resumed with nothing lost."""
    sub_feed, pub = open_js(server, feeds), open_js(server, feeds)
    c = Collector()
    sub_feed.subscribe(c.handler)
    c.wait_up()
    acked: list[bytes] = []
    failures: list[Exception] = []
    stop = threading.Event()

    def publish_loop() -> None:
        i = 0
        while not stop.is_set():
            payload = f"m{i:06d}".encode() + bytes(range(256))  # every byte value survives
            key = payload[:7] if i % 2 else None  # half keyed (all keys distinct), half not
            i += 1
            try:
                pub.publish(payload, key=key)
                acked.append(payload)
            except (FeedUnavailable, PublishOutcomeUnknown) as exc:
                failures.append(exc)
                time.sleep(0.01)  # publisher back-off while the server is away, not a wait

    t = threading.Thread(target=publish_loop)
    t.start()
    try:
        c.wait_count(100)
        server.kill()
        c.wait(lambda c: c.downs >= 1, "on_down after SIGKILL")
        before = len(acked)
        server.restart()
        c.wait_up(2)
        wait_until(lambda: len(acked) >= before + 200, 10, "acks after the restart")
    finally:
        stop.set()
        t.join()
    assert failures, "publishes while the server was dead must have failed"
    assert c.ups[-1] is True, f"nothing was lost, so resumed must be True (ups={c.ups})"
    c.wait(lambda c: set(acked) <= set(c.messages), "every acknowledged message delivered")
    positions = [int(p) for p in c.positions if p is not None]
    assert len(positions) == len(c.positions), "every message has its stream position"
    assert positions == sorted(set(positions)), "stream order, nothing delivered twice"


def test_a_publish_while_the_server_is_down_fails_within_the_timeout(
    server: NatsServer, feeds: list[Feed]
) -> None:
    feed = open_js(server, feeds)
    c = Collector()
    feed.subscribe(c.handler)
    c.wait_up()
    server.kill()
    c.wait(lambda c: c.downs >= 1, "the connection noticed the kill")
    for confirm in (True, False):
        start = time.monotonic()
        with pytest.raises((FeedUnavailable, PublishOutcomeUnknown)):
            feed.publish(b"x", key=b"k", confirm=confirm)
        assert time.monotonic() - start < TIMEOUT + 1.5
    with pytest.raises(FeedUnavailable):
        feed.position()


def test_a_server_with_an_empty_store_is_a_loss_and_the_stream_is_made_again(
    server: NatsServer, feeds: list[Feed], nats_binary: str
) -> None:
    port = server.port
    sub_feed, pub = open_js(server, feeds), open_js(server, feeds)
    c = Collector()
    sub_feed.subscribe(c.handler)
    c.wait_up()
    for i in range(5):
        pub.publish(f"old{i}".encode())
    c.wait_count(5)
    server.stop()  # removes the store: the new server starts with no stream
    fresh = NatsServer(port=port, binary=nats_binary).start()
    try:
        c.wait_up(2)
        assert c.ups[-1] is False, "the stream's history is gone: resumed must be False"
        assert c.downs >= 1
        deadline = time.monotonic() + 10
        while True:  # the publisher reconnects on its own; a refusal meanwhile is loud
            try:
                pub.publish(b"new")
                break
            except FeedUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # publisher back-off, not a data wait
        c.wait(lambda c: b"new" in c.messages, "a message in the new stream")
        assert c.positions[c.messages.index(b"new")] == "1", "the new stream starts again at 1"
    finally:
        sub_feed.close()
        pub.close()
        fresh.stop()


def test_a_stream_deleted_under_a_live_subscription(server: NatsServer, feeds: list[Feed]) -> None:
    """No reconnect at all: the consumer's heartbeats stop, the subscription finds the stream
    gone, makes it again and tells the map it may have lost messages."""
    sub_feed, pub = open_js(server, feeds), open_js(server, feeds)
    c = Collector()
    sub_feed.subscribe(c.handler)
    c.wait_up()
    pub.publish(b"one")
    c.wait_count(1)
    aioloop.run(pub._jsm.delete_stream(pub.stream), TIMEOUT)
    c.wait(lambda c: len(c.ups) >= 2 and c.downs >= 1, "on_down, on_up after the deletion")
    assert c.ups[-1] is False
    pub.publish(b"two")
    c.wait(lambda c: b"two" in c.messages, "a message in the re-made stream")


def test_unkeyed_messages_never_replace_each_other(server: NatsServer, feeds: list[Feed]) -> None:
    pub = open_js(server, feeds)
    sent = [f"u{i}".encode() for i in range(20)]
    for m in sent:
        pub.publish(m)
    pub.publish(b"k=1", key=b"k")
    pub.publish(b"k=2", key=b"k")
    reader = open_js(server, feeds)
    c = Collector()
    reader.subscribe(c.handler, BEGINNING)
    c.wait_count(21)
    assert c.messages == [*sent, b"k=2"]
    assert c.ups == [True], "a compacted history is whole: the first on_up says so"


def test_a_trimmed_history_is_reported_on_the_first_on_up(
    server: NatsServer, feeds: list[Feed]
) -> None:
    """max_msgs=5 and 10 messages: the five oldest are gone, so a replay from BEGINNING (or from a
    position before them) says resumed=False; from a position still kept, True."""
    pub = open_js(server, feeds, query="?max_msgs=5")
    for i in range(10):
        pub.publish(f"m{i}".encode())
    reader = open_js(server, feeds, query="?max_msgs=5")
    for start, resumed, first in (
        (BEGINNING, False, b"m5"),
        ("2", False, b"m5"),
        ("6", True, b"m6"),
    ):
        c = Collector()
        sub = reader.subscribe(c.handler, start)
        c.wait_count(1)
        assert (c.ups[0], c.messages[0]) == (resumed, first), f"from {start}: {c.ups} {c.messages}"
        sub.close()


def test_a_position_beyond_the_stream_replays_all_of_it(
    server: NatsServer, feeds: list[Feed]
) -> None:
    """A position from an earlier incarnation of the stream (larger than anything in it)."""
    pub = open_js(server, feeds)
    pub.publish(b"a")
    pub.publish(b"b")
    c = Collector()
    open_js(server, feeds).subscribe(c.handler, "1000")
    c.wait_count(2)
    assert c.messages == [b"a", b"b"] and c.ups == [False]


def test_start_none_starts_after_the_newest_message(server: NatsServer, feeds: list[Feed]) -> None:
    pub = open_js(server, feeds)
    pub.publish(b"before")
    c = Collector()
    open_js(server, feeds).subscribe(c.handler)
    pub.publish(b"after")  # right after subscribe() returned
    c.wait_count(1)
    assert c.messages == [b"after"] and c.positions == ["2"] and c.ups == [True]


def test_bad_urls_and_positions_are_configuration_errors(
    server: NatsServer, feeds: list[Feed]
) -> None:
    for query in ("?max_msgs=0", "?max_msgs=x", "?replicas=3"):
        with pytest.raises(ConfigurationError, match="max_msgs"):
            JetStreamFeed(js_url(server, query), "sm.t", timeout=TIMEOUT)
    feed = open_js(server, feeds)
    for start in ("abc", "-1"):
        with pytest.raises(ConfigurationError, match="not a position"):
            feed.subscribe(Collector().handler, start)


def test_a_server_without_jetstream_is_reported(nats_binary: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([nats_binary, "-a", "127.0.0.1", "-p", str(port)])
    try:
        wait_until(lambda: _accepts(port), 10, "nats-server without JetStream listening")
        with pytest.raises(FeedUnavailable, match="JetStream does not answer"):
            JetStreamFeed(f"nats+jetstream://127.0.0.1:{port}", "sm.t", timeout=TIMEOUT)
    finally:
        proc.terminate()
        proc.wait(5)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def test_a_slow_handler_loses_nothing(
    server: NatsServer, feeds: list[Feed], monkeypatch: pytest.MonkeyPatch
) -> None:
    """nats-py's queue overflows behind a stuck handler and drops messages; the subscription
    re-reads them from the stream, so the handler still gets every one, once, in order."""
    monkeypatch.setattr(natsbase, "PENDING_MSGS", 10)
    release = threading.Event()
    c = Collector()

    def on_message(payload: bytes, position: str | None) -> None:
        release.wait(10)
        c.handler.on_message(payload, position)

    handler = FeedHandler(on_message, c.handler.on_up, c.handler.on_down)
    sub_feed, pub = open_js(server, feeds), open_js(server, feeds)
    sub_feed.subscribe(handler)
    c.wait_up()
    sent = [f"m{i:03d}".encode() for i in range(200)]
    for m in sent:
        pub.publish(m)
    release.set()
    c.wait_count(len(sent))
    assert c.messages == sent
    assert c.downs == 0 and c.ups == [True], "nothing was lost, so nothing to report"


def test_a_backlog_beyond_the_flow_control_window_flows(
    server: NatsServer, feeds: list[Feed]
) -> None:
    """16 MB replayed from BEGINNING: the server pauses for flow-control replies several times;
    every one is answered in order (none found stalled by a heartbeat) and all of it arrives."""
    pub = open_js(server, feeds)
    sent = [f"{i:05d}".encode() + bytes(20_000) for i in range(800)]
    for i, m in enumerate(sent):
        pub.publish(m, confirm=i % 100 == 99)
    pub.publish(b"end")
    c = Collector()
    sub = open_js(server, feeds).subscribe(c.handler, BEGINNING)
    c.wait(lambda c: b"end" in c.messages, "the whole backlog")
    assert c.messages == [*sent, b"end"]
    assert isinstance(sub, js_feed._StreamSubscription)
    assert sub.stalls == 0, "a flow-control request went unanswered"
