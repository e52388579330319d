"""``redis+stream://`` feed: one Redis Stream per map, a durable log on Redis itself.

URL: ``redis+stream://[user:password@]host:port/db?maxlen=N`` (``rediss+stream://`` for TLS).
Without ``+stream`` it is the URL redis-py is given; ``maxlen`` (default 100 000, ``0`` = never
trim) is taken out first, because redis-py hands unknown query options to every connection.

**The entry layout.**  The store-mode write scripts XADD the very same thing from Lua
(``store/scripts.py``, ``publish``), in the same atomic step as the write, so the two must agree::

    XADD <stream> MAXLEN ~ <maxlen> * m <payload>      (maxlen > 0)
    XADD <stream> * m <payload>                         (maxlen = 0)

One field, named ``m``, holding the message; the key is ``<namespace>:{<name>}:log``
(``keys.Layout.stream``).  ``MAXLEN ~`` trims whole radix-tree nodes only, so the stream keeps
at least ``maxlen`` entries, often about a hundred more.  An entry without an ``m`` field is not
ours: it is logged and skipped.  A position is an entry ID (``"1718000000000-3"``).

**Subscribing.**  A thread per subscription, on a connection of its own, reads ``XREAD BLOCK``
after the last ID it delivered.  ``start=None`` means "after the newest entry", read inside
``subscribe()`` before it returns: never ``$`` in the loop, which would skip whatever was added
between ``subscribe()`` and the first read (DESIGN §6).  ``subscribe()`` also does the first
connection and the first gap check itself, so a refused connection, a bad password or a key that
is not a stream fails it loudly instead of a thread retrying in silence.

**What ``on_up(resumed)`` says**, at the first connection and after every reconnect: whether every
entry after the ID the reader goes on from (the ``start``, or the last delivered entry) is still
in the stream.  Trimming removes the oldest entries first, so that holds when that entry itself
is still there (``XRANGE id id``).  Otherwise ``XINFO STREAM`` decides (:func:`resume_point`):

* nothing read yet (``start`` was :data:`BEGINNING`, or the stream was empty): ``True`` if the
  stream never lost an entry (``entries-added == length``, Redis 7.0+; an older Redis cannot tell,
  so ``False`` once the stream holds anything) and the server is the same process as at the
  previous connection (``run_id``: a restarted server may have lost what it held);
* the stream is gone, or its newest ID is below ours (IDs went backwards: deleted and made anew,
  as by a Redis restarted without persistence): ``False``, and the new stream is read from its
  first entry;
* trimmed past us (its first entry is newer, a gap past ``maxlen``): ``False``; reading on from our
  ID then delivers every entry there is;
* our entry is gone but older ones are there: deleted by XDEL (``max-deleted-entry-id`` is at or
  past it): ``False``, read on; otherwise a stream made anew whose IDs overlap ours: ``False``,
  read it from its first entry (a repeated message harms nothing, a skipped one would).

``max-deleted-entry-id`` is no help for trimming: Redis 7.0 leaves it at ``0-0`` when MAXLEN trims.
The first ``on_up`` for ``start=None`` is ``True``: nothing after the newest entry can have been
lost yet (as on the other durable feeds; a store-mode map probes at start-up whatever it is told).

**Staying alive.**  Every failure of the reader, whatever it is, counts as a lost connection:
``on_down``, then reconnect with a back-off of 0.05 s doubling to 1 s (waited on the stop event),
check for a gap, ``on_up``.  A stalled connection (a paused server, a dropped route) is found by
the socket timeout, a little above the BLOCK time, so a silent socket raises.  A handler that
raises is logged and the reader goes on.  Limits: an ACL that refuses ``INFO`` hides restarts from
the ``run_id`` check (it matters only before the first delivery); a Redis that loses acknowledged
writes (``appendfsync everysec`` and a crash) can lose entries after the one we hold, unseen.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, NoReturn

import redis

from ..store.topology import Topology
from .base import BEGINNING, FeedHandler, Subscription
from .redis_base import RedisFeed
from .streamlog import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    DEFAULT_MAXLEN,
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

__all__ = ["DEFAULT_MAXLEN", "ZERO", "RedisStreamFeed", "StreamInfo", "resume_point"]
Conn = Any  # a redis-py Connection made with once=True (see _command)


class RedisStreamFeed(RedisFeed):
    scheme = "redis+stream"
    durable = True
    ordering = "total"  # one stream: one sequence of IDs
    compacted = False  # trimmed by count, not per key

    @classmethod
    def topic_for(cls, namespace: str, name: str) -> str:
        return f"{namespace}:{{{name}}}:log"

    def __init__(
        self, url: str, topic: str, *, timeout: float = 5.0, topology: Topology | None = None
    ) -> None:
        redis_url, self.maxlen = split_url(url) if topology is None else (None, maxlen_of(url))
        super().__init__(url, topic, timeout=timeout, topology=topology, redis_url=redis_url)

    @property
    def stream(self) -> str:
        """The stream's key (the topic)."""
        return self.topic

    def publish(self, payload: bytes, key: bytes | None = None, *, confirm: bool = True) -> None:
        # ``key`` is not used: a stream trims by count, it does not compact per key.
        self._call(xadd(self.stream, self.maxlen, payload), write=True)

    def position(self) -> str | None:
        return newest(self._call(newest_command(self.stream), write=False))

    def subscribe(self, handler: FeedHandler, start: str | None = None) -> Subscription:
        check_start(start)
        try:
            conn, run_id = self._connect_reader()
        except Exception as exc:
            self._raise_subscribe_error(exc)
        try:
            # Order: the newest ID is read here, before subscribe() returns; an entry added after
            # this read has a larger ID, so the reader (XREAD after that ID) delivers it.
            if start is None:
                plan = (newest(_command(conn, *newest_command(self.stream))) or ZERO, True)
            else:
                plan = check_resume(conn, self.stream, ZERO if start == BEGINNING else start, True)
        except Exception as exc:
            conn.disconnect()
            self._raise_subscribe_error(exc)
        sub = _StreamSubscription(self, handler, conn, run_id, plan)
        self._keep(sub)
        sub.start()
        return sub

    # ---- connections -------------------------------------------------------------------------

    def _connect_reader(self) -> tuple[Conn, str | None]:
        """A new connection for a reader, and the server's ``run_id``."""
        # No retries, no silent reconnect (Endpoint.connection): a drop must reach the reader,
        # which checks for a gap.  Sentinel: the master is resolved here after a change.
        conn = self.topology.endpoint().connection(
            timeout=READ_TIMEOUT, connect_timeout=self.timeout, once=True
        )
        try:
            conn.connect()
            return conn, _run_id(conn)
        except BaseException:
            conn.disconnect()
            raise

    def _raise_subscribe_error(self, exc: Exception) -> NoReturn:
        """Raise ``exc`` in the feed's terms: fix the settings, or retry later."""
        raise_subscribe_error(self.describe(), self.stream, exc)

    def _forget(self, sub: _StreamSubscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)


