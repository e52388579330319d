"""``nats://`` (core NATS; ``tls://`` too) on asyncio: nats-py on the caller's event loop.

This is the one implementation of the NATS feeds: the thread driver's :class:`~.nats.NatsFeed`
runs these same objects on its private loop (``aioloop.py``) and only changes where the handler's
callbacks run (``natsbase.Dispatch``).  So the promises are the sync feed's, word for word:

**Core NATS** keeps nothing: a subscriber that was disconnected has lost what was published
meanwhile, so after a reconnect it hears ``on_up(False)``.  Core NATS has no publish confirm;
``confirm=True`` makes a round trip through the server after the message (``natsbase.Barrier``),
so the call returns once the server has read it (and passed it to the subscriptions it had then).
Nothing is buffered across a drop: nats-py would keep publishes made while it reconnects and send
them later (or never, if it gives up); we refuse them instead (:class:`FeedUnavailable`).

Each feed object has its own connection, made on first use (``publish``, ``subscribe``, or an
explicit ``await feed.connect()``), which nats-py re-opens on its own (forever, every
``RECONNECT_WAIT`` s); the connection's callbacks tell the subscriptions.  Every task this module
starts is ended by ``aclose()``; nats-py's own tasks end when its connection closes.
"""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.errors import AuthorizationError, SlowConsumerError

from ..errors import ConfigurationError
from . import natsbase
from .abase import AsyncFeed, AsyncSubscription
from .base import FeedHandler, FeedUnavailable, refuse_start
from .natsbase import (
    MARGIN,
    Barrier,
    Dispatch,
    InlineDispatch,
    NotConnected,
    check_subject,
    log,
    publish_error,
    unsubscribe,
)

DispatchFactory = Callable[[str], Dispatch]


