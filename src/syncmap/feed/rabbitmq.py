"""``amqp://`` and ``amqps://`` feed: RabbitMQ through pika, one fanout exchange per map.

Topology.  Every server declares exactly the same things, so no declaration ever conflicts:

* the exchange ``topic``: fanout, not durable, auto-delete.  RabbitMQ deletes it when its last
  queue goes, so dropped maps and test topics leave nothing behind.  A publisher that finds it gone
  (``404``) declares it again and sends again: a 404 means the message reached no queue, so the
  second send cannot duplicate it.
* one queue per subscription: server-named, exclusive, auto-delete, bound to the exchange and
  consumed with ``auto_ack``.  It lives and dies with its connection, so what is published while a
  subscriber is disconnected is lost to it: every (re)connect says ``on_up(False)`` and the map
  repairs.  Manual acks would buy nothing: unacked messages die with the exclusive queue too.  A
  slow subscriber's backlog waits in its queue on the broker (RabbitMQ's memory limits apply).

Threads.  pika's ``BlockingConnection`` is not thread-safe, so each connection has one thread:

* Publishing: one connection per feed object, in confirm mode, owned by a publisher thread.
  ``publish()`` queues the message and waits ``timeout`` for the thread to say it was confirmed.
  Why not a lock around ``basic_publish`` in the caller's thread: a confirm-mode channel waits for
  the broker's ack with no time limit, so only a caller that is not the one waiting can give up.
  The thread marks a message ``SENDING``, under a lock, just before ``basic_publish``; a caller that
  gives up before that withdraws it (:class:`FeedUnavailable`: nothing was sent), after that it
  raises :class:`PublishOutcomeUnknown`.
* ``confirm=False``: the same queue and channel (so order with confirmed messages is kept), the
  caller just does not wait.  The thread still waits for each confirm, so one feed publishes about
  one message per round trip.  A failure is logged and counted in ``unconfirmed_failures``.
* Idle publisher: every ``heartbeat/4`` s (at most 1 s) the thread runs the connection's I/O, which
  answers heartbeats and notices a close, FIN or RST.  It runs it once more just before each send.
  A connection found dead then is replaced and the message sent on the new one: the one transparent
  reconnect, safe because nothing was sent on the dead one.  Once ``basic_publish`` has been called
  a failure is ``PublishOutcomeUnknown``, never a second send.
* Subscribing: one thread and one connection per subscription, so closing one touches no other.

Half-open connections are found by AMQP heartbeats (``HEARTBEAT`` s unless the URL says
``?heartbeat=N``; ``0`` turns them off).  pika checks every ``heartbeat + 5`` s that some byte
arrived, so a stalled connection is dropped ``heartbeat + 5`` to ``2 * (heartbeat + 5)`` s after it
stalls (10-20 s by default).  A publish waiting on such a connection has long since raised
``PublishOutcomeUnknown`` (after ``timeout``); the thread is free again once the check drops it.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pika
import pika.exceptions

from ..errors import ConfigurationError, FeedError
from .base import Feed, FeedHandler, FeedUnavailable, PublishOutcomeUnknown, Subscription, redact

log = logging.getLogger("syncmap.feed")

HEARTBEAT = 5
"""AMQP heartbeat (seconds) when the URL sets none: finds a half-open connection in 10-20 s."""
MAX_QUEUED = 10_000
"""Messages waiting for the publisher thread; beyond that ``publish`` raises FeedUnavailable."""
BACKOFF_MIN, BACKOFF_MAX = 0.05, 1.0
"""A subscription reconnects after ``BACKOFF_MIN`` s, doubling to ``BACKOFF_MAX`` s."""
_NOT_FOUND = 404  # AMQP reply code: the exchange does not exist (auto-deleted)
_ERRORS = (pika.exceptions.AMQPError, OSError)


class RabbitMQFeed(Feed):
    scheme = "amqp"
    durable = False
    ordering = "per-publisher"  # one channel per publisher; publishers interleave differently
    extra = "amqp"

    def __init__(self, url: str, topic: str, *, timeout: float = 5.0) -> None:
        super().__init__(url, topic, timeout=timeout)
        check_exchange_name(topic)
        self._parameters("check")  # a malformed URL fails here, not at the first publish
        self._lock = threading.Lock()
        self._publisher: _Publisher | None = None
        self._subs: list[_Consumer] = []
        self._closed = False

    def publish(self, payload: bytes, key: bytes | None = None, *, confirm: bool = True) -> None:
        """Send ``payload`` (``key`` is unused: a fanout exchange keeps nothing to compact)."""
        with self._lock:
            if self._closed:
                raise FeedUnavailable(f"the feed {self.topic} on {self.describe()} is closed")
            if self._publisher is None:
                self._publisher = _Publisher(self)
            publisher = self._publisher
        publisher.publish(_Outgoing(payload, confirm))

    def subscribe(self, handler: FeedHandler, start: str | None = None) -> Subscription:
        """Deliver to ``handler``.  Returns once the queue is bound (or the first attempt failed:
        the subscription then keeps trying, and ``on_up`` says when it is live)."""
        self._no_start(start)
        sub = _Consumer(self, handler)
        with self._lock:
            if self._closed:
                raise FeedUnavailable(f"the feed {self.topic} on {self.describe()} is closed")
            self._subs.append(sub)
        sub.start()
        return sub

    @property
    def unconfirmed_failures(self) -> int:
        """``publish(confirm=False)`` messages that failed after ``publish`` returned."""
        return 0 if self._publisher is None else self._publisher.failures

    def close(self) -> None:
        with self._lock:
            self._closed = True
            subs, self._subs = self._subs, []
            publisher = self._publisher
        for sub in subs:  # signal every thread first, so they wind down together
            sub.stop()
        if publisher is not None:
            publisher.stop()
        for sub in subs:
            sub.join()
        if publisher is not None:
            publisher.join()

    def _forget(self, sub: _Consumer) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._subs.remove(sub)

    # ---- helpers both sides use -----------------------------------------------------------------

    def _parameters(self, role: str) -> Any:
        return pika_parameters(self.url, self.topic, self.timeout, role)

    def _connect(self, role: str) -> Any:
        """A new ``BlockingConnection``; its failure as a FeedUnavailable that says what to do."""
        where = f"RabbitMQ at {self.describe()}"
        try:
            return pika.BlockingConnection(self._parameters(role))
        except (
            pika.exceptions.ProbableAuthenticationError,
            pika.exceptions.AuthenticationError,
        ) as e:
            raise FeedUnavailable(f"{where} refused the user and password: fix the URL") from e
        except pika.exceptions.ProbableAccessDeniedError as e:
            raise FeedUnavailable(
                f"{where} refused access to the virtual host: check the user's permissions"
            ) from e
        except _ERRORS as e:
            raise FeedUnavailable(f"{where} is unreachable ({e!r}): start it or fix the URL") from e

    def _declare(self, channel: Any) -> None:
        """Declare the exchange, the same way on every server (see the module docstring)."""
        try:
            channel.exchange_declare(
                self.topic, exchange_type="fanout", durable=False, auto_delete=True
            )
        except pika.exceptions.ChannelClosedByBroker as exc:
            raise FeedUnavailable(
                f"RabbitMQ at {self.describe()} refused to declare the exchange {self.topic!r} "
                f"({exc.reply_code} {exc.reply_text}); syncmap needs a fanout, non-durable, "
                "auto-delete exchange: delete one made otherwise, or grant 'configure' on it"
            ) from exc


def check_exchange_name(topic: str) -> None:
    """RabbitMQ's rules for an exchange name (shared with the asyncio feed)."""
    if topic.startswith("amq.") or len(topic.encode()) > 255:
        raise ConfigurationError(
            f"RabbitMQ exchange name {topic!r} is not allowed: it must not start with 'amq.' "
            "and must be at most 255 bytes; use a shorter map name or namespace"
        )


