"""The feed conformance suite: what every feed (``syncmap.feed``) must do, checked on a real broker.

Each check is a function of a :class:`FeedKit` that raises ``AssertionError`` with a readable
message.  A kit says how to open a feed of its kind on a fresh topic and, where the test can, how
to restart the broker or cut a connection.  Each ``tests/feeds/test_<feed>_feed.py`` runs every
check against its feed on a real broker; a new feed gets the whole suite by giving one kit.

The checks follow the contract in ``feed/base.py``:

* ``roundtrip``: what one publisher sends (confirmed) arrives, whole and in order;
* ``fanout``: every subscriber (separate feed objects = separate servers) gets every message;
* ``per_publisher``: two publishers interleaved: each one's messages arrive in its own order, and
  a feed that claims ``ordering == "total"`` shows every subscriber one order;
* ``large``: a 256 KiB message arrives intact (a replicated map's value travels in it);
* ``closed``: after ``Subscription.close()`` nothing more is delivered to that handler;
* ``positions``: durable feeds: ``position()`` is ``None`` on an empty topic, then names the newest
  message; ``subscribe(start=p)`` delivers exactly what came after ``p``; ``BEGINNING`` delivers
  everything; feeds that keep nothing refuse ``start``;
* ``restart``: (kits that can restart the broker) the subscription is told ``on_down`` and
  ``on_up``, and messages published after the restart arrive; a durable feed says
  ``resumed=True``;
* ``compaction``: (``compacted`` feeds) a replay from ``BEGINNING`` yields, per key, the newest
  message.

Duplicate and out-of-order delivery are not the feed's business: messages carry versions, and the
map-level checks (``tests/integration/test_feeds_map.py``) replay duplicates and reorderings
through a real feed and show the map unmoved by them.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ConfigurationError
from ..feed.base import BEGINNING, Feed, FeedHandler, Subscription

WAIT = 10.0
"""Seconds a check waits for deliveries it expects (a broker on loopback takes milliseconds)."""


@dataclass
class FeedKit:
    """How to get feeds of one kind on a real broker, and which faults the test can cause."""

    name: str
    open: Callable[[str], Feed]
    """``open(topic)``: a new feed object (a separate connection: another server) on ``topic``."""
    restart: Callable[[], None] | None = None
    """Stop the broker and start it again (on the same port, keeping its data if it keeps any)."""
    topics: list[str] = field(default_factory=list)

    def topic(self) -> str:
        t = f"conf{uuid.uuid4().hex[:12]}"
        self.topics.append(t)
        return t


class Collector:
    """A handler that records what arrives, so a check can wait for it without sleeping."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.positions: list[str | None] = []
        self.ups: list[bool] = []
        self.downs = 0
        self._cond = threading.Condition()
        self.handler = FeedHandler(self._message, self._up, self._down)

    def _message(self, payload: bytes, position: str | None) -> None:
        with self._cond:
            self.messages.append(payload)
            self.positions.append(position)
            self._cond.notify_all()

    def _up(self, resumed: bool) -> None:
        with self._cond:
            self.ups.append(resumed)
            self._cond.notify_all()

    def _down(self) -> None:
        with self._cond:
            self.downs += 1
            self._cond.notify_all()

    def wait(
        self, predicate: Callable[[Collector], bool], what: str, timeout: float = WAIT
    ) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self), timeout):
                raise AssertionError(
                    f"{what} within {timeout} s (got {len(self.messages)} messages, "
                    f"ups={self.ups}, downs={self.downs})"
                )

    def wait_up(self, count: int = 1) -> None:
        self.wait(lambda c: len(c.ups) >= count, f"subscription confirmed ({count})")

    def wait_count(self, n: int) -> None:
        self.wait(lambda c: len(c.messages) >= n, f"{n} messages delivered")


def _subscribe(feed: Feed, start: str | None = None) -> tuple[Collector, Subscription]:
    c = Collector()
    sub = feed.subscribe(c.handler, start)
    c.wait_up()
    return c, sub


def _msgs(tag: str, n: int) -> list[bytes]:
    return [f"{tag}-{i:05d}".encode() for i in range(n)]


# ---- the checks --------------------------------------------------------------------------------


def check_roundtrip(kit: FeedKit) -> None:
    topic = kit.topic()
    pub, sub_feed = kit.open(topic), kit.open(topic)
    try:
        c, _ = _subscribe(sub_feed)
        sent = _msgs("a", 200)
        for m in sent:
            pub.publish(m, key=m[-3:])
        c.wait_count(len(sent))
        assert c.messages == sent, f"{kit.name}: messages arrived out of order or altered"
    finally:
        pub.close()
        sub_feed.close()


def check_fanout(kit: FeedKit) -> None:
    topic = kit.topic()
    feeds = [kit.open(topic) for _ in range(4)]
    try:
        collectors = [_subscribe(f)[0] for f in feeds[1:]]
        sent = _msgs("f", 50)
        for m in sent:
            feeds[0].publish(m)
        for i, c in enumerate(collectors):
            c.wait_count(len(sent))
            assert c.messages == sent, f"{kit.name}: subscriber {i} got {c.messages[:5]}..."
    finally:
        for f in feeds:
            f.close()