class AsyncNatsFeedBase(AsyncFeed):
    """One nats-py connection, its callbacks, and the subscriptions they tell."""

    extra = "nats"
    compacted = False

    @classmethod
    def topic_for(cls, namespace: str, name: str) -> str:
        return natsbase.topic_for(namespace, name)

    def __init__(
        self,
        url: str,
        topic: str,
        *,
        timeout: float = 5.0,
        dispatch: DispatchFactory = InlineDispatch,
    ) -> None:
        super().__init__(url, topic, timeout=timeout)
        self.subject = check_subject(topic)
        self._server = self._parse_url()
        self._dispatch = dispatch
        self._subs: dict[LiveSubscription, None] = {}  # an ordered set: told of the connection
        self._owners: dict[NatsSubscription, LiveSubscription] = {}  # for slow-consumer errors
        self._closing = self._closed = False
        self._last_error: Exception | None = None
        self._refused: str | None = None  # the server's authorization error, if it sent one
        self._nc = Client()
        self._barrier = Barrier(self._nc)
        self._connected = False
        self._connect_lock = asyncio.Lock()

    @abstractmethod
    def _parse_url(self) -> str:
        """The URL nats-py connects to (our scheme and options taken off)."""

    async def connect(self) -> None:
        """Connect now (idempotent); ``publish`` and ``subscribe`` do it on first use."""
        self._check_open()
        if self._connected:
            return
        async with self._connect_lock:
            if self._connected:
                return
            if self._nc.is_closed:  # an earlier attempt failed: start from a fresh client
                self._nc = Client()
                self._barrier = Barrier(self._nc)
            try:
                await self._connect()
                await self._after_connect()
            except BaseException:
                await self._close_connection()
                raise
            self._connected = True

    async def _after_connect(self) -> None:
        """What a subclass needs once connected (JetStream: the stream)."""

    @abstractmethod
    async def subscribe(
        self, handler: FeedHandler, start: str | None = None
    ) -> LiveSubscription: ...

    async def _connect(self) -> None:
        # Passed as a dict: nats-py's annotations say int for these durations, its code takes
        # float seconds.
        options: dict[str, Any] = {
            "name": f"syncmap {self.topic}",
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": natsbase.RECONNECT_WAIT,
            "connect_timeout": self.timeout,
            "ping_interval": natsbase.PING_INTERVAL,
            "max_outstanding_pings": 2,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }
        try:
            # With unlimited attempts nats-py's connect() never gives up on its own.
            await asyncio.wait_for(self._nc.connect(self._server, **options), self.timeout)
        except Exception as exc:
            if self._refused is not None:
                raise ConfigurationError(
                    f"NATS at {self.describe()} refused the connection ({self._refused}): check "
                    "the URL's user and password (or token), and the user's permissions"
                ) from exc
            raise FeedUnavailable(
                f"cannot connect to NATS at {self.describe()} within {self.timeout} s "
                f"({self._last_error or exc!r}); check that nats-server runs there"
                f"{' with JetStream on (-js)' if self.durable else ''} and the URL's host, port "
                "and credentials"
            ) from exc

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
            for sub in list(self._subs):
                sub.connection_down()

    async def _on_reconnected(self) -> None:
        # nats-py has re-sent every SUB and had a PONG back before calling this (those SUBs
        # were written straight to the socket before the PING): the server knows them again.
        if not self._closing:
            for sub in list(self._subs):
                sub.connection_up()

    # ---- shared by both feeds ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing:
            raise FeedUnavailable(f"the feed {self.describe()} ({self.topic}) is closed")

    async def _subscribe(self, sub: LiveSubscription, opening: Any) -> None:
        """Register ``sub`` and run its ``opening`` coroutine; on failure close it again."""
        self._subs[sub] = None
        try:
            await asyncio.wait_for(opening, self.timeout + MARGIN)
        except BaseException:
            await sub.aclose()
            raise

    def _own(self, nats_sub: NatsSubscription, sub: LiveSubscription) -> None:
        self._owners[nats_sub] = sub

    def _disown(self, nats_sub: NatsSubscription) -> None:
        self._owners.pop(nats_sub, None)

    def _forget(self, sub: LiveSubscription) -> None:
        self._subs.pop(sub, None)
        for nats_sub in [n for n, s in self._owners.items() if s is sub]:
            del self._owners[nats_sub]

    @property
    def closing(self) -> bool:
        """``aclose()`` has begun: nothing new may start."""
        return self._closing

    @property
    def closed(self) -> bool:
        """``aclose()`` has closed every subscription (the connection is next)."""
        return self._closed

    async def aclose(self) -> None:
        if self._closing:
            return
        self._closing = True
        for sub in list(self._subs):
            await sub.aclose()
        self._closed = True  # only now: the subscriptions' aclose() runs on this connection
        async with self._connect_lock:  # a connect() under way finishes first
            await self._close_connection()

    async def _close_connection(self) -> None:
        # close() writes out what is buffered (confirm=False publishes) before closing.
        try:
            async with asyncio.timeout(self.timeout):
                await self._nc.close()
        except Exception as exc:
            log.debug("syncmap: NATS close: %r", exc)


class LiveSubscription(AsyncSubscription):
    """What the connection callbacks need from a subscription (called on the loop)."""

    def __init__(self, feed: AsyncNatsFeedBase, handler: FeedHandler, dispatch: Dispatch) -> None:
        self._feed, self._handler, self._dispatch = feed, handler, dispatch
        self._closed = False

    def stop(self) -> None:
        """Deliver nothing more from now on (any thread); ``aclose`` then tidies up."""
        self._dispatch.close()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._dispatch.close()  # the flag this subscription's own tasks stop on
        self._feed._forget(self)
        await self._stop_tasks()  # outside the timeout below: a task is never left behind
        if not self._feed.closed:
            try:  # asyncio.timeout, not wait_for: wait_for waits for a cancel that may be lost
                async with asyncio.timeout(self._feed.timeout):
                    await self._shutdown()
            except Exception as exc:  # best effort: the server drops a closed socket's interest
                log.debug("syncmap: closing a subscription to %s: %r", self._feed.topic, exc)

    async def _stop_tasks(self) -> None:
        """Stop the tasks of this subscription's own (``aiotasks.stop_task``); the dispatch is
        closed already."""

    @abstractmethod
    async def _shutdown(self) -> None: ...

    @abstractmethod
    def connection_down(self) -> None: ...

    @abstractmethod
    def connection_up(self) -> None: ...

    @abstractmethod
    def overflowed(self) -> None: ...