def pika_parameters(url: str, topic: str, timeout: float, role: str) -> Any:
    """pika's parameters for one connection: the URL's, with our defaults where it sets none
    (the asyncio feed reads its heartbeat here too, and fails on the same malformed URLs).

    Bounded connecting (``timeout``) makes an unreachable broker a prompt error, and a blocked
    connection (broker resource alarm) is torn down after ``timeout`` instead of hanging."""
    try:
        params = pika.URLParameters(url)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"bad RabbitMQ URL {redact(url)!r}: {exc}") from exc
    given = parse_qs(urlsplit(url).query)
    defaults: dict[str, object] = {
        "heartbeat": HEARTBEAT,
        "socket_timeout": timeout,
        "stack_timeout": timeout,
        "blocked_connection_timeout": timeout,
        "client_properties": {"connection_name": f"syncmap {role} {topic}"},
    }
    for name, value in defaults.items():
        if name not in given:
            setattr(params, name, value)
    return params


def give_up_error(state: _State, where: str, timeout: float) -> FeedError | None:
    """What a caller whose ``timeout`` ran out is told, by how far its message got (``None``: it
    is done, its own error stands).  Shared by the thread and asyncio publishers."""
    if state is _State.QUEUED:
        return FeedUnavailable(
            f"could not publish on {where} within {timeout} s: the publishing connection is "
            "reconnecting or stuck; nothing was sent"
        )
    if state is _State.SENDING:
        return PublishOutcomeUnknown(
            f"RabbitMQ at {where} did not confirm a message within {timeout} s: it may or may "
            "not be delivered"
        )
    return None


