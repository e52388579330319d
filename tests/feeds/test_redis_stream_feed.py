"""The ``redis+stream://`` feed: the conformance suite, then its own promises, on real Redis.

The suite runs on a Redis with an append-only file, so that its ``restart`` keeps the stream (the
suite expects a durable feed to say ``resumed=True`` after a restart).  The fault tests use the
plain ``redis_server`` fixture, which loses everything on restart, where ``resumed=False`` is the
only honest answer.

Several tests hold the reader inside ``on_down`` (or the first ``on_up``) until they have written
what they need: the reader cannot reconnect (or start reading) before that, so those writes are
certainly made while it is away, with no sleep and no luck involved.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator

import pytest
import redis

from syncmap.embedded import EmbeddedRedis
from syncmap.errors import ConfigurationError
from syncmap.feed.base import BEGINNING, Feed, FeedHandler, FeedUnavailable, PublishOutcomeUnknown
from syncmap.feed.base import feed_class as registry_class
from syncmap.feed.redis_stream import (
    DEFAULT_MAXLEN,
    ZERO,
    RedisStreamFeed,
    StreamInfo,
    resume_point,
)
from syncmap.keys import Layout
from syncmap.testing.feedconformance import CHECKS, WAIT, Collector, FeedKit
from syncmap.testing.wait import wait_until


def stream_url(server: EmbeddedRedis, query: str = "") -> str:
    return server.url.replace("redis://", "redis+stream://", 1) + query


@pytest.fixture
def persistent_redis(redis_binary: str) -> Iterator[EmbeddedRedis]:
    """A Redis whose restart keeps its data (AOF, fsync always)."""
    server = EmbeddedRedis(binary=redis_binary, appendonly=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def kit(persistent_redis: EmbeddedRedis) -> Iterator[FeedKit]:
    opened: list[Feed] = []

    def open_(topic: str) -> Feed:
        feed = RedisStreamFeed(stream_url(persistent_redis), RedisStreamFeed.topic_for("sm", topic))
        opened.append(feed)
        return feed

    yield FeedKit("redis streams", open_, restart=persistent_redis.restart)
    for feed in opened:
        feed.close()


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_conformance(kit: FeedKit, check: str) -> None:
    CHECKS[check](kit)


# ---- the feed's own promises, on a Redis without persistence ------------------------------------


class Feeds:
    """Opens feeds on one fresh stream; closes them all afterwards."""

    def __init__(self, server: EmbeddedRedis) -> None:
        self.server = server
        self.stream = RedisStreamFeed.topic_for("sm", f"t{uuid.uuid4().hex[:12]}")
        self.opened: list[RedisStreamFeed] = []

    def open(self, query: str = "", *, timeout: float = 5.0) -> RedisStreamFeed:
        feed = RedisStreamFeed(stream_url(self.server, query), self.stream, timeout=timeout)
        self.opened.append(feed)
        return feed

    def close(self) -> None:
        for feed in self.opened:
            feed.close()


@pytest.fixture
def feeds(redis_server: EmbeddedRedis) -> Iterator[Feeds]:
    f = Feeds(redis_server)
    try:
        yield f
    finally:
        f.close()


class HeldDown(Collector):
    """A collector whose ``on_down`` holds the reader until :meth:`release`: until then it cannot
    reconnect, so whatever the test writes meanwhile is written while it is away."""

    def __init__(self) -> None:
        super().__init__()
        self.released = threading.Event()
        self.handler = FeedHandler(self._message, self._up, self._held_down)

    def _held_down(self) -> None:
        self._down()
        assert self.released.wait(WAIT), "the test never released the reader"

    def release(self) -> None:
        self.released.set()


def readers(admin: redis.Redis) -> list[dict[str, str]]:
    """The connections whose last command was XREAD: the feed's readers."""
    return [c for c in admin.client_list() if c.get("cmd") == "xread"]


