"""Replaying a bucket's change log on a Redis Cluster (target ``!S``): the pure decision, no I/O.

With a ``redis+stream://`` feed on the store's own Redis Cluster, every write script of a bucket
``SPUBLISH``es its change message on ``<tag>:ch`` *and* ``XADD``s it to ``<tag>:log``, both in
the bucket's slot, in the write's atomic step (``store/scripts.py``, ``publish``).  Live delivery
stays the sharded subscriber (``redis_sharded.py``); the log is read only when a bucket's channel
comes back after a loss (its master's subscriber connection cut, the channel moved after a slot
migration or Redis's own ``sunsubscribe``), to **replay** what the server missed instead of
flushing the bucket.

Order of events (why the log and the live channel together cover every write):

1. the channel's re-``SSUBSCRIBE`` is confirmed (``on_up`` of its placement): every write whose
   ``SPUBLISH`` runs from now on reaches us live;
2. then one round trip to the bucket's master reads its ``#e``/``#s`` (``HMGET``) and the
   newest page of the log (``XREVRANGE``), older pages after it if needed: every write that
   ran before step 1 is in the log, unless trimmed;
3. the newer entries are applied oldest first through the live path (``FeedHandler.on_message``:
   the MAC check, the core's gap and epoch rules), then the live messages that arrived during
   steps 2-3, held by ``ChannelSet`` until then.

Live and replayed messages overlap (a write between 1 and 2 is in both): the near cache ignores a
message whose versions it already accounted for (``NearCache._sequence``: ``last_seq <= seq``).
On an ordered feed a live message *ahead* of the replay would look like a gap, hence the hold.

**When the log covers the gap** (:meth:`Scan.verdict`): the bucket's store state is the cached
one (nothing to replay), or the entries newer than the cached sequence are all of the cached
epoch, continue it without a hole (each message's first version follows the previous one's
last), and reach the store's sequence read in step 2.  Otherwise (trimmed past the cached
sequence, the log missing or younger than the bucket, another epoch, an entry we cannot read,
more than :data:`MAX_REPLAY` entries to apply) the bucket is left to the flush a lost channel
always caused (``NearCache.on_feed_up``).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..core.wire import ChangeMessage, decode_message
from ..errors import ConfigurationError, CorruptData
from ..flows.effects import Call
from ..keys import Layout
from ..store.executor import Command
from .base import redact
from .streamlog import field_m, maxlen_of

PAGE = 256
"""Log entries read per round trip (``XREVRANGE ... COUNT``)."""
MAX_REPLAY = 4096
"""Most entries one bucket replays; a longer gap costs more to replay than to flush."""

UNREADABLE = "an unreadable entry"  # not ours, corrupt, or oversized (versions unknown)
TOO_LONG = "too long"
Position = tuple[int | None, int]
"""Where a server stands in a bucket: (epoch, seq), as its near cache accounts for it."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether the log covers a bucket's gap, and the messages to apply (oldest first)."""

    covered: bool
    messages: list[bytes]
    why: str  # a few words for logs and tests


@dataclass(slots=True)
class Scan:
    """The log read newest first, page after page, until the cached sequence is reached."""

    cached: Position
    store: Position
    newer: list[tuple[ChangeMessage, bytes]] = field(default_factory=list)  # newest first
    stopped: str = ""  # why the walk ended early ("" while it may go on)

    def add(self, page: list[Any]) -> str | None:
        """Take one ``XREVRANGE`` page; returns the ID to read on from (exclusive), or None
        when the walk is over (``stopped`` says why)."""
        for _, fields in page:
            self.stopped = self._take(field_m(fields))
            if self.stopped:
                return None
        if len(page) < PAGE:
            self.stopped = "the log's start"
            return None
        last = page[-1][0]
        return last.decode() if isinstance(last, bytes) else str(last)

    def _take(self, data: bytes | None) -> str:
        """One entry, newest first: kept if newer than the cached sequence; else why to stop."""
        try:
            if data is None:
                raise CorruptData("a log entry without an 'm' field")
            msg = decode_message(data)
        except CorruptData:
            return UNREADABLE
        if msg.oversized:  # its keys were skipped: the versions it spans are unknown
            return UNREADABLE
        if msg.epoch != self.store[0]:
            return "another epoch"  # the store's epoch began after this entry
        if msg.last_seq <= self.cached[1]:
            return "reached"
        self.newer.append((msg, data))
        return TOO_LONG if len(self.newer) > MAX_REPLAY else ""

    def verdict(self) -> Verdict:
        why = self._cannot_cover()
        if why:
            return Verdict(False, [], why)
        return Verdict(True, [data for _, data in reversed(self.newer)], "replayed")

    def _cannot_cover(self) -> str:
        """Why the entries read do not cover the gap ("" when they do: module docstring)."""
        (c_epoch, c_seq), (s_epoch, s_seq) = self.cached, self.store
        refused = (
            (self.stopped in (UNREADABLE, TOO_LONG), self.stopped),
            (c_epoch is not None and c_epoch != s_epoch, "another epoch"),
            (c_epoch is None and c_seq != 0, "no epoch cached"),
            (s_seq < c_seq, "the store went backwards"),
        )
        for failed, why in refused:
            if failed:
                return why
        expect = c_seq + 1
        for msg, _ in reversed(self.newer):
            if msg.seq > expect:  # trimmed past us, or a write that left no entry
                return "trimmed" if expect == c_seq + 1 else "a hole"
            expect = max(expect, msg.last_seq + 1)
        if expect - 1 < s_seq:
            return "the log lacks writes the store has"
        return ""


