"""``redis+stream://`` feed on asyncio: the asyncio twin of ``redis_stream.py``, whose docstring
states the behaviour (the entry layout, the URL, what ``on_up(resumed)`` says after a drop).  The
decisions are the same functions (``streamlog.py``); only the waiting differs:

* a **task** per subscription, owned by it (``aclose`` cancels and awaits it), reads ``XREAD
  BLOCK`` after the last delivered ID on a ``redis.asyncio`` connection of its own;
* ``subscribe()`` connects, reads the newest ID (``start=None``) or checks the start position,
  before it returns, so a refused connection or a wrong key type fails it loudly, and nothing
  added after it returns is skipped (never ``$`` in the loop);
* **no silent reconnect**: every command checks the connection is still connected with no
  ``await`` between the check and the send (``redis.asyncio`` would reconnect it), so a drop
  always reaches the reader, which checks for a gap;
* every failure is a lost connection: ``on_down`` (once per drop), a back-off of 0.05 s doubling
  to 1 s, reconnect, the gap check, ``on_up(resumed)``.  A stalled server is found by the socket
  timeout (a little above the BLOCK time); a Sentinel switch (told on the watcher's thread) wakes
  the reader at once (``apubsub.Wake``) and it reconnects to the new master;
* ``subscribe()`` runs on the **caller's task**, so a cancel that Python 3.11's ``wait_for``
  (around every ``redis.asyncio`` send) loses there is not repeated by ``aiotasks.stop_task``:
  ``subscribe()`` returned a subscription, its reader task running, to a caller that had been
  cancelled (one that drops what a cancelled call returns left the reader reading until
  ``aclose()``).  ``subscribe()`` checks the task's cancel count after connecting and before
  starting the reader, and raises the lost ``CancelledError`` with the connection closed;
* the reader hands the loop back every ``YIELD_EVERY`` entries of a batch, so a backlog of
  thousands of entries does not hold the loop in one step.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import redis

from ..aiotasks import cancel_lost, cancels_requested, stop_task
from ..store.topology import Topology
from .abase import AsyncSubscription
from .apubsub import Wake, resolve
from .aredis_base import AsyncRedisFeed
from .base import BEGINNING, FeedHandler
from .redis_stream import RedisStreamFeed
from .streamlog import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    READ_TIMEOUT,
    ZERO,
    StreamInfo,
    check_start,
    field_m,
    is_no_such_key,
    log,
    maxlen_of,
    newest,
    newest_command,
    no_m_log,
    raise_subscribe_error,
    resume_point,
    run_id_of,
    split_url,
    stream_info,
    xadd,
    xread_command,
)

YIELD_EVERY = 16
Conn = Any  # a redis.asyncio Connection (Endpoint.async_connection)


class AsyncRedisStreamFeed(AsyncRedisFeed):
    scheme = "redis+stream"
    durable = True
    ordering = "total"  # one stream: one sequence of IDs
    compacted = False  # trimmed by count, not per key

    @classmethod
    def topic_for(cls, namespace: str, name: str) -> str:
        return RedisStreamFeed.topic_for(namespace, name)

    def __init__(
        self, url: str, topic: str, *, timeout: float = 5.0, topology: Topology | None = None
    ) -> None:
        redis_url, self.maxlen = split_url(url) if topology is None else (None, maxlen_of(url))
        super().__init__(url, topic, timeout=timeout, topology=topology, redis_url=redis_url)

    @property
    def stream(self) -> str:
        """The stream's key (the topic)."""
        return self.topic

    async def publish(
        self, payload: bytes, key: bytes | None = None, *, confirm: bool = True
    ) -> None:
        # ``key`` is not used: a stream trims by count, it does not compact per key.
        await self._call(xadd(self.stream, self.maxlen, payload), write=True)

    async def position(self) -> str | None:
        return newest(await self._call(newest_command(self.stream), write=False))

    async def subscribe(self, handler: FeedHandler, start: str | None = None) -> AsyncSubscription:
        check_start(start)
        # This runs on the caller's task, whose cancel a send may lose (module docstring).
        cancels = cancels_requested()
        try:
            conn, run_id = await self._connect_reader()
        except Exception as exc:
            raise_subscribe_error(self.describe(), self.stream, exc)
        try:
            if cancel_lost(cancels):  # in the handshake or INFO: send nothing more
                raise asyncio.CancelledError
            # Order: the newest ID is read here, before subscribe() returns; an entry added after
            # this read has a larger ID, so the reader (XREAD after that ID) delivers it.
            if start is None:
                plan = (newest(await _command(conn, *newest_command(self.stream))) or ZERO, True)
            else:
                first = ZERO if start == BEGINNING else start
                plan = await check_resume(conn, self.stream, first, True)
            if cancel_lost(cancels):  # before the reader task starts: nothing is left running
                raise asyncio.CancelledError
        except BaseException as exc:
            await conn.disconnect(nowait=True)
            if isinstance(exc, Exception):
                raise_subscribe_error(self.describe(), self.stream, exc)
            raise
        sub = _AsyncStreamSubscription(self, handler, conn, run_id, plan)
        self._keep(sub)
        sub.start()
        return sub

    async def _connect_reader(self) -> tuple[Conn, str | None]:
        """A new connection for a reader (Sentinel: to the master named now), and the server's
        ``run_id``."""
        endpoint = await resolve(self.topology)
        conn = endpoint.async_connection(timeout=READ_TIMEOUT, connect_timeout=self.timeout)
        try:
            await conn.connect()
            return conn, await _run_id(conn)
        except BaseException:
            await conn.disconnect(nowait=True)
            raise