def check_per_publisher(kit: FeedKit) -> None:
    topic = kit.topic()
    a, b, s1, s2 = (kit.open(topic) for _ in range(4))
    try:
        c1, _ = _subscribe(s1)
        c2, _ = _subscribe(s2)
        sa, sb = _msgs("A", 300), _msgs("B", 300)

        def send(feed: Feed, msgs: list[bytes]) -> None:
            for m in msgs:
                feed.publish(m)

        t = threading.Thread(target=send, args=(b, sb))
        t.start()
        send(a, sa)
        t.join()
        for c in (c1, c2):
            c.wait_count(600)
            assert [m for m in c.messages if m.startswith(b"A")] == sa, "publisher A reordered"
            assert [m for m in c.messages if m.startswith(b"B")] == sb, "publisher B reordered"
        if type(a).ordering == "total":
            assert c1.messages == c2.messages, (
                f"{kit.name} claims a total order but two subscribers saw different orders"
            )
    finally:
        for f in (a, b, s1, s2):
            f.close()


def check_large(kit: FeedKit) -> None:
    topic = kit.topic()
    pub, sub_feed = kit.open(topic), kit.open(topic)
    try:
        c, _ = _subscribe(sub_feed)
        big = bytes(range(256)) * 1024  # 256 KiB, every byte value
        pub.publish(big)
        c.wait_count(1)
        assert c.messages[0] == big, f"{kit.name}: a 256 KiB message arrived altered"
    finally:
        pub.close()
        sub_feed.close()


def check_closed(kit: FeedKit) -> None:
    topic = kit.topic()
    pub, f1, f2 = kit.open(topic), kit.open(topic), kit.open(topic)
    try:
        c1, s1 = _subscribe(f1)
        c2, _ = _subscribe(f2)
        pub.publish(b"before")
        c1.wait_count(1)
        c2.wait_count(1)
        s1.close()
        s1.close()  # idempotent
        pub.publish(b"after")
        c2.wait_count(2)  # the open one got it, so the closed one had its chance too
        assert c1.messages == [b"before"], f"{kit.name}: a closed subscription got {c1.messages}"
    finally:
        for f in (pub, f1, f2):
            f.close()


def check_positions(kit: FeedKit) -> None:
    topic = kit.topic()
    pub = kit.open(topic)
    try:
        if not type(pub).durable:
            try:
                pub.subscribe(Collector().handler, BEGINNING)
            except ConfigurationError:
                return
            raise AssertionError(f"{kit.name} keeps nothing but accepted subscribe(start=...)")
        assert pub.position() is None, f"{kit.name}: an empty topic has position {pub.position()}"
        sent = _msgs("p", 10)
        for m in sent[:6]:
            pub.publish(m)
        mid = pub.position()
        assert mid is not None, f"{kit.name}: no position after 6 confirmed messages"
        for m in sent[6:]:
            pub.publish(m)
        reader = kit.open(topic)
        try:
            c, s = _subscribe(reader, mid)
            c.wait_count(4)
            assert c.messages[:4] == sent[6:], f"{kit.name}: from {mid} got {c.messages}"
            s.close()
            c_all, s_all = _subscribe(reader, BEGINNING)
            c_all.wait_count(10)
            assert c_all.messages[:10] == sent, f"{kit.name}: BEGINNING gave {c_all.messages}"
            # The last delivered position resumes with nothing repeated.
            last = c_all.positions[5]
            assert last is not None, f"{kit.name}: a durable feed delivered no position"
            s_all.close()
            c_tail, _ = _subscribe(reader, last)
            c_tail.wait_count(4)
            assert c_tail.messages[:4] == sent[6:], f"{kit.name}: resume from a delivered position"
        finally:
            reader.close()
    finally:
        pub.close()


def check_restart(kit: FeedKit) -> None:
    if kit.restart is None:
        raise AssertionError(f"{kit.name}: this kit cannot restart its broker")
    topic = kit.topic()
    pub, sub_feed = kit.open(topic), kit.open(topic)
    durable = type(pub).durable
    try:
        c, _ = _subscribe(sub_feed)
        pub.publish(b"one")
        c.wait_count(1)
        kit.restart()
        c.wait(lambda c: c.downs >= 1, "on_down after the broker restarted")
        c.wait_up(2)
        assert c.ups[-1] is durable, (
            f"{kit.name}: after a restart on_up(resumed={c.ups[-1]}), expected {durable}"
        )
        deadline = time.monotonic() + WAIT
        while True:  # the publisher reconnects on its own; a refusal in between is loud
            try:
                pub.publish(b"two")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # reconnect back-off of the publishing side, not a data wait
        c.wait(lambda c: b"two" in c.messages, "a message published after the restart")
    finally:
        pub.close()
        sub_feed.close()


def check_compaction(kit: FeedKit) -> None:
    topic = kit.topic()
    pub = kit.open(topic)
    try:
        if not type(pub).compacted:
            return
        for round_ in range(3):
            for k in (b"x", b"y", b"z"):
                pub.publish(k + b"=" + str(round_).encode(), key=k)
        pub.publish(b"x=last", key=b"x")
        reader = kit.open(topic)
        try:
            c, _ = _subscribe(reader, BEGINNING)
            c.wait(lambda c: b"x=last" in c.messages, "the newest message of key x")
            newest: dict[bytes, bytes] = {}
            for m in c.messages:
                newest[m[:1]] = m
            assert newest == {b"x": b"x=last", b"y": b"y=2", b"z": b"z=2"}, (
                f"{kit.name}: replay gave {newest}"
            )
        finally:
            reader.close()
    finally:
        pub.close()


CHECKS: dict[str, Callable[[FeedKit], None]] = {
    "roundtrip": check_roundtrip,
    "fanout": check_fanout,
    "per_publisher": check_per_publisher,
    "large": check_large,
    "closed": check_closed,
    "positions": check_positions,
    "restart": check_restart,
    "compaction": check_compaction,
}
