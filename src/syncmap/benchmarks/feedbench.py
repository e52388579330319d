"""Feeds: what syncmap adds on top of each broker, every feed in one run.

For every feed (the store's Redis pub/sub and Stream, RabbitMQ, NATS, JetStream, Kafka: see
``brokers.py`` for which broker each runs against):

* **Propagation** (:mod:`.propagation`'s segments and receivers): syncmap store mode,
  ``SyncMap(name, url=<the Redis>, feed=<feed>)`` subscribed ``inline=True`` in N receiver
  processes, against the feed's own client with no map: ``open_feed(url, topic)``, publishing
  with ``confirm=False`` (as syncmap's relay does) to a ``FeedHandler`` in each of N processes.
  Both in the same interleaved rounds, at every N; the raw figure at 1 receiver is the broker's
  one-way delay through that client.
* **Store-mode writes**: ``m[k] = v`` with that feed, one writer, against the same on the default
  route (Redis pub/sub, published inside the write script), interleaved.
* **Replicated-mode writes**: ``ReplicatedMap(name, feed, snapshot={})``, whose every write waits
  for the broker's confirm, against the feed's own ``publish(confirm=True)`` of a message of about
  the same size, on a topic the same feed object subscribes to (the map also hears its own writes).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .. import MapConfig, ReplicatedMap, SyncMap, SyncMapError
from ..feed.base import Feed, FeedHandler, feed_class, open_feed
from . import brokers, feedreport
from .brokers import Broker
from .context import Bench
from .method import Row, Section, interleave, loop_call, loop_store
from .propagation import Contender, PropagationPlan, map_contender, measure, receiver
from .workers import Pool

KEYS = [f"key-{i:04d}" for i in range(1000)]
RAW_PAYLOAD = 64  # bytes: about a replicated map's message for a short key and an int value
KAFKA_FETCH_WAIT_MS = 10  # KafkaFeed's consumer default (feed/kafka.py)
ERRORS = (SyncMapError, ImportError, OSError)


@dataclass(frozen=True, slots=True)
class FeedPlan:
    delays: PropagationPlan
    write_rounds: int  # interleaved rounds of the write-throughput pairs
    store_ops: int  # store-mode writes per timed block
    replica_ops: int  # replicated-mode writes per timed block


def run(b: Bench, plan: FeedPlan, feeds: Sequence[str | None] | None) -> Section:
    """The ``feeds`` section; ``feeds`` None: the defaults, starting brokers where needed (and
    stopping them when it ends)."""
    with contextlib.ExitStack() as stack:
        found = brokers.provide(b, feeds, stack)
        live = [x for x in found if not x.absent]
        try:
            delays, absent = _delays(b, plan.delays, live)
            store = _store_writes(b, plan, live)
            replicated = _replicated_writes(b, plan, live)
        finally:
            brokers.drop_streams([x.feed for x in live if not x.started], b.ns)
    return feedreport.section(found, plan.delays.receivers, delays, absent, store, replicated,
                              _notes(found, plan))  # fmt: skip


# ---- propagation: syncmap's map against the feed's own client --------------------------------


def _delays(b: Bench, plan: PropagationPlan, live: Sequence[Broker]
            ) -> tuple[dict[str, tuple[Contender, Contender]], dict[str, str]]:  # fmt: skip
    """Per feed label: (syncmap's contender, the raw feed's) after their segments; and why a
    contender could not run, by contender name."""
    pairs: dict[str, tuple[Contender, Contender]] = {}
    absent: dict[str, str] = {}
    for i, x in enumerate(live):
        mine = map_contender(b, x.label, f"feeds-{i}", x.feed)
        raw = _raw_contender(b, x, i)
        for c, name in ((mine, x.label), (raw, feedreport.raw_name(x.label))):
            if isinstance(c, str):
                absent[name] = c
        if isinstance(mine, Contender) and isinstance(raw, Contender):
            pairs[x.label] = (mine, raw)
    if pairs:
        pool = Pool.start(receiver, max(plan.receivers), (b.url, b.ns))
        try:
            measure(pool, [c for pair in pairs.values() for c in pair], plan, absent)
        finally:
            pool.stop()
    return pairs, absent


def _raw_contender(b: Bench, x: Broker, i: int) -> Contender | str:
    topic = feed_class(x.url).topic_for(b.ns, f"feeds-raw-{i}")
    writer = functools.partial(_feed_writer, x.url, topic)
    try:
        with writer():
            pass
    except ERRORS as exc:
        return f"not available: {type(exc).__name__}: {exc}"
    return Contender(feedreport.raw_name(x.label), ("open", "feed", x.url, topic), writer)


@contextlib.contextmanager
def _feed_writer(url: str, topic: str) -> Iterator[Callable[[int], Any]]:
    """The raw writer.  One confirmed publish first (before any receiver listens): a feed client
    connects its publisher on first use, as syncmap's map has done by the time it is open."""
    feed = open_feed(url, topic)
    try:
        feed.publish(b"warm-up", confirm=True)
        yield lambda i: feed.publish(str(i).encode(), confirm=False)
    finally:
        feed.close()


