"""Store mode over every feed: Redis holds the truth, the change messages ride the chosen broker.

Every test runs once per feed (``FEEDS``) against real servers.  What each shows:

* changes reach the other servers through the feed (an event arrives; the new value is read);
* a message lost between the write and the publish leaves no one stale beyond ``max_staleness``:
  the writer here publishes its messages somewhere the reader does not listen (the default Redis
  pub/sub channel), so *every* message is lost to the reader, and only its sequence probe can
  tell it that its cached value is old;
* duplicated and reordered change messages, replayed through the real broker, leave the map right.
"""

from __future__ import annotations

import threading
import time

import pytest

from conftest import FEEDS, feed_url
from syncmap import Event, MapConfig, SyncMap
from syncmap.feed.base import FeedHandler, open_feed
from syncmap.testing.wait import wait_until


@pytest.fixture(params=FEEDS)
def url_and_feed(request: pytest.FixtureRequest, shared_redis_url: str) -> tuple[str, str]:
    return shared_redis_url, feed_url(request, request.param, shared_redis_url)


def test_changes_reach_the_other_servers(url_and_feed: tuple[str, str]) -> None:
    url, feed = url_and_feed
    with SyncMap("m", url, feed=feed) as a, SyncMap("m", url, feed=feed) as b:
        a["k"] = 1
        assert b["k"] == 1  # cached by b now
        # The first write's own message may still be on its way (relayed feeds publish after the
        # write), and the second's may arrive before set() returns: record every event, then wait
        # for one of the second write's version.
        versions: list[int] = []
        b.subscribe(lambda e: versions.append(e.version) if e.key == "k" else None, inline=True)
        v2 = a.set("k", 2)
        wait_until(lambda: any(v >= v2 for v in versions), 5, f"an event for k@{v2} via {feed}")
        peeked = b.peek("k")
        assert peeked is None or peeked[1] >= v2, "the cached value was invalidated"
        assert b["k"] == 2
        a.update({f"u{i}": i for i in range(50)})
        wait_until(lambda: all(b.get(f"u{i}") == i for i in range(50)), 5, "the batch arrives")


def test_a_lost_publish_is_healed_within_max_staleness(url_and_feed: tuple[str, str]) -> None:
    url, feed = url_and_feed
    delta = 0.5
    with SyncMap("m", url, feed=feed, config=MapConfig(max_staleness=delta)) as reader, \
            SyncMap("m", url) as writer:  # fmt: skip
        writer["k"] = "old"
        assert reader["k"] == "old"
        assert reader.peek("k") is not None
        writer["k"] = "new"  # its message goes to the Redis channel, which the reader ignores
        acked = time.monotonic()
        healed = wait_until(lambda: reader.get("k") == "new", 5, "the reader sees the new value")
        assert healed <= delta + 0.25, f"stale for {healed:.3f} s, beyond max_staleness={delta}"
        stats = reader.statistics()
        assert stats.lost_detected + stats.lease_lapses + stats.resyncs >= 1
        assert time.monotonic() - acked < 5


def test_duplicates_and_reordering_leave_the_map_right(url_and_feed: tuple[str, str]) -> None:
    url, feed = url_and_feed
    with SyncMap("m", url, feed=feed) as a, SyncMap("m", url, feed=feed) as b:
        topic = type(open_feed(feed, "probe-only")).topic_for("sm", "m")  # the map's topic
        tap, replay = open_feed(feed, topic), open_feed(feed, topic)
        captured: list[bytes] = []
        got = threading.Condition()

        def keep(data: bytes, _position: str | None) -> None:
            with got:
                captured.append(data)
                got.notify_all()

        up = threading.Event()
        tap.subscribe(FeedHandler(keep, lambda _r: up.set()))
        assert up.wait(10)
        try:
            for v in range(1, 6):
                a["k"] = v
            with got:
                assert got.wait_for(lambda: len(captured) >= 5, 10), "the tap saw the writes"
            wait_until(lambda: b.get("k") == 5, 5, "b reads the last write")
            events: list[Event] = []
            b.subscribe(events.append, inline=True)
            for data in [*reversed(captured), *captured]:  # old messages, reversed and twice
                replay.publish(data)
            with got:
                assert got.wait_for(lambda: len(captured) >= 15, 10), "the replay went through"
            wait_until(lambda: len(events) >= 10, 5, "b processed the replay")
            assert b["k"] == 5
            assert a["k"] == 5
        finally:
            tap.close()
            replay.close()
