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

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis

from ..errors import ConfigurationError
from ..ratelog import RateLimitedLog
from ..store.topology import Topology
from .base import (
    BEGINNING,
    FeedHandler,
    FeedUnavailable,
    Subscription,
    redact,
)
from .redis_base import RedisFeed

log = logging.getLogger("syncmap.feed")
_no_m_log = RateLimitedLog(log)  # anyone who can XADD could write a line per entry otherwise

DEFAULT_MAXLEN = 100_000
ZERO = "0-0"
_BLOCK_MS = 1000  # how long one XREAD waits: the bound on noticing close()
_READ_TIMEOUT = _BLOCK_MS / 1000 + 1.5  # socket timeout: an XREAD that outlives it is stalled
_COUNT = 512
_BACKOFF_MIN, _BACKOFF_MAX = 0.05, 1.0
_ID = re.compile(r"\d+-\d+")

StreamId = tuple[int, int]
Conn = Any  # a redis-py Connection made with once=True (see _command)


def parse_id(entry_id: str) -> StreamId:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """What ``XINFO STREAM`` tells about a stream; ``None`` fields: an older Redis omits them."""

    length: int
    last_generated: StreamId
    first_entry: StreamId | None
    entries_added: int | None = None
    max_deleted: StreamId | None = None


def resume_point(
    last: str, kept: bool, info: StreamInfo | None, same_server: bool
) -> tuple[str, bool]:
    """Where a reader goes on after ``last``, and whether it lost nothing (module docstring).

    ``kept``: the entry ``last`` is still in the stream; ``info``: the stream (``None``: no such
    key); ``same_server``: Redis's ``run_id`` did not change since the previous connection.
    """
    if last == ZERO:
        return ZERO, same_server and _never_lost_an_entry(info)
    if kept:
        return last, True
    return _read_on_from(last, info), False


def _never_lost_an_entry(info: StreamInfo | None) -> bool:
    if info is None:
        return True
    if info.entries_added is None:  # Redis < 7.0: only an untouched empty stream is sure
        return info.length == 0 and info.last_generated == (0, 0)
    return info.entries_added == info.length