# ---- write throughput ------------------------------------------------------------------------


def _rate(ns_per_op: float) -> float:
    return 1e9 / ns_per_op


def _quiet(count: Callable[[], int], quiet: float = 0.02, limit: float = 10.0) -> None:
    """Wait (untimed) until ``count()`` stops moving: the echoes of a block's writes are handled."""
    deadline, last = time.monotonic() + limit, count()
    while time.monotonic() < deadline:
        time.sleep(quiet)
        if (now := count()) == last:
            return
        last = now


class _Echo:
    """The replicated peer: the feed's own client publishing confirmed, hearing its messages."""

    def __init__(self, url: str, topic: str) -> None:
        self.feed: Feed = open_feed(url, topic)
        self.heard = 0
        self.payload = b"x" * RAW_PAYLOAD
        try:
            self.feed.subscribe(FeedHandler(self._on_message))
        except BaseException:
            self.feed.close()
            raise

    def _on_message(self, payload: bytes, position: str | None) -> None:
        self.heard += 1

    def publish(self, key: str) -> None:
        self.feed.publish(self.payload, key.encode(), confirm=True)


_Writer = SyncMap | ReplicatedMap | _Echo


def _store_writes(b: Bench, plan: FeedPlan, live: Sequence[Broker]) -> dict[str, Row]:
    """Per feed: ``m[k] = v`` with it against the default route, each feed with its own pairs."""
    cfg = MapConfig(namespace=b.ns, presence=False)
    base = SyncMap("feeds-w-base", url=b.url, config=cfg)
    rows: dict[str, Row] = {}
    samples: list[float] = []
    try:
        for i, x in enumerate(live):
            if x.feed is None:
                continue
            try:
                m = SyncMap(f"feeds-w-{i}", url=b.url, feed=x.feed, config=cfg)
            except ERRORS as exc:
                rows[x.label] = feedreport.store_row(x.label, [], [], f"not available: {exc}")
                continue
            try:
                s = _pair(plan, base, m, plan.store_ops)
            finally:
                m.close()
            samples += s["base"]
            rows[x.label] = feedreport.store_row(x.label, s["mine"], s["base"])
    finally:
        base.close()
    if samples and live and live[0].feed is None:
        rows[live[0].label] = feedreport.store_row(live[0].label, samples, [])
    return rows


def _pair(plan: FeedPlan, base: _Writer, mine: _Writer, ops: int) -> dict[str, list[float]]:
    """``mine`` against ``base`` in interleaved rounds of ``ops`` writes (``m[k] = v`` or a
    confirmed publish) each; after each block, (untimed) until its echoes are handled."""
    heard = {"base": _heard(base), "mine": _heard(mine)}
    return interleave([("base", _block(base, ops)), ("mine", _block(mine, ops))],
                      plan.write_rounds, after=lambda name: _quiet(heard[name]))  # fmt: skip


def _block(w: _Writer, ops: int) -> Callable[[], float]:
    if isinstance(w, _Echo):
        return lambda: _rate(loop_call(w.publish, KEYS, ops))
    return lambda: _rate(loop_store(w.__setitem__, KEYS, 12345, ops))


def _heard(w: _Writer) -> Callable[[], int]:
    return (lambda: w.heard) if isinstance(w, _Echo) else (lambda: w.statistics().messages)


def _replicated_writes(b: Bench, plan: FeedPlan, live: Sequence[Broker]) -> dict[str, Row]:
    """Per feed: ``ReplicatedMap`` writes against the feed's own confirmed publish, interleaved."""
    rows: dict[str, Row] = {}
    for i, x in enumerate(live):
        try:
            s = _replicated(b, plan, x, i)
        except ERRORS as exc:
            rows[x.label] = feedreport.replicated_row(x.label, [], [], f"not available: {exc}")
            continue
        rows[x.label] = feedreport.replicated_row(x.label, s["mine"], s["base"])
    return rows


def _replicated(b: Bench, plan: FeedPlan, x: Broker, i: int) -> dict[str, list[float]]:
    m = ReplicatedMap(f"feeds-r-{i}", x.url, config=MapConfig(namespace=b.ns), snapshot={})
    try:
        echo = _Echo(x.url, feed_class(x.url).topic_for(b.ns, f"feeds-rraw-{i}"))
        try:
            return _pair(plan, echo, m, plan.replica_ops)
        finally:
            echo.feed.close()
    finally:
        m.close()


def _notes(found: Sequence[Broker], plan: FeedPlan) -> list[str]:
    notes = feedreport.notes(plan.delays.writes, plan.store_ops, plan.replica_ops, RAW_PAYLOAD)
    for x in found:
        if x.label == "kafka" and not x.absent:
            wait = parse_qs(urlsplit(x.url).query).get("fetch.wait.max.ms", [""])[-1]
            notes.append(feedreport.kafka_note(wait or f"{KAFKA_FETCH_WAIT_MS} (the default)"))
    return notes