def msgs(tag: str, n: int) -> list[bytes]:
    return [f"{tag}-{i:05d}".encode() for i in range(n)]


def ids(positions: list[str | None]) -> list[tuple[int, int]]:
    out = []
    for p in positions:
        assert p is not None, "a durable feed delivered a message without its position"
        ms, seq = p.split("-")
        out.append((int(ms), int(seq)))
    return out


def test_resumes_with_no_gap_after_its_connection_is_killed(
    feeds: Feeds, admin: redis.Redis
) -> None:
    pub, sub_feed = feeds.open(), feeds.open()
    c = HeldDown()
    sub_feed.subscribe(c.handler)
    c.wait_up()
    sent = msgs("k", 500)
    killed = threading.Event()

    def publish() -> None:
        for m in sent[:250]:
            pub.publish(m)
        assert killed.wait(WAIT)
        for m in sent[250:]:  # the reader is held in on_down: all of these land while it is away
            pub.publish(m)

    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        c.wait_count(100)  # the reader is reading while the publisher publishes
        (reader,) = readers(admin)
        assert admin.client_kill_filter(_id=reader["id"]) == 1
        c.wait(lambda c: c.downs == 1, "on_down after CLIENT KILL")
    finally:
        killed.set()
        publisher.join()
    c.release()
    c.wait_count(500)
    assert c.messages == sent, "lost, repeated or reordered around the kill"
    assert ids(c.positions) == sorted(set(ids(c.positions)))
    assert c.ups == [True, True], f"a resume that lost nothing must say so: {c.ups}"
    assert c.downs == 1


def test_start_none_delivers_what_came_before_the_first_read(feeds: Feeds) -> None:
    """start=None is the newest entry read inside subscribe(), not ``$`` read later: messages
    published between subscribe() and the reader's first XREAD arrive; older ones do not."""
    pub, sub_feed = feeds.open(), feeds.open()
    pub.publish(b"old")
    c = Collector()
    gate = threading.Event()

    def held_up(resumed: bool) -> None:  # the reader reads only after on_up returns
        assert gate.wait(WAIT)
        c.handler.on_up(resumed)

    sub_feed.subscribe(FeedHandler(c.handler.on_message, held_up, c.handler.on_down))
    pub.publish(b"new")
    gate.set()
    c.wait_count(1)
    pub.publish(b"newer")
    c.wait_count(2)
    assert c.messages == [b"new", b"newer"]
    assert c.ups == [True]


def test_start_position_trimmed_away_says_resumed_false(feeds: Feeds, admin: redis.Redis) -> None:
    pub = feeds.open("?maxlen=10")
    pub.publish(b"first")
    trimmed = pub.position()
    assert trimmed is not None
    for m in msgs("t", 300):
        pub.publish(m)
    held = [f[b"m"] for _id, f in admin.xrange(feeds.stream)]
    assert 10 <= len(held) < 300, f"MAXLEN ~ 10 should have trimmed: {len(held)} kept"

    c = Collector()
    feeds.open().subscribe(c.handler, trimmed)
    c.wait_up()
    c.wait_count(len(held))
    assert c.ups == [False], "a start position trimmed away must be reported as a loss"
    assert c.messages == held, "what the stream still holds is delivered, in order"

    kept = Collector()  # and a position the stream still holds loses nothing
    feeds.open().subscribe(kept.handler, pub.position())
    kept.wait_up()
    assert kept.ups == [True]


def test_trimmed_while_disconnected_says_resumed_false(feeds: Feeds, admin: redis.Redis) -> None:
    pub, sub_feed = feeds.open("?maxlen=10"), feeds.open()
    c = HeldDown()
    sub_feed.subscribe(c.handler)
    c.wait_up()
    pub.publish(b"seen")
    c.wait_count(1)
    (reader,) = readers(admin)
    admin.client_kill_filter(_id=reader["id"])
    c.wait(lambda c: c.downs == 1, "on_down after CLIENT KILL")
    for m in msgs("g", 300):  # far past the cap while the reader is away
        pub.publish(m)
    held = [f[b"m"] for _id, f in admin.xrange(feeds.stream)]
    assert b"seen" not in held, "the test needs the delivered entry trimmed away"
    c.release()
    c.wait_count(1 + len(held))
    assert c.ups == [True, False], f"a gap past maxlen must be reported: {c.ups}"
    assert c.messages == [b"seen", *held]


