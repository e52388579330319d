"""``amqp://`` and ``amqps://`` on asyncio: RabbitMQ through aio-pika, on the caller's loop.

The layout and the promises are the thread driver's (``rabbitmq.py``, whose docstring says why):
one fanout, non-durable, auto-delete exchange per map, declared the same way by every server; one
server-named, exclusive, auto-delete queue per subscription, consumed without acks, so every
(re)connect says ``on_up(False)``.  The URL is checked, and its heartbeat read (``HEARTBEAT`` s
unless it says ``?heartbeat=N``), by the same code as the sync feed's.

Publishing: one connection per feed object, in confirm mode, used by one *publisher task* that
sends queued messages one at a time, as the sync feed's publisher thread does, so the outcome
rules are the same: ``publish(confirm=True)`` waits ``timeout``; if it gives up before the task
marked the message ``SENDING`` it is withdrawn (:class:`FeedUnavailable`: nothing sent), after
that the outcome is unknown (:class:`PublishOutcomeUnknown`).  A connection found dead before a
send is replaced and the message sent on the new one; a ``404`` (the last subscriber took the
auto-delete exchange along) re-declares it and sends once more.  ``confirm=False`` goes through
the same queue (order kept); its failures are counted in ``unconfirmed_failures``.

Subscribing: one task and one connection per subscription; it reconnects with a back-off
(``BACKOFF_MIN`` doubling to ``BACKOFF_MAX``).  ``subscribe`` returns once the first attempt is
bound (then ``on_up(False)`` has run) or failed (the task keeps trying).  aio-pika hands each
message to a task of its own; those tasks run in arrival order and our callback calls the handler
before its first await, so the handler sees the queue's order.

``aclose`` ends every task this module started (awaited) and closes every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aio_pika
import aiormq.exceptions
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
)

from ..aiotasks import stop_task
from ..errors import FeedError
from .abase import AsyncFeed, AsyncSubscription
from .base import FeedHandler, FeedUnavailable, PublishOutcomeUnknown, refuse_start
from .rabbitmq import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    MAX_QUEUED,
    _State,
    check_exchange_name,
    give_up_error,
    pika_parameters,
)

log = logging.getLogger("syncmap.feed")
_CONNECT_ERRORS = (aiormq.exceptions.AMQPError, OSError, asyncio.TimeoutError)


class AsyncRabbitMQFeed(AsyncFeed):
    scheme = "amqp"
    durable = False
    ordering = "per-publisher"
    extra = "amqp"

    @classmethod
    def topic_for(cls, namespace: str, name: str) -> str:
        return f"{namespace}.{name}"

    def __init__(self, url: str, topic: str, *, timeout: float = 5.0) -> None:
        super().__init__(url, topic, timeout=timeout)
        check_exchange_name(topic)
        heartbeat = pika_parameters(url, topic, timeout, "check").heartbeat
        self._heartbeat = int(heartbeat or 0)
        self._publisher: _Publisher | None = None
        self._subs: list[_Consumer] = []
        self._closed = False

    async def publish(self, payload: bytes, key: bytes | None = None, *,
                      confirm: bool = True) -> None:  # fmt: skip
        """Send ``payload`` (``key`` is unused: a fanout exchange keeps nothing to compact)."""
        self._check_open()
        if self._publisher is None:
            self._publisher = _Publisher(self)
        await self._publisher.publish(payload, confirm)

    async def subscribe(self, handler: FeedHandler, start: str | None = None) -> AsyncSubscription:
        refuse_start(self.scheme, self.durable, start)
        self._check_open()
        sub = _Consumer(self, handler)
        self._subs.append(sub)
        await sub.start()
        return sub

    @property
    def unconfirmed_failures(self) -> int:
        """``publish(confirm=False)`` messages that failed after ``publish`` returned."""
        return 0 if self._publisher is None else self._publisher.failures

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subs):
            await sub.aclose()
        if self._publisher is not None:
            await self._publisher.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise FeedUnavailable(f"the feed {self.topic} on {self.describe()} is closed")

    # ---- helpers both sides use -----------------------------------------------------------------

    async def _connect(self, role: str) -> AbstractConnection:
        """A new connection; its failure as a FeedUnavailable that says what to do."""
        where = f"RabbitMQ at {self.describe()}"
        url = self.url
        if "heartbeat" not in parse_qs(urlsplit(url).query):
            url += ("&" if urlsplit(url).query else "?") + f"heartbeat={self._heartbeat}"
        try:
            return await aio_pika.connect(
                url,
                timeout=self.timeout,
                client_properties={"connection_name": f"syncmap {role} {self.topic}"},
            )
        except (
            aiormq.exceptions.ProbableAuthenticationError,
            aiormq.exceptions.AuthenticationError,
        ) as e:
            raise FeedUnavailable(f"{where} refused the user and password: fix the URL") from e
        except aiormq.exceptions.ConnectionNotAllowed as e:
            raise FeedUnavailable(
                f"{where} refused access to the virtual host: check the user's permissions"
            ) from e
        except _CONNECT_ERRORS as e:
            raise FeedUnavailable(f"{where} is unreachable ({e!r}): start it or fix the URL") from e

    async def _declare(self, channel: AbstractChannel) -> AbstractExchange:
        """Declare the exchange, the same way on every server (see ``rabbitmq.py``)."""
        try:
            return await channel.declare_exchange(
                self.topic, aio_pika.ExchangeType.FANOUT, durable=False, auto_delete=True
            )
        except aiormq.exceptions.ChannelClosed as exc:
            raise FeedUnavailable(
                f"RabbitMQ at {self.describe()} refused to declare the exchange {self.topic!r} "
                f"({exc!r}); syncmap needs a fanout, non-durable, auto-delete exchange: delete one "
                "made otherwise, or grant 'configure' on it"
            ) from exc


async def _close_quietly(conn: AbstractConnection | None, timeout: float) -> None:
    """Close a connection that may already be closed or broken; errors mean it is gone anyway."""
    if conn is not None and not conn.is_closed:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):  # not wait_for: it waits out a lost cancel
                await conn.close()


# ---- publishing ---------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Outgoing:
    payload: bytes
    confirm: bool
    done: asyncio.Future[None]
    state: _State = _State.QUEUED
    error: FeedError | None = field(default=None)


def _withdrawn(item: _Outgoing) -> bool:
    return item.state is _State.WITHDRAWN


class _Publisher:
    """The feed's publishing connection and the one task that uses it."""

    def __init__(self, feed: AsyncRabbitMQFeed) -> None:
        self.feed = feed
        self.failures = 0
        self._queue: asyncio.Queue[_Outgoing | None] = asyncio.Queue(MAX_QUEUED)
        self._conn: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._closing = False
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"syncmap-amqp-publish-{feed.topic}"
        )

    async def publish(self, payload: bytes, confirm: bool) -> None:
        loop = asyncio.get_running_loop()
        item = _Outgoing(payload, confirm, loop.create_future())
        deadline = loop.time() + self.feed.timeout
        try:
            if confirm:
                await asyncio.wait_for(self._queue.put(item), self.feed.timeout)
            else:
                self._queue.put_nowait(item)
        except (asyncio.QueueFull, TimeoutError):
            raise FeedUnavailable(
                f"{MAX_QUEUED} messages are waiting to be published on {self.feed.describe()}: "
                "the broker is slow or unreachable; nothing was sent"
            ) from None
        if not confirm:
            return
        try:
            await asyncio.wait_for(asyncio.shield(item.done), max(0.0, deadline - loop.time()))
        except TimeoutError:
            # No await between reading the state and withdrawing: the task cannot move it.
            error = give_up_error(item.state, self.feed.describe(), self.feed.timeout)
            if item.state is _State.QUEUED:
                item.state = _State.WITHDRAWN
            if error is not None:
                raise error from None
        if item.error is not None:
            raise item.error

    async def aclose(self) -> None:
        """Send what is queued (one connection attempt at most), then end the task."""
        self._closing = True
        await stop_task(self._task, wake=self._wake, grace=self.feed.timeout)

    def _wake(self) -> None:
        """The end marker, after what is queued (a full queue: the task is cancelled later)."""
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)

    async def _run(self) -> None:
        try:
            while (item := await self._queue.get()) is not None:
                await self._handle(item)
        finally:
            await _close_quietly(self._conn, self.feed.timeout)
            self._fail_rest()

    async def _handle(self, item: _Outgoing) -> None:
        error: FeedError | None = None
        try:
            if _withdrawn(item):
                return
            await self._ensure_channel()  # may connect: the caller may give up meanwhile
            if _withdrawn(item):
                return
            item.state = _State.SENDING  # no await since the check: the caller sees either
            await self._send(item.payload)
        except FeedError as exc:
            error = exc
        except Exception as exc:  # the task must not die: anything else is a lost connection
            await self._disconnect()
            error = PublishOutcomeUnknown(f"publishing on {self.feed.describe()} failed: {exc!r}")
        finally:
            if item.state is not _State.WITHDRAWN:
                self._finish(item, error)

    def _finish(self, item: _Outgoing, error: FeedError | None) -> None:
        item.state, item.error = _State.DONE, error
        if not item.done.done():
            item.done.set_result(None)
        if error is not None and not item.confirm:
            self.failures += 1
            if self.failures == 1 or self.failures % 1000 == 0:
                log.warning("unconfirmed publish failed (%d so far): %s", self.failures, error)

    async def _ensure_channel(self) -> None:
        """An open confirm-mode channel with the exchange declared; nothing is sent here."""
        if self._conn is not None and not self._conn.is_closed:
            if self._channel is not None and not self._channel.is_closed:
                return
        else:
            await self._disconnect()
            if self._closing and self._conn_tried:
                raise FeedUnavailable(f"the feed on {self.feed.describe()} closed; not sent")
            self._conn_tried = self._closing
            self._conn = await self.feed._connect("publisher")
        await self._open_channel()

    _conn_tried = False  # close() still sends what was queued, but tries one connection for it

    async def _open_channel(self) -> None:
        assert self._conn is not None
        try:
            self._channel = await self._conn.channel(publisher_confirms=True)
            self._exchange = await self.feed._declare(self._channel)
        except FeedError:
            await self._disconnect()
            raise
        except _CONNECT_ERRORS as exc:
            await self._disconnect()
            raise FeedUnavailable(f"RabbitMQ at {self.feed.describe()}: {exc!r}") from exc

    async def _send(self, payload: bytes) -> None:
        """Publish and wait for the confirm; at most one resend, after a 404."""
        where = f"RabbitMQ at {self.feed.describe()}"
        for attempt in (1, 2):
            assert self._exchange is not None
            try:
                await self._exchange.publish(aio_pika.Message(payload), routing_key="")
                return
            except aiormq.exceptions.DeliveryError as exc:
                raise FeedUnavailable(f"{where} refused the message (nack): not delivered") from exc
            except aiormq.exceptions.ChannelNotFoundEntity as exc:
                # A channel error answers this publish (the only one in flight): it was routed
                # nowhere.  404: the last subscriber left and took the auto-delete exchange along.
                if attempt == 1:
                    await self._open_channel()
                    continue
                raise FeedUnavailable(
                    f"{where} refused the message ({exc!r}): not delivered"
                ) from exc
            except aiormq.exceptions.ChannelClosed as exc:
                raise FeedUnavailable(
                    f"{where} refused the message ({exc!r}): not delivered"
                ) from exc
            except Exception as exc:
                await self._disconnect()
                raise PublishOutcomeUnknown(
                    f"the connection to {where} failed after a message was sent, before its "
                    f"confirm ({exc!r}): it may or may not be delivered"
                ) from exc

    async def _disconnect(self) -> None:
        conn, self._conn, self._channel, self._exchange = self._conn, None, None, None
        await _close_quietly(conn, self.feed.timeout)

    def _fail_rest(self) -> None:
        """Wake callers whose messages can no longer be sent (the task is ending)."""
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None and item.state is not _State.WITHDRAWN:
                self._finish(item, FeedUnavailable(f"the feed on {self.feed.describe()} closed"))