# ---- publishing ---------------------------------------------------------------------------------


class _State(enum.Enum):
    QUEUED = "queued"  # nothing sent yet; the caller may withdraw it
    WITHDRAWN = "withdrawn"  # the caller gave up before it was sent: never send it
    SENDING = "sending"  # basic_publish was called: the outcome is the broker's to tell
    DONE = "done"


@dataclass(slots=True, eq=False)
class _Outgoing:
    payload: bytes
    confirm: bool
    state: _State = _State.QUEUED
    error: FeedError | None = None
    done: threading.Event = field(default_factory=threading.Event)


class _Publisher:
    """The feed's publishing connection and the one thread that uses it."""

    def __init__(self, feed: RabbitMQFeed) -> None:
        self.feed = feed
        self.failures = 0
        self._queue: queue.Queue[_Outgoing | None] = queue.Queue(MAX_QUEUED)
        self._lock = threading.Lock()  # guards every _Outgoing.state
        self._closing = threading.Event()
        self._last_try = False  # a connection was tried since close() (thread-only)
        self._conn: Any = None
        self._channel: Any = None
        # Idle, the thread runs the connection's I/O four times per heartbeat (at most once a
        # second; ?heartbeat=0 turns heartbeats off and leaves the 1 s check for a closed socket).
        heartbeat = feed._parameters("check").heartbeat or 4.0
        self._idle_poll = min(1.0, max(0.05, heartbeat / 4))
        self._thread = threading.Thread(
            target=self._run, name=f"syncmap-amqp-publish-{feed.topic}", daemon=True
        )
        self._thread.start()

    def publish(self, item: _Outgoing) -> None:
        deadline = time.monotonic() + self.feed.timeout
        try:
            if item.confirm:
                self._queue.put(item, timeout=self.feed.timeout)
            else:
                self._queue.put_nowait(item)
        except queue.Full:
            raise FeedUnavailable(
                f"{MAX_QUEUED} messages are waiting to be published on {self.feed.describe()}: "
                "the broker is slow or unreachable; nothing was sent"
            ) from None
        if not item.confirm:
            return
        if not item.done.wait(max(0.0, deadline - time.monotonic())):
            self._give_up(item)
        if item.error is not None:
            raise item.error

    def _give_up(self, item: _Outgoing) -> None:
        """The caller's ``timeout`` ran out: withdraw the message, or say its fate is unknown."""
        with self._lock:
            error = give_up_error(item.state, self.feed.describe(), self.feed.timeout)
            if item.state is _State.QUEUED:
                item.state = _State.WITHDRAWN
        if error is not None:
            raise error
        # DONE between the wait's timeout and the lock: the caller reads item.error.

    def stop(self) -> None:
        self._closing.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)  # wakes the thread once what is queued before is sent

    def join(self) -> None:
        if self._thread is not threading.current_thread():
            self._thread.join(self.feed.timeout)

    def _run(self) -> None:
        try:
            while True:
                try:
                    item = self._queue.get(timeout=self._idle_poll)
                except queue.Empty:
                    if self._closing.is_set():
                        break
                    self._idle()
                    continue
                if item is None:
                    break
                self._handle(item)
        finally:
            self._disconnect()
            self._fail_rest()

    def _handle(self, item: _Outgoing) -> None:
        try:
            if self._withdrawn(item):
                return
            self._ensure_channel()  # may connect: the caller may give up meanwhile
            if self._withdrawn(item, else_mark=_State.SENDING):
                return
            self._send(item.payload)
            error = None
        except FeedError as exc:
            error = exc
        except Exception as exc:  # the thread must not die: anything else is a lost connection
            self._disconnect()
            error = PublishOutcomeUnknown(f"publishing on {self.feed.describe()} failed: {exc!r}")
        with self._lock:
            item.state, item.error = _State.DONE, error
        item.done.set()
        if error is not None and not item.confirm:
            self.failures += 1
            if self.failures == 1 or self.failures % 1000 == 0:
                log.warning("unconfirmed publish failed (%d so far): %s", self.failures, error)

    def _withdrawn(self, item: _Outgoing, else_mark: _State | None = None) -> bool:
        """Has the caller given up on ``item``?  If not, mark it ``else_mark`` (under the lock, so
        the caller's ``_give_up`` sees either the old state or the new one, never in between)."""
        with self._lock:
            if item.state is _State.WITHDRAWN:
                return True
            if else_mark is not None:
                item.state = else_mark
            return False

    def _idle(self) -> None:
        """Answer heartbeats, and notice a connection the broker or the network closed."""
        if self._conn is None:
            return
        try:
            self._conn.process_data_events(0)
        except Exception as exc:
            log.info("idle publishing connection to %s lost (%r)", self.feed.describe(), exc)
            self._disconnect()  # the next publish connects again

    def _ensure_channel(self) -> None:
        """An open confirm-mode channel with the exchange declared; nothing is sent here."""
        if self._conn is not None:
            try:
                # Reads what arrived since the last send: a Close, a FIN, an RST.  Found now, a dead
                # connection costs nothing; found inside basic_publish it costs an unknown outcome.
                self._conn.process_data_events(0)
                if self._channel.is_open:
                    return
            except Exception as exc:
                log.info("publishing connection to %s lost (%r)", self.feed.describe(), exc)
            self._disconnect()
        # close() still sends what was queued before it, but tries one connection for it at most:
        # a thread left draining thousands of messages into a dead broker would never end.
        if self._closing.is_set():
            if self._last_try:
                raise FeedUnavailable(f"the feed on {self.feed.describe()} closed; not sent")
            self._last_try = True
        self._conn = self.feed._connect("publisher")
        self._open_channel()

    def _open_channel(self) -> None:
        try:
            channel = self._conn.channel()
            channel.confirm_delivery()
            self.feed._declare(channel)
        except FeedError:
            self._disconnect()
            raise
        except _ERRORS as exc:
            self._disconnect()
            raise FeedUnavailable(f"RabbitMQ at {self.feed.describe()}: {exc!r}") from exc
        self._channel = channel

    def _send(self, payload: bytes) -> None:
        """``basic_publish`` and wait for the confirm; at most one resend, after a 404."""
        for attempt in (1, 2):
            try:
                self._channel.basic_publish(self.feed.topic, "", payload)
                return
            except pika.exceptions.NackError as exc:
                raise FeedUnavailable(
                    f"RabbitMQ at {self.feed.describe()} refused the message (nack): not delivered"
                ) from exc
            except pika.exceptions.ChannelClosedByBroker as exc:
                # A channel error answers this publish (the only one in flight): it was routed
                # nowhere.  404: the last subscriber left and took the auto-delete exchange along.
                if exc.reply_code == _NOT_FOUND and attempt == 1:
                    self._open_channel()
                    continue
                raise FeedUnavailable(
                    f"RabbitMQ at {self.feed.describe()} refused the message on {self.feed.topic!r}"
                    f" ({exc.reply_code} {exc.reply_text}): not delivered"
                ) from exc
            except Exception as exc:
                self._disconnect()
                raise PublishOutcomeUnknown(
                    f"the connection to RabbitMQ at {self.feed.describe()} failed after a message "
                    f"was sent, before its confirm ({exc!r}): it may or may not be delivered"
                ) from exc

    def _disconnect(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        _close_quietly(conn)

    def _fail_rest(self) -> None:
        """Wake callers whose messages can no longer be sent (the thread is ending)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                with self._lock:
                    item.state = _State.DONE
                    item.error = FeedUnavailable(f"the feed on {self.feed.describe()} closed")
                item.done.set()
                if not item.confirm:
                    self.failures += 1


# ---- subscribing --------------------------------------------------------------------------------


class _ConsumerCancelled(Exception):
    """The broker cancelled our consumer (its queue was deleted): rebuild like a lost connection."""


class _Consumer(Subscription):
    """One subscription: a thread that (re)connects, binds a fresh queue and delivers."""

    def __init__(self, feed: RabbitMQFeed, handler: FeedHandler) -> None:
        self._feed, self._handler = feed, handler
        self._stop = threading.Event()
        self._first_attempt = threading.Event()
        self._lock = threading.Lock()  # guards _conn, read by close() from another thread
        self._conn: Any = None
        self._went_up = False  # the current connection was bound and on_up said (thread-only)
        self._thread = threading.Thread(
            target=self._run, name=f"syncmap-amqp-subscribe-{feed.topic}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        self._first_attempt.wait(self._feed.timeout)

    def close(self) -> None:
        self.stop()
        self.join()
        self._feed._forget(self)

    def stop(self) -> None:
        # Order against _session: stop is set before _conn is read here, and _session stores
        # _conn before it checks stop.  So either this wakes the connection it waits on, or
        # _session sees stop before it waits at all.
        self._stop.set()
        with self._lock:
            conn = self._conn
        if conn is not None:
            with contextlib.suppress(Exception):  # closed meanwhile: its thread is leaving anyway
                conn.add_callback_threadsafe(_nothing)

    def join(self) -> None:
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self._feed.timeout)

    def _run(self) -> None:
        delay, quiet = BACKOFF_MIN, False
        while not self._stop.is_set():
            self._went_up = False
            try:
                self._session()
            except Exception as exc:  # never let the thread die: every failure is a lost connection
                # Loud when a live subscription is lost or a first attempt fails; then quiet
                # until it has been up again, so a broker that stays down logs once.
                log.log(logging.DEBUG if quiet and not self._went_up else logging.WARNING,
                        "subscription to %s on %s: %s; reconnecting",
                        self._feed.topic, self._feed.describe(), exc)  # fmt: skip
                quiet = True
            finally:
                self._first_attempt.set()
            if self._went_up:
                delay = BACKOFF_MIN
            self._stop.wait(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    def _session(self) -> None:
        """One connection's life: returns when stopped, raises when the connection is lost."""
        conn = self._feed._connect("subscriber")
        try:
            with self._lock:
                self._conn = conn
            channel = conn.channel()
            self._feed._declare(channel)
            queue_name = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
            channel.queue_bind(queue_name, self._feed.topic)
            channel.basic_consume(queue_name, self._deliver, auto_ack=True)
            # Bound: whatever is published from here on reaches the queue, so on_up is true now,
            # and it comes before start() returns (the first time) so subscribe() means "live".
            self._went_up = True
            self._call(self._handler.on_up, False)
            self._first_attempt.set()
            while not self._stop.is_set():
                conn.process_data_events(time_limit=None)  # stop() wakes it
                if not channel.consumer_tags:
                    raise _ConsumerCancelled("the broker cancelled the consumer (queue deleted)")
        finally:
            if self._went_up:  # first: closing a connection that is still open takes round trips
                self._call(self._handler.on_down)
            with self._lock:
                self._conn = None
            _close_quietly(conn)

    def _deliver(self, _channel: Any, _method: Any, _properties: Any, body: bytes) -> None:
        self._call(self._handler.on_message, body, None)

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        """Run a handler callback; after close() nothing more is told, and a raise is logged."""
        if self._stop.is_set():
            return
        try:
            callback(*args)
        except Exception:
            log.exception("a handler of %s on %s raised; the subscription goes on",
                          self._feed.topic, self._feed.describe())  # fmt: skip


def _nothing() -> None:
    """Runs on a consumer's connection thread only to wake it (see ``_Consumer.stop``)."""


def _close_quietly(conn: Any) -> None:
    """Close a connection that may already be closed or broken; errors mean it is gone anyway."""
    if conn is not None and conn.is_open:
        with contextlib.suppress(Exception):
            conn.close()