@pytest.mark.parametrize("meanwhile", ["nothing", "lower_ids", "overlapping_ids"])
def test_restart_without_persistence_says_resumed_false(
    feeds: Feeds, redis_server: EmbeddedRedis, meanwhile: str
) -> None:
    """The stream is gone after the restart.  Entries of the new stream must all arrive, even
    those whose IDs are below the last one delivered (another writer's explicit IDs, or a clock
    that went back)."""
    pub, sub_feed = feeds.open(), feeds.open()
    c = HeldDown()
    sub_feed.subscribe(c.handler)
    c.wait_up()
    pub.publish(b"one")
    c.wait_count(1)
    redis_server.restart()
    c.wait(lambda c: c.downs == 1, "on_down after the restart")
    admin = redis_server.client()
    try:
        assert not admin.exists(feeds.stream), "this Redis was supposed to lose the stream"
        expected = [b"one"]
        if meanwhile != "nothing":
            admin.xadd(feeds.stream, {"m": b"low"}, id="1-1")
            expected.append(b"low")
        if meanwhile == "overlapping_ids":
            pub.publish(b"new")
            expected.append(b"new")
        c.release()
        c.wait_up(2)
        assert c.ups == [True, False], f"a stream lost with the restart must be reported: {c.ups}"
        pub.publish(b"two")
        expected.append(b"two")
        c.wait_count(len(expected))
        assert c.messages == expected
    finally:
        admin.close()


def test_restart_before_the_first_delivery_says_resumed_false(
    feeds: Feeds, redis_server: EmbeddedRedis, admin: redis.Redis
) -> None:
    """Nothing delivered yet (the stream was empty at subscribe()), so there is no entry to look
    for: only the server's run_id shows that a message published meanwhile died with it."""
    pub, sub_feed = feeds.open(), feeds.open()
    c = HeldDown()
    sub_feed.subscribe(c.handler)
    c.wait_up()
    (reader,) = readers(admin)
    admin.client_kill_filter(_id=reader["id"])
    c.wait(lambda c: c.downs == 1, "on_down after CLIENT KILL")
    pub.publish(b"lost")  # the reader is away; the restart then loses it
    redis_server.restart()
    c.release()
    c.wait_up(2)
    assert c.ups == [True, False], f"a restart may have lost messages: {c.ups}"
    pub.publish(b"after")
    c.wait_count(1)
    assert c.messages == [b"after"]


