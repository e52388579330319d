"""``nats+jetstream://`` on asyncio: a durable, compacted NATS JetStream stream per map, nats-py
on the caller's loop.

The one implementation of the JetStream feed: the thread driver's :class:`~.jetstream.JetStreamFeed`
runs these objects on its private loop; the connection handling is core NATS's (``anats.py``).

**JetStream** (:class:`AsyncJetStreamFeed`): one stream per map, named after the topic, capturing
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
import uuid
from urllib.parse import parse_qs, urlsplit, urlunsplit

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError, NotJSMessageError
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
from nats.js.client import JetStreamContext
from nats.js.errors import (
    APIError,
    BadRequestError,
    NoStreamResponseError,
    NotFoundError,
    ServiceUnavailableError,
)
from nats.js.manager import JetStreamManager

from ..aiotasks import stop_task
from ..errors import ConfigurationError
from . import natsbase
from .anats import AsyncNatsFeedBase, DispatchFactory, LiveSubscription
from .base import BEGINNING, FeedHandler, FeedUnavailable
from .natsbase import (
    DEFAULT_MAX_MSGS,
    ERR_STREAM_NAME_IN_USE,
    HEARTBEAT,
    MARGIN,
    RETRY_MAX,
    RETRY_MIN,
    Dispatch,
    InlineDispatch,
    NotConnected,
    log,
    publish_error,
    token,
    unsubscribe,
)


class AsyncJetStreamFeed(AsyncNatsFeedBase):
    """``nats+jetstream://host:port[?max_msgs=N]``: a stream per map (see the module docstring)."""

    scheme = "nats+jetstream"
    durable = True
    compacted = True
    ordering = "total"  # one stream, one sequence

    def __init__(
        self,
        url: str,
        topic: str,
        *,
        timeout: float = 5.0,
        dispatch: DispatchFactory = InlineDispatch,
    ) -> None:
        self.stream = token(topic)
        self.max_msgs = DEFAULT_MAX_MSGS
        self._publisher = uuid.uuid4().hex[:12]
        self._counter = itertools.count(1)
        super().__init__(url, topic, timeout=timeout, dispatch=dispatch)

    @property
    def _js(self) -> JetStreamContext:
        return self._nc.jetstream(timeout=self.timeout)

    @property
    def _jsm(self) -> JetStreamManager:
        return self._nc.jsm(timeout=self.timeout)

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

    async def _after_connect(self) -> None:
        try:
            await self._ensure_stream()
        except ConfigurationError:
            raise
        except Exception as exc:
            raise stream_error(exc, self) from exc

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
            if exc.err_code == ERR_STREAM_NAME_IN_USE:  # made meanwhile with other limits
                return await self._jsm.stream_info(self.stream)
            raise ConfigurationError(
                f"JetStream refused to create stream {self.stream!r} for {self.subject}.> at "
                f"{self.describe()}: {exc.description} (another stream may already capture "
                "these subjects)"
            ) from exc

    async def _stream_info(self) -> StreamInfo:
        if not self._nc.is_connected:  # fail now: a request would wait out the timeout
            raise NotConnected
        return await self._jsm.stream_info(self.stream)

    def _subject_for(self, key: bytes | None) -> str:
        if key is not None:
            return f"{self.subject}.k.{hashlib.sha256(key).hexdigest()[:32]}"
        return f"{self.subject}.u.{self._publisher}.{next(self._counter)}"

    async def publish(self, payload: bytes, key: bytes | None = None, *,
                      confirm: bool = True) -> None:  # fmt: skip
        await self.connect()
        subject = self._subject_for(key)
        try:
            await asyncio.wait_for(self._publish(subject, payload, confirm), self.timeout + MARGIN)
        except (FeedUnavailable, ConfigurationError):
            raise
        except Exception as exc:
            raise publish_error(exc, self) from exc

    async def _publish(self, subject: str, payload: bytes, confirm: bool) -> None:
        nc = self._nc
        if not nc.is_connected:  # checked and queued in one step of the loop, as in core NATS
            raise NotConnected
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
                raise NotConnected from None
            await self._js.publish(subject, payload, timeout=self.timeout, stream=self.stream)

    async def position(self) -> str | None:
        """The newest message's stream sequence (``None``: the stream holds nothing)."""
        await self.connect()
        try:
            info = await asyncio.wait_for(self._stream_info(), self.timeout + MARGIN)
        except NotFoundError:
            return None
        except Exception as exc:
            raise stream_error(exc, self) from exc
        return str(info.state.last_seq) if info.state.last_seq else None

    async def subscribe(self, handler: FeedHandler, start: str | None = None) -> StreamSubscription:
        first = start_sequence(start)
        await self.connect()
        sub = StreamSubscription(self, handler, self._dispatch(f"syncmap-jetstream-{self.topic}"))
        try:
            await self._subscribe(sub, sub.open(first))
        except (FeedUnavailable, ConfigurationError):
            raise
        except Exception as exc:
            raise stream_error(exc, self) from exc
        return sub