def _read_on_from(last: str, info: StreamInfo | None) -> str:
    """Where to read after a gap behind ``last``, whose entry is no longer in the stream."""
    ours = parse_id(last)
    if info is None or info.last_generated < ours:
        return ZERO  # gone, or made anew: IDs went backwards
    if info.first_entry is None or info.first_entry > ours:
        return last  # trimmed past us: everything left is newer than ``last``
    if info.max_deleted is not None and info.max_deleted >= ours:
        return last  # our entry was deleted (XDEL) from this same stream
    return ZERO  # cannot tell the stream is the one we read: read all of it again


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
        redis_url, self.maxlen = _split_url(url) if topology is None else (None, _maxlen_of(url))
        super().__init__(url, topic, timeout=timeout, topology=topology, redis_url=redis_url)

    @property
    def stream(self) -> str:
        """The stream's key (the topic)."""
        return self.topic

    def publish(self, payload: bytes, key: bytes | None = None, *, confirm: bool = True) -> None:
        # ``key`` is not used: a stream trims by count, it does not compact per key.
        trim = ("MAXLEN", "~", self.maxlen) if self.maxlen else ()
        self._call(("XADD", self.stream, *trim, "*", "m", payload), write=True)

    def position(self) -> str | None:
        newest = self._call(("XREVRANGE", self.stream, "+", "-", "COUNT", 1), write=False)
        return _newest(newest)

    def subscribe(self, handler: FeedHandler, start: str | None = None) -> Subscription:
        if start is not None and start != BEGINNING and not _ID.fullmatch(start):
            raise ValueError(f"{start!r} is not a redis+stream:// position (an entry ID, 'ms-seq')")
        try:
            conn, run_id = self._connect_reader()
        except Exception as exc:
            self._raise_subscribe_error(exc)
        try:
            # Order: the newest ID is read here, before subscribe() returns; an entry added after
            # this read has a larger ID, so the reader (XREAD after that ID) delivers it.
            if start is None:
                plan = (_newest(_command(conn, "XREVRANGE", self.stream, "+", "-", "COUNT", 1))
                        or ZERO, True)  # fmt: skip
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
            timeout=_READ_TIMEOUT, connect_timeout=self.timeout, once=True
        )
        try:
            conn.connect()
            return conn, _run_id(conn)
        except BaseException:
            conn.disconnect()
            raise

    def _raise_subscribe_error(self, exc: Exception) -> NoReturn:
        """Raise ``exc`` in the feed's terms: fix the settings, or retry later."""
        if isinstance(exc, redis.AuthenticationError | redis.ResponseError):
            raise ConfigurationError(
                f"{self.describe()} refused to subscribe to {self.stream!r} ({exc}): check the "
                "credentials, that the ACL user may XREAD, XRANGE and XINFO the key, and that "
                "the key is a stream"
            ) from exc
        if isinstance(exc, redis.RedisError | OSError):
            raise FeedUnavailable(
                f"cannot subscribe on {self.describe()} ({exc}); nothing is subscribed: retry later"
            ) from exc
        raise exc

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
        self._backoff = _BACKOFF_MIN
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
            self._thread.join(timeout=_READ_TIMEOUT + 1.0)
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
            reply = _command(conn, "XREAD", "COUNT", _COUNT, "BLOCK", _BLOCK_MS,
                             "STREAMS", stream, self._last)  # fmt: skip
            self._backoff = _BACKOFF_MIN  # the connection serves reads: the next drop is new
            for _key, entries in reply or ():
                for raw_id, fields in entries:
                    if self._stop.is_set():  # closed meanwhile: deliver nothing more
                        return
                    self._last = raw_id.decode()
                    payload = _field_m(fields)
                    if payload is None:
                        _no_m_log("syncmap: entry %s of %s has no 'm' field; skipped",
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
        self._backoff = min(self._backoff * 2, _BACKOFF_MAX)

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
        reply = _command(conn, "XINFO", "STREAM", stream)
    except redis.ResponseError as exc:
        if "no such key" in str(exc).lower():
            return None
        raise
    fields = dict(zip(reply[::2], reply[1::2], strict=True))
    first = fields.get(b"first-entry")
    added, deleted = fields.get(b"entries-added"), fields.get(b"max-deleted-entry-id")
    return StreamInfo(
        length=int(fields[b"length"]),
        last_generated=parse_id(fields[b"last-generated-id"].decode()),
        first_entry=parse_id(first[0].decode()) if first else None,
        entries_added=None if added is None else int(added),
        max_deleted=None if deleted is None else parse_id(deleted.decode()),
    )


def _run_id(conn: Conn) -> str | None:
    try:
        info: bytes = _command(conn, "INFO", "server")
    except redis.ResponseError:  # an ACL may refuse INFO: restarts then go unnoticed (see top)
        return None
    for line in info.splitlines():
        if line.startswith(b"run_id:"):
            return line.removeprefix(b"run_id:").decode()
    return None


def _newest(reply: Any) -> str | None:
    """The ID of an ``XREVRANGE + - COUNT 1`` reply's entry (``None``: an empty stream)."""
    return reply[0][0].decode() if reply else None


def _field_m(fields: list[bytes]) -> bytes | None:
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == b"m":
            return fields[i + 1]
    return None


# ---- the URL ------------------------------------------------------------------------------------


def _split_url(url: str) -> tuple[str, int]:
    """(the Redis URL for redis-py, maxlen) of a ``redis+stream://`` URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower().removesuffix("+stream")
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "maxlen"]
    redis_url = parts._replace(scheme=scheme, query=urlencode(query)).geturl()
    return redis_url, _maxlen_of(url)


def _maxlen_of(url: str) -> int:
    values = [v for k, v in parse_qsl(urlsplit(url).query, keep_blank_values=True) if k == "maxlen"]
    if not values:
        return DEFAULT_MAXLEN
    if len(values) > 1 or not values[0].isdigit():
        raise ConfigurationError(
            f"feed URL {redact(url)!r}: maxlen must be one whole number >= 0 "
            f"(0 = never trim), not {values!r}"
        )
    return int(values[0])