def test_one_on_down_however_many_reconnects_fail(
    feeds: Feeds, redis_server: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    pub, sub_feed = feeds.open(), feeds.open()
    c = Collector()
    sub_feed.subscribe(c.handler)
    c.wait_up()
    with caplog.at_level(logging.DEBUG, logger="syncmap.feed"):
        redis_server.kill()
        wait_until(
            lambda: sum("reconnect failed" in r.getMessage() for r in caplog.records) >= 3,
            WAIT,
            "three failed reconnects",
        )
    redis_server.restart()
    c.wait_up(2)
    assert (c.downs, c.ups) == (1, [True, False]), (c.downs, c.ups)
    pub.publish(b"back")
    c.wait_count(1)


def test_stalled_connection_is_noticed(feeds: Feeds, redis_server: EmbeddedRedis) -> None:
    pub, sub_feed = feeds.open(), feeds.open()
    c = Collector()
    sub_feed.subscribe(c.handler)
    c.wait_up()
    redis_server.pause()  # sockets stay open, nothing answers: only a timeout can tell
    try:
        c.wait(lambda c: c.downs == 1, "on_down while Redis does not answer")
    finally:
        redis_server.resume()
    c.wait_up(2)
    assert c.ups == [True, True]
    pub.publish(b"after")
    c.wait_count(1)
    assert c.messages == [b"after"]


def test_publish_to_a_stopped_redis_raises_feed_unavailable(
    feeds: Feeds, redis_server: EmbeddedRedis
) -> None:
    feed = feeds.open()
    feed.publish(b"while up")
    redis_server.kill()
    with pytest.raises(FeedUnavailable) as raised:
        feed.publish(b"while down")
    text = str(raised.value)
    assert "cannot reach" in text and "nothing was sent" in text, text
    assert feed.describe() in text, text
    with pytest.raises(FeedUnavailable):
        feed.position()
    with pytest.raises(FeedUnavailable, match="nothing is subscribed"):
        feed.subscribe(Collector().handler)


def test_publish_without_an_answer_is_outcome_unknown(
    feeds: Feeds, redis_server: EmbeddedRedis
) -> None:
    feed = feeds.open(timeout=0.3)
    feed.publish(b"while up")  # leaves an open connection, so the next XADD is sent
    redis_server.pause()
    try:
        with pytest.raises(PublishOutcomeUnknown, match="may or may not"):
            feed.publish(b"unanswered")
    finally:
        redis_server.resume()


def test_a_failing_handler_is_logged_and_the_reader_goes_on(
    feeds: Feeds, caplog: pytest.LogCaptureFixture
) -> None:
    pub, sub_feed = feeds.open(), feeds.open()
    c = Collector()

    def on_message(payload: bytes, position: str | None) -> None:
        c.handler.on_message(payload, position)
        if payload == b"bad":
            raise RuntimeError("handler bug")

    sub_feed.subscribe(FeedHandler(on_message, c.handler.on_up, c.handler.on_down))
    c.wait_up()
    with caplog.at_level(logging.ERROR, logger="syncmap.feed"):
        for m in (b"bad", b"good"):
            pub.publish(m)
        c.wait_count(2)
    assert c.messages == [b"bad", b"good"]
    assert c.downs == 0, "a handler's failure is not a lost connection"
    assert any("handler failed" in r.getMessage() for r in caplog.records)


def test_close_stops_the_readers_and_their_connections(feeds: Feeds, admin: redis.Redis) -> None:
    feed = feeds.open()
    subs = []
    for _ in range(3):
        c = Collector()
        subs.append(feed.subscribe(c.handler))
        c.wait_up()
    wait_until(lambda: len(readers(admin)) == 3, WAIT, "three readers in XREAD")
    subs[0].close()
    subs[0].close()  # idempotent
    wait_until(lambda: len(readers(admin)) == 2, WAIT, "the closed reader's connection gone")
    feed.close()
    feed.close()  # idempotent
    wait_until(lambda: readers(admin) == [], WAIT, "every reader's connection closed")
    assert not [t for t in threading.enumerate() if t.name == "syncmap-stream" and t.is_alive()]


# ---- layout, URL, arguments ----------------------------------------------------------------------


def test_entry_layout_is_the_one_the_scripts_write(feeds: Feeds, admin: redis.Redis) -> None:
    feed = feeds.open("?maxlen=7")
    assert feed.stream == Layout("sm", feeds.stream.split("{")[1].split("}")[0], 1).stream
    feed.publish(b"x", key=b"ignored")
    ((entry_id, fields),) = admin.xrange(feed.stream)
    assert fields == {b"m": b"x"}
    assert feed.position() == entry_id.decode()
    for m in msgs("c", 400):
        feed.publish(m)
    assert 7 <= admin.xlen(feed.stream) < 401, "MAXLEN ~ 7 never trimmed"


def test_maxlen_zero_never_trims(feeds: Feeds, admin: redis.Redis) -> None:
    feed = feeds.open("?maxlen=0")
    for m in msgs("z", 300):
        feed.publish(m)
    assert admin.xlen(feed.stream) == 300


def test_position_of_an_empty_stream_is_none(feeds: Feeds) -> None:
    assert feeds.open().position() is None


def test_url_options() -> None:
    feed = RedisStreamFeed("redis+stream://127.0.0.1:1/3?maxlen=42", "s")
    try:
        endpoint = feed.topology.endpoint()
        assert (feed.maxlen, endpoint.db, endpoint.socket_timeout) == (42, 3, feed.timeout)
    finally:
        feed.close()
    plain = RedisStreamFeed("redis+stream://127.0.0.1:1/0", "s")
    tls = RedisStreamFeed("rediss+stream://127.0.0.1:1/0", "s")
    plain.close()
    tls.close()
    assert plain.maxlen == DEFAULT_MAXLEN
    assert tls.topology.endpoint().tls is not None
    assert plain.topology.endpoint().tls is None
    assert registry_class("rediss+stream://h:1/0") is RedisStreamFeed
    for bad in ("-1", "ten", "1.5"):
        with pytest.raises(ConfigurationError, match="maxlen"):
            RedisStreamFeed(f"redis+stream://127.0.0.1:1/0?maxlen={bad}", "s")


def test_bad_start_and_wrong_key_type_are_refused(feeds: Feeds, admin: redis.Redis) -> None:
    feed = feeds.open()
    with pytest.raises(ValueError, match="entry ID"):
        feed.subscribe(Collector().handler, "yesterday")
    admin.set(feed.stream, b"not a stream")
    with pytest.raises(ConfigurationError, match="is a stream"):
        feed.subscribe(Collector().handler, BEGINNING)


# ---- resume_point, the decision on its own -------------------------------------------------------


def info(
    length: int,
    last: tuple[int, int],
    first: tuple[int, int] | None,
    added: int | None = None,
    deleted: tuple[int, int] | None = None,
) -> StreamInfo:
    return StreamInfo(length, last, first, added, deleted)


@pytest.mark.parametrize(
    ("last", "kept", "stream", "same", "expected"),
    [
        ("5-0", True, None, False, ("5-0", True)),  # still there (even after a restart: AOF)
        ("5-0", False, None, True, (ZERO, False)),  # the stream is gone
        ("5-0", False, info(2, (3, 0), (1, 0), 2), True, (ZERO, False)),  # IDs went backwards
        ("5-0", False, info(3, (9, 0), (7, 0), 9), True, ("5-0", False)),  # trimmed past us
        ("5-0", False, info(0, (9, 0), None, 9), True, ("5-0", False)),  # trimmed to nothing
        ("5-0", False, info(8, (9, 0), (1, 0), 9, (5, 0)), True, ("5-0", False)),  # XDEL'd
        ("5-0", False, info(9, (9, 0), (1, 0), 9, (0, 0)), True, (ZERO, False)),  # made anew
        ("5-0", False, info(9, (9, 0), (1, 0)), True, (ZERO, False)),  # Redis 6: cannot tell
        (ZERO, False, None, True, (ZERO, True)),  # nothing yet, nothing ever
        (ZERO, False, None, False, (ZERO, False)),  # ... but the server restarted
        (ZERO, False, info(4, (4, 0), (1, 0), 4), True, (ZERO, True)),  # never trimmed
        (ZERO, False, info(4, (9, 0), (6, 0), 9), True, (ZERO, False)),  # trimmed
        (ZERO, False, info(4, (4, 0), (1, 0)), True, (ZERO, False)),  # Redis 6: cannot tell
        (ZERO, False, info(0, (0, 0), None), True, (ZERO, True)),  # Redis 6, untouched
    ],
)
def test_resume_point(
    last: str,
    kept: bool,
    stream: StreamInfo | None,
    same: bool,
    expected: tuple[str, bool],
) -> None:
    assert resume_point(last, kept, stream, same) == expected