# ---- core NATS ---------------------------------------------------------------------------------


class AsyncNatsFeed(AsyncNatsFeedBase):
    """``nats://host:port`` or ``tls://host:port`` (``user:password@`` as usual): core NATS."""

    scheme = "nats"
    durable = False
    ordering = "per-publisher"  # one connection keeps its order; the server interleaves several

    def _parse_url(self) -> str:
        parts = urlsplit(self.url)
        if parts.query or parts.path not in ("", "/"):
            raise ConfigurationError(f"{self.describe()}: nats:// takes no path or options")
        return urlunsplit((parts.scheme.lower(), parts.netloc, "", "", ""))

    async def publish(self, payload: bytes, key: bytes | None = None, *,
                      confirm: bool = True) -> None:  # fmt: skip
        await self.connect()
        try:
            await asyncio.wait_for(self._publish(payload, confirm), self.timeout + MARGIN)
        except (FeedUnavailable, ConfigurationError):
            raise
        except Exception as exc:
            raise publish_error(exc, self) from exc

    async def _publish(self, payload: bytes, confirm: bool) -> None:
        nc = self._nc
        # Checked and queued in one step of the loop (no await in between), so the message is
        # either refused here or in the buffer of the connection that is up now.
        if not nc.is_connected:
            raise NotConnected
        await nc.publish(self.subject, payload)
        if confirm:
            await self._barrier(self.timeout)

    async def subscribe(self, handler: FeedHandler, start: str | None = None) -> CoreSubscription:
        refuse_start(self.scheme, self.durable, start)
        await self.connect()
        sub = CoreSubscription(self, handler, self._dispatch(f"syncmap-nats-{self.topic}"))
        try:
            await self._subscribe(sub, sub.open())
        except FeedUnavailable:
            raise
        except Exception as exc:
            why = (
                "not connected to NATS (reconnecting)"
                if isinstance(exc, NotConnected)
                else repr(exc)
            )
            raise FeedUnavailable(f"subscribe to {self.topic} at {self.describe()}: {why}") from exc
        return sub


class CoreSubscription(LiveSubscription):
    def __init__(self, feed: AsyncNatsFeedBase, handler: FeedHandler, dispatch: Dispatch) -> None:
        super().__init__(feed, handler, dispatch)
        self._sub: NatsSubscription | None = None
        self._down = False
        self._loss_reported = False

    async def open(self) -> None:
        nc = self._feed._nc
        if not nc.is_connected:
            raise NotConnected
        ready = asyncio.Event()

        async def on_msg(msg: Msg) -> None:
            # A message can arrive before the barrier below returns (published by someone else
            # just after our SUB reached the server): hold it until on_up is handed over, so
            # on_up comes first.
            await ready.wait()
            await self._dispatch.call(self._handler.on_message, msg.data, None)

        self._sub = await nc.subscribe(
            self._feed.subject,
            cb=on_msg,
            pending_msgs_limit=natsbase.PENDING_MSGS,
            pending_bytes_limit=natsbase.PENDING_BYTES,
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
        # where the handler runs, once on_up has run, so a flood of drops makes one report).
        if self._loss_reported:
            return
        self._loss_reported = True
        self._dispatch.submit(self._handler.on_down)
        self._dispatch.submit(self._loss_told)

    def _loss_told(self) -> None:
        self._loss_reported = False
        self._handler.on_up(False)

    async def _shutdown(self) -> None:
        await unsubscribe(self._sub)
