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

JetStream (``nats+jetstream://``) is in ``jetstream.py``, on the same connection handling.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from abc import abstractmethod
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.errors import (
    AuthorizationError,
    MaxPayloadError,
    NoRespondersError,
    SlowConsumerError,
)
from nats.errors import (
    Error as NatsError,
)
from nats.js.errors import (
    NoStreamResponseError,
    ServiceUnavailableError,
)

from ..errors import ConfigurationError
from . import aioloop
from .base import Feed, FeedHandler, FeedUnavailable, PublishOutcomeUnknown, Subscription

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
