"""Replicated mode's merge rule (``core/replica.py``): pure, no I/O.

The property that makes replicated mode converge: any two servers that applied the same set of
messages, in any order and with any duplicates, hold the same map.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncmap.core.replica import (
    R_CLEAR,
    R_DEL,
    R_SET,
    HybridClock,
    Replica,
    ReplicaMessage,
    decode,
    encode,
)
from syncmap.errors import CorruptData
from syncmap.keys import encode_key


def m(op: int, hlc: int, origin: str = "a", key: str = "k", value: bytes = b"v") -> ReplicaMessage:
    field = b"" if op == R_CLEAR else encode_key(key, 100)
    return ReplicaMessage(op, hlc, origin, field, value if op == R_SET else b"")


def state(r: Replica) -> dict[object, object]:
    return {k: (s.version, s.payload) for k, s in r.slots.items()} | {"_cleared": r.cleared}


def test_newer_wins_whatever_the_order() -> None:
    a, b = Replica(), Replica()
    old, new = m(R_SET, 10, value=b"old"), m(R_SET, 20, value=b"new")
    a.apply(old), a.apply(new)
    b.apply(new), b.apply(old)
    assert state(a) == state(b)
    assert a.slots["k"].payload == b"new"


def test_a_delete_is_a_tombstone_an_older_write_cannot_undo() -> None:
    r = Replica()
    r.apply(m(R_DEL, 20))
    assert r.apply(m(R_SET, 10)) is None
    assert r.slots["k"].payload is None


def test_ties_are_broken_by_the_server_id() -> None:
    a, b = Replica(), Replica()
    x, y = m(R_SET, 10, "x", value=b"x"), m(R_SET, 10, "y", value=b"y")
    a.apply(x), a.apply(y)
    b.apply(y), b.apply(x)
    assert a.slots["k"].payload == b.slots["k"].payload == b"y"


def test_clear_removes_older_writes_and_voids_late_ones_but_keeps_newer() -> None:
    r = Replica()
    r.apply(m(R_SET, 10, key="old"))
    r.apply(m(R_SET, 30, key="new"))
    r.apply(m(R_CLEAR, 20))
    assert set(r.slots) == {"new"}
    assert r.apply(m(R_SET, 15, key="late")) is None


def test_the_clock_runs_ahead_of_everything_seen() -> None:
    c = HybridClock()
    first = c.tick(1000)
    c.observe((5000 << 16) + 7)  # a peer whose clock is 4 s ahead
    assert c.tick(1001) > (5000 << 16) + 7 > first


def test_snapshot_entries_lose_to_every_real_write() -> None:
    r = Replica()
    r.load("k", encode_key("k", 100), b"snap", None)
    r.apply(m(R_SET, 1, value=b"real"))
    assert r.slots["k"].payload == b"real"
    r.load("k", encode_key("k", 100), b"snap2", None)
    assert r.slots["k"].payload == b"real"


def test_message_round_trip_and_corruption() -> None:
    msg = ReplicaMessage(R_SET, 123, "node", encode_key("k", 100), b"payload", 99)
    assert decode(encode(msg)) == msg
    for bad in (b"", b"sm\x01", encode(msg)[:10], b"sr\x02" + encode(msg)[3:]):
        with pytest.raises(CorruptData):
            decode(bad)


_ops = st.lists(
    st.tuples(
        st.sampled_from([R_SET, R_SET, R_DEL, R_CLEAR]),
        st.integers(1, 30),
        st.sampled_from(["a", "b", "c"]),
        st.sampled_from(["k1", "k2", "k3"]),
        st.binary(max_size=3),
    ),
    max_size=25,
    unique_by=lambda t: (t[1], t[2]),  # a version names one write: a server's clock only rises
)


@settings(max_examples=300, deadline=None)
@given(ops=_ops, data=st.data())
def test_any_order_with_duplicates_converges(ops: list[tuple[int, int, str, str, bytes]],
                                             data: st.DataObject) -> None:  # fmt: skip
    msgs = [m(op, hlc, origin, key, value) for op, hlc, origin, key, value in ops]
    order_a = data.draw(st.permutations(msgs))
    order_b = data.draw(st.permutations(msgs + msgs[: len(msgs) // 2]))  # some delivered twice
    a, b = Replica(), Replica()
    for msg in order_a:
        a.apply(msg)
    for msg in order_b:
        b.apply(msg)
    assert state(a) == state(b)