class _AsyncStreamSubscription(AsyncSubscription):
    """One reader task and its connection; every callback of the handler runs on that task."""

    def __init__(
        self,
        feed: AsyncRedisStreamFeed,
        handler: FeedHandler,
        conn: Conn,
        run_id: str | None,
        plan: tuple[str, bool],
    ) -> None:
        self._feed, self._handler = feed, handler
        self._conn: Conn | None = conn
        self._run_id = run_id
        self._plan: tuple[str, bool] | None = plan  # the first on_up, decided in subscribe()
        self._last = plan[0]  # the ID the next XREAD reads after
        self._same_server = True  # run_id unchanged since the previous connection
        self._up = False
        self._backoff = BACKOFF_MIN
        self._wake = Wake()
        self._master_moved = False
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._feed.topology.on_change(self._master_changed)
        self._task = self._loop.create_task(self._run(), name="syncmap-async-stream")

    def _master_changed(self) -> None:
        """On the Sentinel watcher's thread: end the reader's wait; it reconnects to the new
        master and checks for a gap (on_down, then on_up(resumed))."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing is left to move
            self._loop.call_soon_threadsafe(self._moved)

    def _moved(self) -> None:
        self._master_moved = True  # read before every XREAD: a lost wake costs one BLOCK
        self._wake.now()

    async def aclose(self) -> None:
        """Stop the reader (nothing is delivered once this is called) and close its connection;
        idempotent."""
        self._feed.topology.remove_listener(self._master_changed)
        self._feed._forget(self)
        await stop_task(self._task)  # cancelled, repeatedly: see aiotasks

    # ---- the reader task ---------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                try:
                    async with self._wake.scope():
                        await self._session()
                except Exception as exc:  # every failure is a lost connection; the task lives on
                    await self._lost(exc)
        finally:  # cancelled by aclose(), or by the loop shutting down
            await self._drop()

    async def _session(self) -> None:
        if self._plan is None:  # after a failure: a new connection, a new gap check
            conn = await self._reconnect()
            plan = await check_resume(conn, self._feed.stream, self._last, self._same_server)
        else:  # the connection and the check subscribe() made
            conn, plan, self._plan = self._conn, self._plan, None
        self._last, resumed = plan
        self._up = True
        self._call(self._handler.on_up, resumed)
        await self._read(conn)

    async def _reconnect(self) -> Conn:
        self._master_moved = False  # connects to the master named from now on
        conn, run_id = await self._feed._connect_reader()
        self._conn = conn  # no await since it connected: a cancel cannot leave it open
        self._same_server = run_id == self._run_id
        self._run_id = run_id
        return conn

    async def _read(self, conn: Conn) -> None:
        stream = self._feed.stream
        while True:
            if self._master_moved:
                raise redis.ConnectionError("the master changed")
            reply = await _command(conn, *xread_command(stream, self._last))
            self._backoff = BACKOFF_MIN  # the connection serves reads: the next drop is new
            delivered = 0
            for _key, entries in reply or ():
                for raw_id, fields in entries:
                    self._last = raw_id.decode()
                    payload = field_m(fields)
                    if payload is None:
                        no_m_log("syncmap: entry %s of %s has no 'm' field; skipped",
                                 self._last, stream)  # fmt: skip
                        continue
                    self._call(self._handler.on_message, payload, self._last)
                    delivered += 1
                    if delivered % YIELD_EVERY == 0:
                        await asyncio.sleep(0)  # let the loop run; _last is what we delivered

    async def _lost(self, exc: Exception) -> None:
        """A failure: ``on_down`` once per drop, then wait out the back-off."""
        await self._drop()
        if self._up:
            self._up = False
            log.warning("syncmap stream reader of %s lost its connection (%s); reconnecting",
                        self._feed.stream, exc)  # fmt: skip
            self._call(self._handler.on_down)
        else:
            log.debug("syncmap stream reader of %s: reconnect failed (%s)", self._feed.stream, exc)
        self._plan = None
        await asyncio.sleep(self._backoff)  # reconnect back-off, not a wait for data
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.disconnect(nowait=True)  # nowait: never suspends, so never cut short

    @staticmethod
    def _call(fn: Callable[..., None], *args: Any) -> None:
        """Run a callback of the handler; its failure must not stop the reader."""
        try:
            fn(*args)
        except Exception:
            log.exception("syncmap: a stream subscriber's handler failed")


# ---- Redis round trips on a reader's own connection -------------------------------------------


async def check_resume(conn: Conn, stream: str, last: str, same_server: bool) -> tuple[str, bool]:
    """Ask the stream what :func:`~.streamlog.resume_point` needs, and answer it."""
    kept = last != ZERO and bool(await _command(conn, "XRANGE", stream, last, last))
    info = None if kept else await _stream_info(conn, stream)
    return resume_point(last, kept, info, same_server)


async def _command(conn: Conn, *args: Any) -> Any:
    """Send one command on ``conn`` and read its reply (socket timeout: ``READ_TIMEOUT``).

    No await between the check and ``send_command``'s own: a closed connection is an error
    here, never reopened behind the reader's back."""
    if not conn.is_connected:
        raise redis.ConnectionError("the stream reader's connection was closed")
    await conn.send_command(*args, check_health=False)
    return await conn.read_response()


async def _stream_info(conn: Conn, stream: str) -> StreamInfo | None:
    try:
        return stream_info(await _command(conn, "XINFO", "STREAM", stream))
    except redis.ResponseError as exc:
        if is_no_such_key(exc):
            return None
        raise


async def _run_id(conn: Conn) -> str | None:
    try:
        return run_id_of(await _command(conn, "INFO", "server"))
    except redis.ResponseError:  # an ACL may refuse INFO: restarts then go unnoticed
        return None
