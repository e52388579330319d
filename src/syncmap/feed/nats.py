"""``nats://`` (core NATS; ``tls://`` too) and ``nats+jetstream://`` feeds, on nats-py.

nats-py is asyncio-only, so every call runs on the process's one event loop (``aioloop.py``) and
the synchronous methods wait for it; handlers run on one :class:`~.aioloop.Dispatcher` thread per
subscription.  Each feed object has its own connection, which nats-py re-opens on its own
(forever, every ``RECONNECT_WAIT`` s); the connection's callbacks tell the subscriptions.

**Core NATS** (:class:`NatsFeed`) keeps nothing: a subscriber that was disconnected has lost what
was published meanwhile, so after a reconnect it hears ``on_up(False)``.  Core NATS has no publish
confirm; ``confirm=True`` makes a PING/PONG round trip after the message, so the call returns once
the server has read it (and passed it to the subscriptions it had then).  Nothing is buffered
across a drop: nats-py would keep publishes made while it reconnects and send them later (or never,
if it gives up); we refuse them instead (:class:`FeedUnavailable`), so the caller knows.

**JetStream** (:class:`JetStreamFeed`): one stream per map, named after the topic, capturing
``<topic>.>``, file storage, ``max_msgs_per_subject=1``:

* a message with a ``key`` goes to ``<topic>.k.<sha256(key), 32 hex>``: the per-subject limit
  keeps the newest message of each key and drops the older ones (compaction);
* a message without one goes to ``<topic>.u.<feed object id>.<counter>``: a subject of its own, so
  the per-subject limit never drops it.  Such messages pile up, so the stream as a whole is bounded
  by ``max_msgs`` (URL ``?max_msgs=``, default 1,000,000; the oldest message goes first, keyed or
  not).  A replicated map with more keys than that needs a larger ``max_msgs``.

One stream rather than one for keyed and one for unkeyed messages: one stream has one sequence,
which is the total order the feed promises and a position that is a single number.

Subscriptions are ordered push consumers made by hand (an ephemeral consumer, no acks, flow
control and heartbeats, delivering to an inbox of ours), not nats-py's ordered consumer, because
after a drop the subscription itself must decide what to tell the map; see
:class:`_StreamSubscription`.

What ``on_up(resumed)`` says on JetStream: ``True`` when every message after the start (the
position asked for, or the last one delivered before a drop) that still matters will be
delivered.  A message dropped by the per-key limit does not matter: a newer message of its key
comes after it and is delivered.  A message dropped by ``max_msgs`` (or by limits an operator set
on the stream) does.  The stream does not say why a message went, so we reason from its state:

* its first sequence is at most ``start + 1``: the limits drop the oldest messages first, so any
  hole after ``start`` is the per-key limit's doing: ``True``;
* otherwise, it never held more than ``max_msgs`` messages (last sequence <= ``max_msgs``, and no
  age or size limit): the limit never dropped anything: ``True``;
* otherwise ``False`` (perhaps nothing was lost; the map repairs anyway: a replicated map asks its
  peers, a store-mode map probes its buckets, so erring this way costs only work);
* a stream that is gone or was made anew (a server restarted with an empty store): ``False``, and
  the subscription starts again from the new stream's first message.

The first ``on_up`` of a subscription answers the same question for the ``start`` it was given
(``True`` for ``start=None``): a replicated map starting from ``BEGINNING`` learns from it whether
the stream still holds its whole (compacted) history.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import hashlib
import itertools
import logging
import threading
import uuid
from abc import abstractmethod
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit, urlunsplit

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.errors import (
    AuthorizationError,
    MaxPayloadError,
    NoRespondersError,
    NotJSMessageError,
    SlowConsumerError,
)
from nats.errors import (
    Error as NatsError,
)
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    Header,
    StorageType,
    StreamConfig,
    StreamInfo,
)
from nats.js.errors import (
    APIError,
    BadRequestError,
    NoStreamResponseError,
    NotFoundError,
    ServiceUnavailableError,
)

from ..errors import ConfigurationError
from . import aioloop
from .base import BEGINNING, Feed, FeedHandler, FeedUnavailable, PublishOutcomeUnknown, Subscription

log = logging.getLogger("syncmap.feed")
T = TypeVar("T")

RECONNECT_WAIT = 0.1
"""Seconds between reconnection attempts (nats-py retries forever)."""
PING_INTERVAL = 2
"""Seconds between client PINGs; two unanswered ones drop the connection (a half-open one is found
within about three intervals, like the Redis subscriber's ``PING_AFTER``)."""
PENDING_MSGS = 65_536
PENDING_BYTES = 64 * 1024 * 1024
"""Per-subscription queue in nats-py, between the socket and the handler.  Beyond it messages are
dropped (a *slow consumer*): core NATS then reports a loss (``on_down``, ``on_up(False)``);
JetStream re-reads from the last message handed over."""
HEARTBEAT = 1.0
"""JetStream consumer idle heartbeat; ``3 * HEARTBEAT`` of silence on a live connection means the
consumer is gone (deleted, or the stream with it) and a new one is made."""
DEFAULT_MAX_MSGS = 1_000_000
_MARGIN = 1.0  # run() waits this much longer than the feed's timeout, which bounds the inner calls
_RETRY_MIN, _RETRY_MAX = 0.05, 1.0  # back-off of a subscription that cannot re-attach yet
_ERR_STREAM_NAME_IN_USE = 10058  # JetStream: the stream exists with another configuration


class _NotConnected(Exception):
    """Raised on the loop when the connection is down: nothing was sent."""


def _token(text: str) -> str:
    """``text`` as one NATS subject token (also a valid stream name): ASCII letters, digits and
    ``-`` stay; every other byte of its UTF-8, ``_`` and ``.`` included, becomes ``_XX``.  Two
    different texts never give the same token, and the empty text gives ``_``."""
    if not text:
        return "_"
    out: list[str] = []
    for ch in text:
        if ch.isascii() and (ch.isalnum() or ch == "-"):
            out.append(ch)
        else:
            out.extend(f"_{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    return "".join(out)


def _check_subject(topic: str) -> str:
    tokens = topic.split(".")
    if not all(tokens) or any(c.isspace() or c in "*>" for c in topic):
        raise ConfigurationError(
            f"NATS topic {topic!r} is not a valid subject (no empty tokens, spaces, '*' or '>'); "
            "make it with topic_for(namespace, name)"
        )
    return topic


class _NatsFeedBase(Feed):
    """One nats-py connection, its callbacks, and the subscriptions they tell."""

    extra = "nats"

    @classmethod
    def topic_for(cls, namespace: str, name: str) -> str:
        return f"{_token(namespace)}.{_token(name)}"

    def __init__(self, url: str, topic: str, *, timeout: float = 5.0) -> None:
        super().__init__(url, topic, timeout=timeout)
        self.subject = _check_subject(topic)
        server = self._parse_url()
        self._lock = threading.Lock()
        self._subs: dict[_LiveSubscription, None] = {}  # an ordered set: told of the connection
        self._owners: dict[NatsSubscription, _LiveSubscription] = {}  # for slow-consumer errors
        self._closing = self._closed = False
        self._last_error: Exception | None = None
        self._refused: str | None = None  # the server's authorization error, if it sent one
        self._nc = Client()
        self._barrier = _Barrier(self._nc)
        try:
            aioloop.run(self._connect(server), timeout + _MARGIN)
        except Exception as exc:
            if self._refused is not None:
                raise ConfigurationError(
                    f"NATS at {self.describe()} refused the connection ({self._refused}): check "
                    "the URL's user and password (or token), and the user's permissions"
                ) from exc
            raise FeedUnavailable(
                f"cannot connect to NATS at {self.describe()} within {timeout} s "
                f"({self._last_error or exc!r}); check that nats-server runs there"
                f"{' with JetStream on (-js)' if self.durable else ''} and the URL's host, port "
                "and credentials"
            ) from exc

    @abstractmethod
    def _parse_url(self) -> str:
        """The URL nats-py connects to (our scheme and options taken off)."""

    async def _connect(self, url: str) -> None:
        # Passed as a dict: nats-py's annotations say int for these durations, its code takes
        # float seconds.
        options: dict[str, Any] = {
            "name": f"syncmap {self.topic}",
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": RECONNECT_WAIT,
            "connect_timeout": self.timeout,
            "ping_interval": PING_INTERVAL,
            "max_outstanding_pings": 2,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }
        try:
            # With unlimited attempts nats-py's connect() never gives up on its own.
            await asyncio.wait_for(self._nc.connect(url, **options), self.timeout)
        except BaseException:
            await self._close_connection()
            raise

    # ---- connection events (on the loop) ---------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = exc
        # While connecting, the refusal is followed by a reset socket: keep the telling one.
        text = str(exc)
        if isinstance(exc, AuthorizationError) or "Authorization Violation" in text:
            self._refused = text
        if isinstance(exc, SlowConsumerError):
            sub = self._owners.get(exc.sub)
            if sub is not None:
                sub.overflowed()
        else:
            log.debug("syncmap NATS connection to %s: %r", self.describe(), exc)

    async def _on_disconnected(self) -> None:
        if not self._closing:
            for sub in self._live():
                sub.connection_down()

    async def _on_reconnected(self) -> None:
        # nats-py has re-sent every SUB and had a PONG back before calling this (those SUBs
        # were written straight to the socket before the PING): the server knows them again.
        if not self._closing:
            for sub in self._live():
                sub.connection_up()

    def _live(self) -> list[_LiveSubscription]:
        with self._lock:
            return list(self._subs)

    # ---- shared by both feeds ----------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise FeedUnavailable(f"the feed {self.describe()} ({self.topic}) is closed")
        return aioloop.run(coro, self.timeout + _MARGIN)

    def _add(self, sub: _LiveSubscription) -> None:
        with self._lock:
            if self._closing:
                raise FeedUnavailable(f"the feed {self.describe()} ({self.topic}) is closed")
            self._subs[sub] = None

    def _own(self, nats_sub: NatsSubscription, sub: _LiveSubscription) -> None:
        with self._lock:
            self._owners[nats_sub] = sub

    def _disown(self, nats_sub: NatsSubscription) -> None:
        with self._lock:
            self._owners.pop(nats_sub, None)

    def _forget(self, sub: _LiveSubscription) -> None:
        with self._lock:
            self._subs.pop(sub, None)
            for nats_sub in [n for n, s in self._owners.items() if s is sub]:
                del self._owners[nats_sub]

    def close(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
            subs = list(self._subs)
        for sub in subs:
            sub.close()
        self._closed = True  # only now: the subscriptions' close() runs on this connection
        try:
            aioloop.run(self._close_connection(), self.timeout + _MARGIN)
        except Exception as exc:  # best effort: the server drops the socket's interest anyway
            log.debug("syncmap: closing the NATS connection to %s: %r", self.describe(), exc)

    async def _close_connection(self) -> None:
        # close() writes out what is buffered (confirm=False publishes) before closing.
        try:
            await asyncio.wait_for(self._nc.close(), self.timeout)
        except Exception as exc:
            log.debug("syncmap: NATS close: %r", exc)


class _LiveSubscription(Subscription):
    """What the connection callbacks need from a subscription (called on the loop)."""

    @abstractmethod
    def connection_down(self) -> None: ...

    @abstractmethod
    def connection_up(self) -> None: ...

    @abstractmethod
    def overflowed(self) -> None: ...


class _Barrier:
    """A round trip through the server that keeps its place in the connection's output.

    ``flush()`` is not one: nats-py writes its PING to the socket at once but leaves PUB and SUB
    in its buffer for its flusher task, so the PONG can come back before the server has read the
    PUB or SUB we want confirmed.  A message to an inbox of our own goes through that same buffer
    after them, so when the server hands it back it has read everything before it.

    It proves nothing if the connection dropped in between: what was still buffered is sent on the
    next connection, and what was in the old socket may be lost.  So a reconnect meanwhile
    (``stats["reconnects"]`` moved) makes the outcome unknown (``TimeoutError``).
    """

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._subject = ""
        self._waiting: dict[bytes, asyncio.Future[None]] = {}
        self._tokens = itertools.count()

    async def __call__(self, timeout: float) -> None:
        nc = self._nc
        if not self._subject:
            # Set before the first await: a concurrent caller then uses the same inbox, whose
            # SUB is already in the buffer ahead of its message.
            self._subject = nc.new_inbox()
            try:
                await nc.subscribe(self._subject, cb=self._arrived)
            except BaseException:
                self._subject = ""
                raise
        epoch = nc.stats["reconnects"]
        token = str(next(self._tokens)).encode()
        arrived = self._waiting[token] = asyncio.get_running_loop().create_future()
        try:
            await nc.publish(self._subject, token)
            await asyncio.wait_for(arrived, timeout)
        finally:
            del self._waiting[token]
        if nc.stats["reconnects"] != epoch:
            raise TimeoutError("the connection to NATS was re-made meanwhile")

    async def _arrived(self, msg: Msg) -> None:
        waiter = self._waiting.get(msg.data)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


async def _unsubscribe(sub: NatsSubscription | None) -> None:
    if sub is not None:
        try:
            await sub.unsubscribe()
        except NatsError as exc:  # closed connection, or already gone
            log.debug("syncmap: NATS unsubscribe: %r", exc)


def _publish_error(exc: Exception, feed: Feed) -> Exception:
    """The syncmap error for a publish that raised ``exc`` (``raise ... from exc``)."""
    where = f"on {feed.topic} at {feed.describe()}"
    if isinstance(exc, _NotConnected):
        return FeedUnavailable(f"publish {where}: not connected to NATS (reconnecting); not sent")
    if isinstance(exc, MaxPayloadError):
        return FeedUnavailable(
            f"publish {where}: the message is larger than the server's max_payload; not sent"
        )
    if isinstance(exc, TimeoutError):  # also nats.errors.TimeoutError and FlushTimeoutError
        return PublishOutcomeUnknown(
            f"publish {where}: no confirm within {feed.timeout} s; it may or may not be delivered"
        )
    if isinstance(exc, (NoStreamResponseError, ServiceUnavailableError, NoRespondersError)):
        return FeedUnavailable(
            f"publish {where}: JetStream did not take it (no stream, or JetStream not ready "
            "yet); not stored"
        )
    return FeedUnavailable(f"publish {where} failed: {exc!r}")


# ---- core NATS ---------------------------------------------------------------------------------


class NatsFeed(_NatsFeedBase):
    """``nats://host:port`` or ``tls://host:port`` (``user:password@`` as usual): core NATS."""

    scheme = "nats"
    durable = False
    ordering = "per-publisher"  # one connection keeps its order; the server interleaves several

    def _parse_url(self) -> str:
        parts = urlsplit(self.url)
        if parts.query or parts.path not in ("", "/"):
            raise ConfigurationError(f"{self.describe()}: nats:// takes no path or options")
        return urlunsplit((parts.scheme.lower(), parts.netloc, "", "", ""))

    def publish(self, payload: bytes, key: bytes | None = None, *, confirm: bool = True) -> None:
        try:
            self._run(self._publish(payload, confirm))
        except (FeedUnavailable, ConfigurationError):
            raise
        except Exception as exc:
            raise _publish_error(exc, self) from exc

    async def _publish(self, payload: bytes, confirm: bool) -> None:
        nc = self._nc
        # Checked and queued in one step of the loop (no await in between), so the message is
        # either refused here or in the buffer of the connection that is up now.
        if not nc.is_connected:
            raise _NotConnected
        await nc.publish(self.subject, payload)
        if confirm:
            await self._barrier(self.timeout)

    def subscribe(self, handler: FeedHandler, start: str | None = None) -> Subscription:
        self._no_start(start)
        sub = _CoreSubscription(self, handler)
        self._add(sub)
        try:
            self._run(sub.open())
        except Exception as exc:
            sub.close()
            if isinstance(exc, FeedUnavailable):
                raise
            why = (
                "not connected to NATS (reconnecting)"
                if isinstance(exc, _NotConnected)
                else repr(exc)
            )
            raise FeedUnavailable(f"subscribe to {self.topic} at {self.describe()}: {why}") from exc
        return sub


class _CoreSubscription(_LiveSubscription):
    def __init__(self, feed: NatsFeed, handler: FeedHandler) -> None:
        self._feed, self._handler = feed, handler
        self._dispatch = aioloop.Dispatcher(f"syncmap-nats-{feed.topic}")
        self._sub: NatsSubscription | None = None
        self._down = False
        self._loss_reported = False

    async def open(self) -> None:
        nc = self._feed._nc
        if not nc.is_connected:
            raise _NotConnected
        ready = asyncio.Event()

        async def on_msg(msg: Msg) -> None:
            # A message can arrive before the barrier below returns (published by someone else
            # just after our SUB reached the server): hold it until on_up is queued, so on_up
            # comes first.
            await ready.wait()
            await self._dispatch.call(self._handler.on_message, msg.data, None)

        self._sub = await nc.subscribe(
            self._feed.subject,
            cb=on_msg,
            pending_msgs_limit=PENDING_MSGS,
            pending_bytes_limit=PENDING_BYTES,
        )
        self._feed._own(self._sub, self)
        # Order: SUB -> barrier back (the server has the SUB) -> on_up -> subscribe() returns;
        # a message published after that is delivered.
        await self._feed._barrier(self._feed.timeout)
        self._dispatch.submit(self._handler.on_up, False)
        ready.set()

    def connection_down(self) -> None:
        if not self._down:
            self._down = True
            self._dispatch.submit(self._handler.on_down)

    def connection_up(self) -> None:
        if self._down:
            self._down = False
            self._dispatch.submit(self._handler.on_up, False)

    def overflowed(self) -> None:
        # nats-py dropped a message: tell the map once per overflow episode (the flag is cleared
        # on the dispatcher thread when on_up has run, so a flood of drops makes one report).
        if self._loss_reported:
            return
        self._loss_reported = True
        self._dispatch.submit(self._handler.on_down)
        self._dispatch.submit(self._loss_told)

    def _loss_told(self) -> None:
        self._loss_reported = False
        self._handler.on_up(False)

    def close(self) -> None:
        if self._dispatch.closed:
            return
        self._dispatch.close()
        self._feed._forget(self)
        if not self._feed._closed:
            try:
                self._feed._run(_unsubscribe(self._sub))
            except Exception as exc:
                log.debug("syncmap: NATS unsubscribe of %s: %r", self._feed.topic, exc)


# ---- JetStream -----------------------------------------------------------------------------


class JetStreamFeed(_NatsFeedBase):
    """``nats+jetstream://host:port[?max_msgs=N]``: a stream per map (see the module docstring)."""

    scheme = "nats+jetstream"
    durable = True
    compacted = True
    ordering = "total"  # one stream, one sequence

    def __init__(self, url: str, topic: str, *, timeout: float = 5.0) -> None:
        self.stream = _token(topic)
        self.max_msgs = DEFAULT_MAX_MSGS
        self._publisher = uuid.uuid4().hex[:12]
        self._counter = itertools.count(1)
        super().__init__(url, topic, timeout=timeout)
        self._js = self._nc.jetstream(timeout=timeout)
        self._jsm = self._nc.jsm(timeout=timeout)
        try:
            self._run(self._ensure_stream())
        except Exception as exc:
            self.close()
            if isinstance(exc, ConfigurationError):
                raise
            raise _stream_error(exc, self) from exc

    def _parse_url(self) -> str:
        parts = urlsplit(self.url)
        options = parse_qs(parts.query, keep_blank_values=True)
        unknown = set(options) - {"max_msgs"}
        if unknown or parts.path not in ("", "/"):
            raise ConfigurationError(
                f"{self.describe()}: nats+jetstream:// takes no path and only ?max_msgs=N "
                f"(not {sorted(unknown)})"
            )
        if "max_msgs" in options:
            value = options["max_msgs"][-1]
            if not value.isdigit() or int(value) < 1:
                raise ConfigurationError(f"{self.describe()}: max_msgs must be a positive integer")
            self.max_msgs = int(value)
        return urlunsplit(("nats", parts.netloc, "", "", ""))

    def _stream_config(self) -> StreamConfig:
        return StreamConfig(
            name=self.stream,
            subjects=[f"{self.subject}.>"],
            storage=StorageType.FILE,
            max_msgs_per_subject=1,
            max_msgs=self.max_msgs,
            discard=DiscardPolicy.OLD,
        )

    async def _ensure_stream(self) -> StreamInfo:
        """The stream's info, after creating it if it is missing (idempotent: a concurrent
        creation with the same configuration succeeds for both)."""
        try:
            return await self._stream_info()
        except NotFoundError:
            pass
        try:
            return await self._jsm.add_stream(self._stream_config())
        except BadRequestError as exc:
            if exc.err_code == _ERR_STREAM_NAME_IN_USE:  # made meanwhile with other limits
                return await self._jsm.stream_info(self.stream)
            raise ConfigurationError(
                f"JetStream refused to create stream {self.stream!r} for {self.subject}.> at "
                f"{self.describe()}: {exc.description} (another stream may already capture "
                "these subjects)"
            ) from exc

    async def _stream_info(self) -> StreamInfo:
        if not self._nc.is_connected:  # fail now: a request would wait out the timeout
            raise _NotConnected
        return await self._jsm.stream_info(self.stream)

    def _kept_after(self, info: StreamInfo, start: int) -> bool:
        """Does the stream still hold every message after ``start`` that matters?  (The module
        docstring gives the reasoning.)"""
        state, config = info.state, info.config
        if state.first_seq <= start + 1:
            return True
        if config.max_age or (config.max_bytes or -1) > 0:
            return False
        limit = config.max_msgs if config.max_msgs is not None else -1
        return limit <= 0 or state.last_seq <= limit

    def _subject_for(self, key: bytes | None) -> str:
        if key is not None:
            return f"{self.subject}.k.{hashlib.sha256(key).hexdigest()[:32]}"
        return f"{self.subject}.u.{self._publisher}.{next(self._counter)}"

    def publish(self, payload: bytes, key: bytes | None = None, *, confirm: bool = True) -> None:
        try:
            self._run(self._publish(self._subject_for(key), payload, confirm))
        except (FeedUnavailable, ConfigurationError):
            raise
        except Exception as exc:
            raise _publish_error(exc, self) from exc

    async def _publish(self, subject: str, payload: bytes, confirm: bool) -> None:
        nc = self._nc
        if not nc.is_connected:  # checked and queued in one step of the loop, as in NatsFeed
            raise _NotConnected
        if not confirm:
            await nc.publish(subject, payload)
            return
        try:
            await self._js.publish(subject, payload, timeout=self.timeout, stream=self.stream)
        except NoStreamResponseError:
            # No stream captures the subject, so nothing was stored: the stream was deleted (or
            # the server restarted with an empty store).  Make it again and send once more.
            await self._ensure_stream()
            if not nc.is_connected:
                raise _NotConnected from None
            await self._js.publish(subject, payload, timeout=self.timeout, stream=self.stream)

    def position(self) -> str | None:
        try:
            info = self._run(self._stream_info())
        except NotFoundError:
            return None
        except Exception as exc:
            raise _stream_error(exc, self) from exc
        return str(info.state.last_seq) if info.state.last_seq else None

    def subscribe(self, handler: FeedHandler, start: str | None = None) -> Subscription:
        first: int | None = None
        if start is not None:
            try:
                first = 0 if start == BEGINNING else int(start)
            except ValueError:
                first = -1
            if first < 0:
                raise ConfigurationError(
                    f"{start!r} is not a position of a nats+jetstream:// feed (a stream "
                    f"sequence from position() or on_message, or BEGINNING)"
                ) from None
        sub = _StreamSubscription(self, handler)
        self._add(sub)
        try:
            self._run(sub.open(first))
        except Exception as exc:
            sub.close()
            if isinstance(exc, (FeedUnavailable, ConfigurationError)):
                raise
            raise _stream_error(exc, self) from exc
        return sub


def _stream_error(exc: Exception, feed: JetStreamFeed) -> FeedUnavailable:
    where = f"stream {feed.stream!r} at {feed.describe()}"
    if isinstance(exc, _NotConnected):
        return FeedUnavailable(f"{where}: not connected to NATS (reconnecting)")
    if isinstance(exc, (ServiceUnavailableError, NoRespondersError)):
        return FeedUnavailable(
            f"{where}: JetStream does not answer; start nats-server with JetStream on (-js), or "
            "wait until it has recovered its streams after a restart"
        )
    if isinstance(exc, TimeoutError):
        return FeedUnavailable(f"{where}: JetStream did not answer within {feed.timeout} s")
    if isinstance(exc, APIError):
        return FeedUnavailable(f"{where}: JetStream refused: {exc.description}")
    return FeedUnavailable(f"{where}: {exc!r}")


class _StreamSubscription(_LiveSubscription):
    """An ordered push consumer made by hand.

    Each *attachment* is an inbox subscription plus an ephemeral consumer (no acks, flow control,
    heartbeats, in memory) that starts after ``_last``, the newest stream sequence handed to the
    dispatcher.  Whenever something may have gone wrong (reconnect, a consumer sequence that
    skips, a heartbeat that says we missed something, a consumer that went silent, a status from
    the server) the supervisor task makes a new attachment from ``_last``: the stream holds the
    messages, so this loses nothing, and a message that comes twice is dropped by its sequence.
    Messages of an older attachment are ignored (``_gen``).

    The supervisor then checks the stream (see the module docstring) and tells the map only what
    it must know: ``on_down``/``on_up(resumed)`` around a connection drop, and
    ``on_down``/``on_up(False)`` when it finds messages lost without a drop.
    """

    def __init__(self, feed: JetStreamFeed, handler: FeedHandler) -> None:
        self._feed, self._handler = feed, handler
        self._dispatch = aioloop.Dispatcher(f"syncmap-jetstream-{feed.topic}")
        self._last = 0  # newest stream sequence handed over (or the start)
        self._created: datetime.datetime | None = None  # the stream incarnation _last is from
        self._gen = 0  # the current attachment; messages of older ones are ignored
        self._dseq = 0  # consumer sequence of the current attachment's newest message
        self._inbox: NatsSubscription | None = None
        self._consumer = ""
        self._down = False  # on_down told, on_up not yet
        self._lost = False  # messages may be lost: the next on_up says resumed=False
        self._seen = 0.0  # loop time of the newest message or heartbeat
        self._busy = False  # the handler has a message (heartbeats wait behind it)
        self._wake = asyncio.Event()  # asks the supervisor for a new attachment
        self._task: asyncio.Task[None] | None = None
        self.stalls = 0
        """Heartbeats that found the consumer stalled on flow control: each means a reply went
        missing and delivery stopped for up to a heartbeat (should stay 0)."""

    # ---- on the loop -------------------------------------------------------------------------

    async def open(self, start: int | None) -> None:
        """Attach from ``start`` (None: after the stream's newest message, read now)."""
        info = await self._feed._ensure_stream()
        self._created = info.created
        if start is None:
            # Recorded here, before subscribe() returns: a "deliver new" resolved later by the
            # server would miss what is published in between.
            self._last = info.state.last_seq
        elif start > info.state.last_seq:  # a position in an earlier incarnation of the stream
            self._last, self._lost = 0, True
        else:
            self._last, self._lost = start, not self._feed._kept_after(info, start)
        ready = await self._attach()
        self._dispatch.submit(self._handler.on_up, not self._lost)
        self._lost = False
        ready.set()
        self._task = asyncio.get_running_loop().create_task(self._supervise())

    async def _attach(self) -> asyncio.Event:
        """A new inbox and consumer from ``_last + 1``; deliveries wait for the returned event."""
        nc, feed = self._feed._nc, self._feed
        self._gen += 1  # first: from here on the old attachment's messages are ignored
        await self._detach()
        self._dseq = 0
        ready = asyncio.Event()
        # Order: SUB on the inbox -> create the consumer.  The other way round, the consumer's
        # first messages could reach the server before our interest and be dropped there.
        inbox = await nc.subscribe(
            nc.new_inbox(),
            cb=functools.partial(self._on_msg, self._gen, ready),
            pending_msgs_limit=PENDING_MSGS,
            pending_bytes_limit=PENDING_BYTES,
        )
        self._inbox = inbox
        feed._own(inbox, self)
        config = ConsumerConfig(
            deliver_subject=inbox.subject,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self._last + 1,
            ack_policy=AckPolicy.NONE,
            flow_control=True,
            idle_heartbeat=HEARTBEAT,
            mem_storage=True,
            inactive_threshold=max(10.0, 2 * feed.timeout),
        )
        info = await feed._jsm.add_consumer(feed.stream, config, timeout=feed.timeout)
        self._consumer = info.name
        self._seen = asyncio.get_running_loop().time()
        return ready

    async def _detach(self, *, delete: bool = False) -> None:
        inbox, self._inbox = self._inbox, None
        consumer, self._consumer = self._consumer, ""
        if inbox is not None:
            self._feed._disown(inbox)
        await _unsubscribe(inbox)
        # Without interest the server drops an old consumer after its inactive_threshold; on
        # close we delete it at once (best effort).
        if delete and consumer and self._feed._nc.is_connected:
            try:
                await self._feed._jsm.delete_consumer(self._feed.stream, consumer)
            except (NatsError, TimeoutError) as exc:
                log.debug("syncmap: deleting JetStream consumer %s: %r", consumer, exc)

    async def _on_msg(self, gen: int, ready: asyncio.Event, msg: Msg) -> None:
        await ready.wait()  # on_up of this attachment is queued first
        if gen != self._gen or self._dispatch.closed:
            return
        self._seen = asyncio.get_running_loop().time()
        header = msg.header
        if header and Header.STATUS in header and not msg.data:
            await self._on_status(header, msg.reply)
            return
        try:
            seq = msg.metadata.sequence
        except NotJSMessageError:
            return  # not from our consumer
        if seq.consumer != self._dseq + 1:
            # The server sent something we did not get (nats-py's queue overflowed, say).
            self._wake.set()
            return
        self._dseq = seq.consumer
        if seq.stream <= self._last:
            return  # handed over already, before the last re-attachment
        # _last moves before the handler runs: the message is queued and will be delivered, so
        # a re-attachment meanwhile must start after it.
        self._last = seq.stream
        self._busy = True  # a slow handler is not a silent consumer (see _supervise)
        try:
            await self._dispatch.call(self._handler.on_message, msg.data, str(seq.stream))
        finally:
            self._busy = False
            self._seen = asyncio.get_running_loop().time()

    async def _on_status(self, header: dict[str, str], reply: str) -> None:
        nc = self._feed._nc
        if header.get(Header.STATUS) != "100":  # e.g. 409: this consumer is finished
            self._wake.set()
            return
        if reply:
            # Flow control: answered once every message before it was handed over, which is
            # now, as this task handles the inbox in order.
            await nc.publish(reply, b"")
            return
        stalled = header.get(Header.CONSUMER_STALLED)
        if stalled:
            self.stalls += 1
            await nc.publish(stalled, b"")
        last = header.get(Header.LAST_CONSUMER)
        if last is not None and last.isdigit() and int(last) != self._dseq:
            self._wake.set()  # the heartbeat says the consumer sent more than we got

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        nc = self._feed._nc
        backoff = _RETRY_MIN
        while not self._dispatch.closed:
            try:
                await asyncio.wait_for(self._wake.wait(), HEARTBEAT)
            except TimeoutError:
                silent = not self._busy and loop.time() - self._seen > 3 * HEARTBEAT
                if not (nc.is_connected and silent):
                    continue  # heartbeats flow (or the connection is down: wait for it)
            self._wake.clear()
            if self._dispatch.closed or not nc.is_connected:
                continue  # connection_up() wakes us
            try:
                await self._resume()
                backoff = _RETRY_MIN
            except Exception as exc:  # JetStream not ready yet after a restart, a timeout, ...
                log.debug("syncmap: re-attaching to stream %s: %r", self._feed.stream, exc)
                await asyncio.sleep(backoff)  # retry back-off, not a synchronisation
                backoff = min(2 * backoff, _RETRY_MAX)
                self._wake.set()

    async def _resume(self) -> None:
        info = await self._feed._ensure_stream()
        if info.created != self._created or info.state.last_seq < self._last:
            # Another incarnation of the stream: its sequences are not ours; read all of it.
            self._created, self._last, self._lost = info.created, 0, True
        elif not self._feed._kept_after(info, self._last):
            self._lost = True
        ready = await self._attach()
        # Order: on_down (if not told yet) -> on_up(resumed) -> this attachment's messages.
        if self._lost and not self._down:
            self._down = True
            self._dispatch.submit(self._handler.on_down)
        if self._down:
            self._dispatch.submit(self._handler.on_up, not self._lost)
        self._down = self._lost = False
        ready.set()

    def connection_down(self) -> None:
        if not self._down:
            self._down = True
            self._dispatch.submit(self._handler.on_down)

    def connection_up(self) -> None:
        self._wake.set()

    def overflowed(self) -> None:
        self._wake.set()  # the consumer sequence will skip; re-read from _last

    async def _shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self._detach(delete=True)

    def close(self) -> None:
        if self._dispatch.closed:
            return
        self._dispatch.close()
        self._feed._forget(self)
        if not self._feed._closed:
            try:
                self._feed._run(self._shutdown())
            except Exception as exc:
                log.debug("syncmap: closing a subscription to %s: %r", self._feed.stream, exc)