class _StreamSubscription(Subscription):
    """One reader thread and its connection; every callback of the handler runs on the thread.

    ``_last`` (the ID the next XREAD reads after), ``_run_id``, ``_up`` and ``_backoff`` belong to
    the thread once it runs.  ``_conn`` is shared with :meth:`close` under ``_lock``.
    """

    def __init__(
        self,
        feed: RedisStreamFeed,
        handler: FeedHandler,
        conn: Conn,
        run_id: str | None,
        plan: tuple[str, bool],
    ) -> None:
        self._feed, self._handler = feed, handler
        self._conn: Conn | None = conn
        self._run_id = run_id
        self._plan: tuple[str, bool] | None = plan  # the first on_up, decided in subscribe()
        self._last = plan[0]
        self._same_server = True  # run_id unchanged since the previous connection
        self._up = False
        self._backoff = BACKOFF_MIN
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="syncmap-stream", daemon=True)

    def start(self) -> None:
        self._feed.topology.on_change(self._master_changed)
        self._thread.start()

    def _master_changed(self) -> None:
        """The topology names another master: drop the connection; the reader reconnects
        there and checks for a gap (on_down, then on_up(resumed))."""
        self._drop()

    def close(self) -> None:
        self._feed.topology.remove_listener(self._master_changed)
        self._stop.set()
        self._drop()  # wakes a reader blocked in XREAD at once
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            self._thread.join(timeout=READ_TIMEOUT + 1.0)
        self._feed._forget(self)

    # ---- the reader thread -------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._plan is None:  # after a failure: a new connection, a new gap check
                    conn = self._reconnect()
                    plan = self._check(conn)
                else:  # the connection and the check subscribe() made
                    conn, plan, self._plan = self._conn, self._plan, None
                self._last, resumed = plan
                if self._stop.is_set():
                    break
                self._up = True
                self._call(self._handler.on_up, resumed)
                self._read(conn)
            except Exception as exc:  # every failure is a lost connection; the thread lives on
                if self._stop.is_set():
                    break
                self._lost(exc)
        self._drop()

    def _reconnect(self) -> Conn:
        conn, run_id = self._feed._connect_reader()
        with self._lock:
            # Order against close(): it sets _stop, then takes _conn under this lock.  Either it
            # takes this connection, or we see _stop here; never a connection left open.
            if self._stop.is_set():
                conn.disconnect()
                raise redis.ConnectionError("closed")
            self._conn = conn
        self._same_server = run_id == self._run_id
        self._run_id = run_id
        return conn

    def _check(self, conn: Conn) -> tuple[str, bool]:
        return check_resume(conn, self._feed.stream, self._last, self._same_server)

    def _read(self, conn: Conn) -> None:
        stream = self._feed.stream
        while not self._stop.is_set():
            reply = _command(conn, *xread_command(stream, self._last))
            self._backoff = BACKOFF_MIN  # the connection serves reads: the next drop is new
            for _key, entries in reply or ():
                for raw_id, fields in entries:
                    if self._stop.is_set():  # closed meanwhile: deliver nothing more
                        return
                    self._last = raw_id.decode()
                    payload = field_m(fields)
                    if payload is None:
                        no_m_log("syncmap: entry %s of %s has no 'm' field; skipped",
                                  self._last, stream)  # fmt: skip
                        continue
                    self._call(self._handler.on_message, payload, self._last)

    def _lost(self, exc: Exception) -> None:
        """A failure: ``on_down`` once per drop, then wait out the back-off."""
        self._drop()
        if self._up:
            self._up = False
            log.warning("syncmap stream reader of %s lost its connection (%s); reconnecting",
                        self._feed.stream, exc)  # fmt: skip
            self._call(self._handler.on_down)
        else:
            log.debug("syncmap stream reader of %s: reconnect failed (%s)", self._feed.stream, exc)
        self._plan = None
        self._stop.wait(self._backoff)  # reconnect back-off, not a wait for data
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)

    def _drop(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.disconnect()

    @staticmethod
    def _call(fn: Callable[..., None], *args: Any) -> None:
        """Run a callback of the handler; its failure must not stop the reader."""
        try:
            fn(*args)
        except Exception:
            log.exception("syncmap: a stream subscriber's handler failed")


# ---- Redis round trips on a reader's own connection -------------------------------------------


def check_resume(conn: Conn, stream: str, last: str, same_server: bool) -> tuple[str, bool]:
    """Ask the stream what :func:`resume_point` needs, and answer it."""
    kept = last != ZERO and bool(_command(conn, "XRANGE", stream, last, last))
    info = None if kept else _stream_info(conn, stream)
    return resume_point(last, kept, info, same_server)


def _command(conn: Conn, *args: Any) -> Any:
    """Send one command on ``conn`` and read its reply.

    The reader must see every drop to check for a gap: a closed connection is an error here
    (and a connection made with ``once=True`` cannot be reopened behind our back either).
    """
    if not conn.is_connected:
        raise redis.ConnectionError("the stream reader's connection was closed")
    conn.send_command(*args, check_health=False)
    return conn.read_response()


def _stream_info(conn: Conn, stream: str) -> StreamInfo | None:
    try:
        return stream_info(_command(conn, "XINFO", "STREAM", stream))
    except redis.ResponseError as exc:
        if is_no_such_key(exc):
            return None
        raise


def _run_id(conn: Conn) -> str | None:
    try:
        return run_id_of(_command(conn, "INFO", "server"))
    except redis.ResponseError:  # an ACL may refuse INFO: restarts then go unnoticed (see top)
        return None