# ---- subscribing --------------------------------------------------------------------------------


class _Consumer(AsyncSubscription):
    """One subscription: a task that (re)connects, binds a fresh queue and delivers."""

    def __init__(self, feed: AsyncRabbitMQFeed, handler: FeedHandler) -> None:
        self._feed, self._handler = feed, handler
        self._stop = asyncio.Event()
        self._first_attempt = asyncio.Event()
        self._went_up = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"syncmap-amqp-subscribe-{self._feed.topic}"
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_attempt.wait(), self._feed.timeout)

    async def aclose(self) -> None:
        self._stop.set()  # first: no callback from here on
        with contextlib.suppress(ValueError):
            self._feed._subs.remove(self)
        task, self._task = self._task, None
        # _stop is both the flag and the wake-up: the back-off and the session wait on it.
        await stop_task(task, wake=self._stop.set, grace=self._feed.timeout)

    async def _run(self) -> None:
        delay, quiet = BACKOFF_MIN, False
        while not self._stop.is_set():
            self._went_up = False
            try:
                await self._session()
            except Exception as exc:  # every failure is a lost connection: try again
                log.log(logging.DEBUG if quiet and not self._went_up else logging.WARNING,
                        "subscription to %s on %s: %s; reconnecting",
                        self._feed.topic, self._feed.describe(), exc)  # fmt: skip
                quiet = True
            finally:
                self._first_attempt.set()
            if self._went_up:
                delay = BACKOFF_MIN
            with contextlib.suppress(TimeoutError):  # the back-off, cut short by aclose()
                await asyncio.wait_for(self._stop.wait(), delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _session(self) -> None:
        """One connection's life: returns when stopped, raises when the connection is lost."""
        conn = await self._feed._connect("subscriber")
        lost = asyncio.Event()
        try:
            conn.close_callbacks.add(lambda *_: lost.set())
            channel = await conn.channel()
            channel.close_callbacks.add(lambda *_: lost.set())
            exchange = await self._feed._declare(channel)
            queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
            await queue.bind(exchange)
            await queue.consume(self._deliver, no_ack=True)
            # Bound: whatever is published from here on reaches the queue, so on_up is true now,
            # and it comes before start() returns (the first time) so subscribe() means "live".
            self._went_up = True
            self._call(self._handler.on_up, False)
            self._first_attempt.set()
            stopped = asyncio.ensure_future(self._stop.wait())
            dropped = asyncio.ensure_future(lost.wait())
            try:
                await asyncio.wait({stopped, dropped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in (stopped, dropped):
                    waiter.cancel()
                await asyncio.gather(stopped, dropped, return_exceptions=True)
            if not self._stop.is_set():
                raise ConnectionError("the connection or its channel was closed")
        finally:
            if self._went_up:  # first: closing a connection that is still open takes round trips
                self._call(self._handler.on_down)
            await _close_quietly(conn, self._feed.timeout)

    async def _deliver(self, message: AbstractIncomingMessage) -> None:
        self._call(self._handler.on_message, message.body, None)  # before any await: in order

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        """Run a handler callback; after aclose() nothing more is told, and a raise is logged."""
        if self._stop.is_set():
            return
        try:
            callback(*args)
        except Exception:
            log.exception("a handler of %s on %s raised; the subscription goes on",
                          self._feed.topic, self._feed.describe())  # fmt: skip
