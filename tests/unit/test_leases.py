"""PING leases on a subscriber connection (``syncmap.feed.leases``) and which buckets a Cluster
node's PONG may renew (``ShardedCore.lease_targets``), fed exact orders of events.  The real
readers on real servers: tests/scenarios (S07/S08/S09, their Cluster and asyncio forms)."""

from __future__ import annotations

import threading
from collections.abc import Collection
from typing import Any

import pytest

from syncmap.feed.leases import Lease, LeaseBook, Target
from syncmap.feed.pubsub import Handler
from syncmap.feed.shards import ShardedCore

PREFIX = b"ns:{m:"


class Map:
    """A map's lease callbacks, recorded."""

    def __init__(self, prefix: bytes = PREFIX, *, pong: bool = True) -> None:
        self.vouches: list[tuple[float, list[int] | None]] = []
        self.touched: list[int | None] = []
        self.lease = Lease(prefix, 0.25, self.vouch, self.touched.append, pong=pong)

    def vouch(self, sent_at: float, buckets: Collection[int] | None) -> None:
        self.vouches.append((sent_at, None if buckets is None else list(buckets)))


def run(calls: list[Any]) -> None:
    for fn, args in calls:
        fn(*args)


def test_a_pong_vouches_each_map_once_for_the_buckets_its_connection_carries() -> None:
    book, a, b = LeaseBook(), Map(), Map(b"ns:{other:")
    book.connected(frozenset({PREFIX, b"ns:{other:"}))
    targets: list[Target] = [(a.lease, 3), (a.lease, 0), (b.lease, None)]
    nonce, now = book.ping(5.0, targets)
    assert now == []  # nothing vouched before the answer
    run(book.pong(nonce, targets))
    assert a.vouches == [(5.0, [0, 3])] and b.vouches == [(5.0, None)]


def test_only_the_answer_to_a_vouch_ping_vouches_and_older_pings_are_dropped() -> None:
    book, a = LeaseBook(), Map()
    book.connected(frozenset({PREFIX}))
    targets: list[Target] = [(a.lease, None)]
    first, _ = book.ping(1.0, targets)
    second, _ = book.ping(2.0, targets)
    run(book.pong(b"", targets))  # the keep-alive PING's answer
    assert a.vouches == []
    run(book.pong(second, targets))  # the first one's answer was lost: it vouches nothing
    run(book.pong(first, targets))
    assert a.vouches == [(2.0, None)]
    assert not book.overdue(100.0, 1.0)


def test_a_map_whose_prefix_is_not_tracked_is_never_vouched() -> None:
    """Tracking covers a whole namespace (``ns:{``): a map of another namespace is not."""
    book, a = LeaseBook(), Map()
    book.connected(frozenset({b"other:{m:"}))
    nonce, _ = book.ping(1.0, [(a.lease, None)])
    run(book.pong(nonce, [(a.lease, None)]))
    assert a.vouches == [] and book.needs_retrack(a.lease)
    book.connected(None)  # CLIENT TRACKING refused: no vouch, no retrack
    assert not book.needs_retrack(a.lease) and book.every([(a.lease, None)], 0.0) == 0.0


def test_the_pong_control_vouches_when_the_ping_is_sent() -> None:
    """Guards(pong=False): the control S08 must catch."""
    book, a = LeaseBook(), Map(pong=False)
    book.connected(frozenset({PREFIX}))
    nonce, calls = book.ping(7.0, [(a.lease, 2)])
    run(calls)
    run(book.pong(nonce, [(a.lease, 2)]))
    assert a.vouches == [(7.0, [2])]


def test_notices_name_data_hashes_only_and_a_flush_touches_every_map() -> None:
    book, a, b = LeaseBook(), Map(), Map(b"ns:{other:")
    book.connected(frozenset({PREFIX, b"ns:{other:"}))
    targets: list[Target] = [(a.lease, 1), (a.lease, 2), (b.lease, None)]
    run(book.notice([b"ns:{m:7}:d", b"ns:{m:7}:t", b"ns:{m}:lock", b"ns:{other:0}:d"], targets))
    assert a.touched == [7] and b.touched == [0]  # once per map, whatever it carries here
    run(book.notice(None, targets))
    assert a.touched == [7, None] and b.touched == [0, None]


class Core(ShardedCore[Any]):
    """The sharded core with in-process nodes (as tests/unit/test_sharded_core.py)."""

    def __init__(self) -> None:
        super().__init__(None, threading.Lock())  # type: ignore[arg-type]  # no I/O here
        self.attached: dict[str, dict[bytes, list[Handler]]] = {}

    def _open_node(self, address: str) -> Any:
        core = self

        class Node:
            def attach(self, channel: str, handler: Handler) -> None:
                core.attached.setdefault(address, {}).setdefault(channel.encode(), []).append(
                    handler
                )

            def release(self, channel: str, handler: Handler, *, unsubscribe: bool = True) -> bool:
                core.attached[address][channel.encode()].remove(handler)
                return False

        return Node()

    def _wake(self) -> None:
        pass

    def place(self, name: str, address: str) -> None:
        self._rehome({self._channels[name].slot: address})
        inner = self._channels[name].inner
        assert inner is not None
        inner.up = True  # the node's confirmation
        inner.on_up()


def _every_leased_handler(self: ShardedCore[Any], attached: Any) -> list[Target]:
    """The control: vouch every leased handler of the map, as one Redis's subscriber does."""
    return [(h.lease, h.bucket) for c in self._channels.values() for h in c.handlers
            if h.lease is not None]  # fmt: skip


@pytest.mark.parametrize("guarded", [True, False], ids=["guarded", "control"])
def test_a_node_pong_renews_only_the_buckets_whose_channels_it_carries(
    guarded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Buckets 0 and 1 on node A, bucket 2 on B; then bucket 1's slot moves to B, confirmed
    there, and A answers a PING sent before the move.  A vouches bucket 0 only: bucket 1's
    messages now come on B's connection, in no order with A's PONG.  Control: vouching every
    bucket of the map (one Redis's rule) renews bucket 1 and bucket 2 from A."""
    if not guarded:
        monkeypatch.setattr(ShardedCore, "lease_targets", _every_leased_handler)
    core, m = Core(), Map()
    for i in range(3):
        handler = Handler(lambda _d: None, lambda: None, lambda: None, lease=m.lease, bucket=i)
        core._added(core._add(f"ns:{{m:{i}}}:ch", handler))
    core.place("ns:{m:0}:ch", "a:1")
    core.place("ns:{m:1}:ch", "a:1")
    core.place("ns:{m:2}:ch", "b:2")
    book = LeaseBook()
    book.connected(frozenset({PREFIX}))
    nonce, _ = book.ping(3.0, core.lease_targets(core.attached["a:1"]))
    core.place("ns:{m:1}:ch", "b:2")  # moved after the PING was sent, before its answer
    core.deliver(book.pong(nonce, core.lease_targets(core.attached["a:1"])))
    if guarded:
        assert m.vouches == [(3.0, [0])]
    else:
        assert m.vouches == [(3.0, [0, 1, 2])], "control: A vouched buckets it does not carry"


def test_one_map_tracked_covers_every_map_of_its_namespace() -> None:
    """A map attached after the connection needs no reconnect if its namespace is tracked."""
    book, a = LeaseBook(), Map()
    book.connected(frozenset({b"ns:{another-map:"}))
    assert book.tracked == frozenset({b"ns:{"})
    assert book.covers(a.lease) and not book.needs_retrack(a.lease)