def store_position(reply: Any) -> Position | None:
    """The ``HMGET <tag>:d #e #s`` reply; None: the bucket has no epoch (missing, evicted)."""
    epoch, seq = reply
    if epoch is None:
        return None
    return int(epoch), int(seq or 0)


def first_commands(layout: Layout, bucket: int) -> list[Command]:
    return [("HMGET", layout.data(bucket), "#e", "#s"),
            ("XREVRANGE", layout.bucket_log(bucket), "+", "-", "COUNT", PAGE)]  # fmt: skip


def replay_flow(layout: Layout, bucket: int, cached: Position) -> Generator[Call, Any, Verdict]:
    """Read what ``bucket``'s log holds past ``cached`` (a flow: ``sync.run``/``aio.run``
    drive it, reading from the bucket's master).  Run it only after the bucket's channel is
    confirmed subscribed again (module docstring)."""
    replies = yield Call(first_commands(layout, bucket), write=False)
    store = store_position(replies[0])
    if store is None:
        return Verdict(False, [], "the bucket is gone")
    if store == cached:
        return Verdict(True, [], "nothing missed")
    scan = Scan(cached, store)
    page = replies[1]
    while (after := scan.add(page)) is not None:
        (page,) = yield Call(
            [("XREVRANGE", layout.bucket_log(bucket), f"({after}", "-", "COUNT", PAGE)],
            write=False,
        )
    return scan.verdict()


# ---- which URL asks for it -------------------------------------------------------------------


def cluster_stream_maxlen(url: str, nodes: Callable[[], Iterable[str]]) -> int | None:
    """The ``maxlen`` of the per-bucket stream route, if ``url`` asks for it on a map whose
    store is a Redis Cluster; None: ``url`` names another feed (relayed, as before).

    ``redis+stream://`` (or ``rediss+stream://``) **without a host**, e.g.
    ``redis+stream://?maxlen=1000``, names the store's own cluster: the logs live next to the
    buckets and go through the store's connections (so the store URL's TLS and credentials
    apply).  A URL naming one of the cluster's own nodes (``nodes()``: every master and replica
    of the slot map) is refused: a map-wide stream on one node of a cluster cannot be written
    in a bucket's script (another slot), and relayed to that node it would be refused with
    MOVED by every node but one.  Any other host is a Redis of its own: relayed, as any feed."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("redis+stream", "rediss+stream"):
        return None
    if not parts.hostname:
        return maxlen_of(url)
    address = f"{parts.hostname}:{parts.port or 6379}"
    if address in set(nodes()):
        raise ConfigurationError(
            f"feed URL {redact(url)!r} names a node of the map's own Redis Cluster: write "
            "redis+stream:// without a host (e.g. 'redis+stream://?maxlen=10000') for the "
            "stream route of a Cluster, a log per bucket in its own slot (docs/feeds.md)"
        )
    return None


def nodes_of(topology: Any) -> list[str]:
    """Every master and replica address of a ``ClusterTopology``'s slot map (reads it)."""
    nodes: list[str] = []
    for master, about in topology.describe().items():
        nodes += [master, *about["replicas"]]
    return nodes
