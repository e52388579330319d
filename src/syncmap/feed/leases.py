"""PING leases on a subscriber connection: the logic both readers share (``pubsub.py`` for
threads, ``apubsub.py`` for asyncio; on a Cluster each per-node reader of ``sharded.py`` and
``asharded.py``).  No I/O: a reader asks this book what to send and what to call, sends it, and
runs the calls (docs/design.md, "PING leases").

The proof it serves: the write scripts publish in the same atomic step as the write, on a
channel this connection subscribes; Redis answers one connection's commands in order and writes
a published message to the subscriber's socket when the script runs.  So the reply to a
``PING <nonce>`` sent at ``T`` arrives after every message of a write acknowledged before ``T``,
and, the reader dispatching in order, after that message was applied: the buckets the
connection carries may be renewed to ``T + Δ``.  Which buckets that is, is the reader's to say
(:class:`Target`): on one Redis, every bucket of every map whose channel is confirmed on this
connection (``bucket`` None); on a Cluster, the buckets whose channel is confirmed on this
node's connection, one target per bucket.

What publishes nothing is told by ``CLIENT TRACKING on REDIRECT <own id> BCAST PREFIX ...`` on
the same connection (RESP2: the notices are messages on ``__redis__:invalidate``, in order with
the change messages and the PONGs).  On a Cluster the node tracks the keys it holds, so each
node's connection reports the changes of that node.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

INVALIDATE = b"__redis__:invalidate"  # where CLIENT TRACKING's REDIRECT target gets notices
RECHECK = 0.05
"""A connection that tracks keys but has no confirmed lease to vouch for yet (just connected:
the confirmations are on their way) looks again this soon.  Waiting a whole read slice there
made every map probe for up to a second after each reconnect (its vouches counted as late)."""
Calls = list[tuple[Callable[..., None], tuple[Any, ...]]]  # callbacks to run, in order


@dataclass(slots=True, eq=False)
class Lease:
    """What a map asks of the subscriber for PING leases.

    ``prefix``: the start of the map's data keys (``ns:{name:``), tracked with ``CLIENT TRACKING
    ... BCAST``, so a change that publishes nothing (FLUSHALL, a write around the scripts, an
    eviction) is told in order with the messages: ``on_touched(bucket)`` (None: the database was
    flushed).  ``on_vouch(sent_at, buckets)``: a PING sent at ``sent_at`` was answered after
    every message before it on a connection carrying ``buckets`` (None: every bucket).
    ``every``: the map wants a PING at least this often (Δ/4) while it is read.  ``pong=False``
    is the control (``Guards.pong``): vouch when the PING is *sent*, which a silent feed must
    catch.

    Idle leases (``idle_every`` > 0, docs/design.md "Idle maps"): a map nobody has read since
    ``busy_until`` wants a PING only every ``idle_every`` (its leases lapse in between, its
    entries are held, and each idle PING's answer revalidates them), and the first read after
    that calls every reader in ``wakers`` (``Subscriber.vouch_soon``: a PING at once, and the
    busy pace from then on).  Only the map's own threads write ``busy_until``/``busy_since``;
    readers only read them (a float each, never torn)."""

    prefix: bytes
    every: float
    on_vouch: Callable[[float, Collection[int] | None], None]
    on_touched: Callable[[int | None], None]
    pong: bool = True
    idle_every: float = 0.0  # 0: never idle (every Δ/4, read or not)
    busy_until: float = -float("inf")
    busy_since: float = -float("inf")
    wakers: set[Callable[[], None]] = field(default_factory=set)

    def every_at(self, now: float) -> float:
        """How often this map wants a vouch PING at ``now``: ``every`` while it is read."""
        idle = self.idle_every and now >= self.busy_until
        return self.idle_every if idle else self.every


Target = tuple[Lease, int | None]
"""A lease and the bucket a connection carries for it (None: every bucket of the map)."""


def track_command(client_id: Any, prefixes: Iterable[bytes]) -> list[Any]:
    """``CLIENT TRACKING`` in broadcast mode for ``prefixes``, redirected to ``client_id`` (the
    subscriber connection's own id: RESP2 notices then arrive on ``__redis__:invalidate``)."""
    args: list[Any] = ["CLIENT", "TRACKING", "on", "REDIRECT", client_id, "BCAST"]
    for prefix in prefixes:
        args += ["PREFIX", prefix]
    return args


def tracked_prefix(prefix: bytes) -> bytes:
    """What a connection tracks for a map's data-key ``prefix`` (``ns:{name:``): its whole
    namespace, ``ns:{``.  So every map of a namespace is covered by the first one's tracking,
    and a map opened after the subscriber connected needs no reconnect to be tracked (a
    reconnect loses the messages of its window, which costs the buckets written meanwhile).
    The price: the notices of every map of the namespace reach every subscriber of it (one
    per changed data hash per event-loop turn); notices of maps a process does not hold are
    dropped (:meth:`LeaseBook.notice` matches the exact map prefix)."""
    brace = prefix.find(b"{")
    return prefix if brace < 0 else prefix[: brace + 1]


def channel_namespace(channel: bytes) -> bytes | None:
    """The namespace prefix (``ns:{``) a subscriber connection tracks for ``channel`` of the
    namespaced layout (a map's ``ns:{name}:ch``, a bucket's, a lock's ``ns:{lock:x}:ch``),
    whether or not that channel's handler holds a lease; None for a channel of no namespace.

    Why every channel, not only leased maps': a connection first opened for a lock or a map
    without leases would otherwise track nothing, and a leased map attached later would make
    it reconnect to track (a subscribed RESP2 connection cannot send CLIENT TRACKING).  That
    reconnect drops every channel of the process for a moment: its window's messages are
    lost (each map then repairs by probing) and a forked child's parent saw its connection
    closed under it (S26-cluster).  Tracking the namespace from the start costs the notices
    of its maps' keys on that connection, which a process without leased maps drops."""
    brace = channel.find(b"{")
    return None if brace < 0 else channel[: brace + 1]


class LeaseBook:
    """One connection's PING leases: the prefixes tracked on it, the vouch PINGs awaiting
    their answer.  Reset on every (re)connect (:meth:`connected`)."""

    def __init__(self) -> None:
        self.tracked: frozenset[bytes] | None = None  # None: nothing tracked, no vouch
        self._pings: deque[tuple[bytes, float]] = deque()
        self._nonces = itertools.count(1)

    def connected(self, tracked: frozenset[bytes] | None) -> None:
        """A new connection, tracking ``tracked`` (None: refused or not asked)."""
        self.tracked = None if tracked is None else frozenset(tracked_prefix(p) for p in tracked)
        self._pings.clear()

    def covers(self, lease: Lease | None) -> bool:
        return (
            lease is not None
            and self.tracked is not None
            and tracked_prefix(lease.prefix) in self.tracked
        )

    def needs_retrack(self, lease: Lease | None) -> bool:
        """A map attached with a prefix this connection does not track (it tracks some)."""
        return lease is not None and self.tracked is not None and not self.covers(lease)

    def every(self, targets: Iterable[Target], now: float) -> float:
        """How often to send a vouch PING at ``now``: the shortest a covered lease asks (a
        read map's Δ/4, an idle one's ``idle_every``); 0: none."""
        return min((lease.every_at(now) for lease, _ in targets if self.covers(lease)),
                   default=0.0)  # fmt: skip

    def ping(self, now: float, targets: Iterable[Target]) -> tuple[bytes, Calls]:
        """The nonce of the next vouch PING (sent at ``now``), and the control's calls: with
        ``pong=False`` a lease is vouched at once, without waiting for the answer."""
        nonce = b"v%d" % next(self._nonces)
        self._pings.append((nonce, now))
        return nonce, self._vouches(now, targets, pong=False)

    def overdue(self, now: float, after: float) -> bool:
        """The oldest vouch PING has waited more than ``after`` seconds for its answer."""
        return bool(self._pings) and now - self._pings[0][1] > after

    def pong(self, nonce: bytes, targets: Iterable[Target]) -> Calls:
        """The answer to ``nonce``: the vouches it makes (none for a keep-alive PING's answer,
        or one of a connection before this one).  Older PINGs still unanswered are dropped:
        Redis answers in order, so theirs were lost with nothing to vouch."""
        if all(n != nonce for n, _ in self._pings):
            return []
        while self._pings:
            n, sent_at = self._pings.popleft()
            if n == nonce:
                return self._vouches(sent_at, targets, pong=True)
        return []  # unreachable: the nonce was found above

    def _vouches(self, sent_at: float, targets: Iterable[Target], *, pong: bool) -> Calls:
        """One ``on_vouch`` per lease, with the union of its buckets (None if any is)."""
        buckets: dict[int, tuple[Lease, set[int] | None]] = {}
        for lease, bucket in targets:
            if lease.pong != pong or not self.covers(lease):
                continue
            _, held = buckets.setdefault(id(lease), (lease, set()))
            if bucket is None:
                buckets[id(lease)] = (lease, None)
            elif held is not None:
                held.add(bucket)
        return [(lease.on_vouch, (sent_at, None if held is None else sorted(held)))
                for lease, held in buckets.values()]  # fmt: skip

    def notice(self, data: Any, targets: Iterable[Target]) -> Calls:
        """A tracking notice: None (FLUSHALL/FLUSHDB) or the keys changed.  Only a data hash
        (``ns:{name:b}:d``) is a map's data; other keys under a prefix (a lock's) are not.
        One call per lease and bucket, whichever bucket the connection carries for it: a
        notice on a Cluster node for a bucket carried elsewhere (a slot migrating) counts too."""
        leases = list({id(lease): lease for lease, _ in targets if self.covers(lease)}.values())
        if data is None:
            return [(lease.on_touched, (None,)) for lease in leases]
        calls: Calls = []
        for key in data:
            close = key.rfind(b"}")
            if close < 0 or key[close:] != b"}:d":
                continue
            inner = key[:close]
            colon = inner.rfind(b":")
            prefix, bucket = inner[: colon + 1], inner[colon + 1 :]
            if bucket.isdigit():
                calls += [(lease.on_touched, (int(bucket),)) for lease in leases
                          if lease.prefix == prefix]  # fmt: skip
        return calls