def start_sequence(start: str | None) -> int | None:
    """The stream sequence a subscription starts after (0: the beginning; None: the newest)."""
    if start is None:
        return None
    try:
        first = 0 if start == BEGINNING else int(start)
    except ValueError:
        first = -1
    if first < 0:
        raise ConfigurationError(
            f"{start!r} is not a position of a nats+jetstream:// feed (a stream "
            f"sequence from position() or on_message, or BEGINNING)"
        )
    return first


def kept_after(info: StreamInfo, start: int) -> bool:
    """Does the stream still hold every message after ``start`` that matters?  (The module
    docstring gives the reasoning.)"""
    state, config = info.state, info.config
    if state.first_seq <= start + 1:
        return True
    if config.max_age or (config.max_bytes or -1) > 0:
        return False
    limit = config.max_msgs if config.max_msgs is not None else -1
    return limit <= 0 or state.last_seq <= limit


def stream_error(exc: Exception, feed: AsyncJetStreamFeed) -> FeedUnavailable:
    where = f"stream {feed.stream!r} at {feed.describe()}"
    if isinstance(exc, NotConnected):
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


class StreamSubscription(LiveSubscription):
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

    _feed: AsyncJetStreamFeed

    def __init__(self, feed: AsyncJetStreamFeed, handler: FeedHandler, dispatch: Dispatch) -> None:
        super().__init__(feed, handler, dispatch)
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
            self._last, self._lost = start, not kept_after(info, start)
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
            pending_msgs_limit=natsbase.PENDING_MSGS,
            pending_bytes_limit=natsbase.PENDING_BYTES,
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
        await unsubscribe(inbox)
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
        backoff = RETRY_MIN
        while not self._dispatch.closed:
            try:  # asyncio.timeout: 3.11's wait_for may swallow a cancel meeting the timeout
                async with asyncio.timeout(HEARTBEAT):
                    await self._wake.wait()
            except TimeoutError:
                silent = not self._busy and loop.time() - self._seen > 3 * HEARTBEAT
                if not (nc.is_connected and silent):
                    continue  # heartbeats flow (or the connection is down: wait for it)
            self._wake.clear()
            if self._dispatch.closed or not nc.is_connected:
                continue  # connection_up() wakes us
            try:
                await self._resume()
                backoff = RETRY_MIN
            except Exception as exc:  # JetStream not ready yet after a restart, a timeout, ...
                log.debug("syncmap: re-attaching to stream %s: %r", self._feed.stream, exc)
                await asyncio.sleep(backoff)  # retry back-off, not a synchronisation
                backoff = min(2 * backoff, RETRY_MAX)
                self._wake.set()

    async def _resume(self) -> None:
        info = await self._feed._ensure_stream()
        if info.created != self._created or info.state.last_seq < self._last:
            # Another incarnation of the stream: its sequences are not ours; read all of it.
            self._created, self._last, self._lost = info.created, 0, True
        elif not kept_after(info, self._last):
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

    async def _stop_tasks(self) -> None:
        task, self._task = self._task, None
        # Owned: stopped and awaited, so aclose() leaves no task behind.  The dispatch is closed
        # (the flag _supervise checks); _wake ends its wait.
        await stop_task(task, wake=self._wake.set, grace=self._feed.timeout)

    async def _shutdown(self) -> None:
        await self._detach(delete=True)
