"""What the NATS feeds share, whichever driver runs them: limits, subject naming, the barrier,
error meanings, and the two ways a subscription hands callbacks to its handler.

The NATS feeds are asyncio code (nats-py is asyncio-only).  ``anats.py`` and ``ajetstream.py``
hold the feeds themselves; the thread driver's ``nats.py`` and ``jetstream.py`` run those same
objects on the process's private loop (``aioloop.py``).  The one thing that differs is where a
handler's callbacks run, which is a :class:`Dispatch`:

* :class:`InlineDispatch` (asyncio driver): on the caller's loop, at once, as ``abase.py`` says
  (the callbacks are plain functions that do no I/O);
* :class:`~.aioloop.Dispatcher` (thread driver): on a thread of the subscription's own, because a
  sync handler may block (the map's lock, a probe) or publish (which waits on the loop).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import Protocol

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.errors import Error as NatsError
from nats.errors import MaxPayloadError, NoRespondersError
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

from ..errors import ConfigurationError
from .base import FeedUnavailable, PublishOutcomeUnknown

log = logging.getLogger("syncmap.feed")

RECONNECT_WAIT = 0.1
"""Seconds between reconnection attempts (nats-py retries forever)."""
PING_INTERVAL = 2
"""Seconds between client PINGs; two unanswered ones drop the connection (a half-open one is found
within about three intervals, like the Redis subscriber's ``PING_AFTER``)."""
PENDING_MSGS = 65_536
PENDING_BYTES = 64 * 1024 * 1024
"""Per-subscription queue in nats-py, between the socket and the handler.  Beyond it messages are
dropped (a *slow consumer*): core NATS then reports a loss (``on_down``, ``on_up(False)``);
JetStream re-reads from the last message handed over.  Read at each subscribe (tests lower it)."""
HEARTBEAT = 1.0
"""JetStream consumer idle heartbeat; ``3 * HEARTBEAT`` of silence on a live connection means the
consumer is gone (deleted, or the stream with it) and a new one is made."""
DEFAULT_MAX_MSGS = 1_000_000
MARGIN = 1.0  # a whole operation may take this much longer than the feed's timeout
RETRY_MIN, RETRY_MAX = 0.05, 1.0  # back-off of a subscription that cannot re-attach yet
ERR_STREAM_NAME_IN_USE = 10058  # JetStream: the stream exists with another configuration


class NotConnected(Exception):
    """Raised on the loop when the connection is down: nothing was sent."""


class Dispatch(Protocol):
    """Where one subscription's handler callbacks run (see the module docstring)."""

    @property
    def closed(self) -> bool: ...

    def submit(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn(*args)`` after everything submitted before it."""

    async def call(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn(*args)`` and return once it has run (backpressure for messages)."""

    def close(self) -> None:
        """Nothing more is called after this (idempotent)."""


class InlineDispatch:
    """Callbacks run on the loop, at once, in the order they are handed over."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, fn: Callable[..., object], *args: object) -> None:
        if not self._closed:
            try:
                fn(*args)
            except Exception:  # one handler's bug must not end the subscription
                log.exception("syncmap feed %s: a subscriber's callback failed", self.name)

    async def call(self, fn: Callable[..., object], *args: object) -> None:
        self.submit(fn, *args)

    def close(self) -> None:
        self._closed = True


def token(text: str) -> str:
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


def topic_for(namespace: str, name: str) -> str:
    return f"{token(namespace)}.{token(name)}"


def check_subject(topic: str) -> str:
    tokens = topic.split(".")
    if not all(tokens) or any(c.isspace() or c in "*>" for c in topic):
        raise ConfigurationError(
            f"NATS topic {topic!r} is not a valid subject (no empty tokens, spaces, '*' or '>'); "
            "make it with topic_for(namespace, name)"
        )
    return topic


class Barrier:
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


async def unsubscribe(sub: NatsSubscription | None) -> None:
    if sub is not None:
        try:
            await sub.unsubscribe()
        except NatsError as exc:  # closed connection, or already gone
            log.debug("syncmap: NATS unsubscribe: %r", exc)


class _Described(Protocol):
    topic: str
    timeout: float

    def describe(self) -> str: ...


def publish_error(exc: Exception, feed: _Described) -> Exception:
    """The syncmap error for a publish that raised ``exc`` (``raise ... from exc``)."""
    where = f"on {feed.topic} at {feed.describe()}"
    if isinstance(exc, NotConnected):
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
