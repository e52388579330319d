"""The store conformance suite: what every executor (``store/executor.py``) and every store that
runs the map scripts must do, checked the same way on a real Redis and on the memory store.

Each check is a function of a :class:`StoreKit` that raises ``AssertionError`` with a readable
message.  ``tests/integration/test_store_conformance.py`` runs every check against a real
``redis-server`` (``NodeExecutor``) and against ``MemoryExecutor``; a difference between the two is
a bug in the memory model (or in the scripts' documentation), fixed there.

The checks go through :class:`~syncmap.store.commands.MapCommands`, the reply parsers and the real
flows (``syncmap.sync.run.run`` on a :class:`~syncmap.flows.state.MapState`):

* ``order``: a batch's replies come back in order, plain commands and scripts mixed;
* ``set_modes``, ``delete_modes``, ``mset_clear``: each script's reply in each mode, and the
  versions, epochs and stored values the flows see;
* ``probe_reaps``: TTL deadlines, the probe's reaping with one ``expire`` message, its reply,
  and the digest chain ``#h`` equal to the one a reader computes from the messages;
* ``refusals``: STALEFENCE (older token, missing counter), SETTINGS, partial batches;
* ``relay``: target ``''`` replies ``{reply, messages}``, ``unwrap_relayed`` splits it, messages
  decode, carry the store's versions and verify with the signing key;
* ``published``: on a channel target, the same messages reach a subscriber;
* ``noscript``: after ``SCRIPT FLUSH`` a call still works (loaded and resent inside);
* ``unavailable``: a store that cannot be reached raises ``StoreUnavailable``, and nothing ran;
* ``lost_write``: a write whose connection is cut after the request was sent raises
  ``WriteOutcomeUnknown``, ran once and is never resent; the write flow drops the key;
* ``lost_read``: a read cut the same way is retried once (on a new connection), a second cut
  makes it ``StoreUnavailable``;
* ``damage``: a wrong-typed bucket or a non-numeric sequence is a ``StoreError`` in place.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..codec import make_codec
from ..config import MapConfig
from ..core.nearcache import NearCache
from ..core.wire import OP_EXPIRE, OP_SET, decode_message, link, next_digest, verify
from ..errors import (
    ConfigurationError,
    StaleFence,
    StoreError,
    StoreUnavailable,
    WriteOutcomeUnknown,
)
from ..flows import admin, reads, writes
from ..flows.state import MapState
from ..keys import Layout, bucket_of, encode_key
from ..signing import pads
from ..store.commands import MapCommands, config_value, pairs, parse_probe, unwrap_relayed
from ..store.executor import Executor
from ..sync.run import run

Inbox = Callable[[int], list[bytes]]
"""``take(n)``: the next ``n`` messages published on a channel (waits for them, with a limit)."""


@dataclass
class StoreKit:
    """How to reach one kind of store, and the faults a check may cause."""

    name: str
    executor: Callable[[], Executor]
    """A new executor on the store (each check uses a map of its own: no flush needed)."""
    subscribe: Callable[[str], Inbox]
    """Subscribe to a channel now; returns its ``take``."""
    advance: Callable[[int], None]
    """Let at least this many ms of the store's clock pass."""
    down: Callable[[], None]
    """Make the store unreachable (nothing can be sent; it keeps running, with its data) ..."""
    up: Callable[[], None]
    """... and reachable again; also ends ``cut(ex, True)``."""
    cut: Callable[[Executor, bool], None]
    """``cut(ex, every)``: the connection ``ex``'s next request goes out on (it has one open)
    is cut right after the request was sent: Redis runs it, the reply is lost.  ``every``:
    every later connection too, until ``up()``."""


def _map(kit: StoreKit, buckets: int = 4, **cmds: Any) -> tuple[Executor, MapState]:
    """A fresh map on the kit's store, opened by the real opening flow."""
    ex = kit.executor()
    layout = Layout("conf", f"m{uuid.uuid4().hex[:10]}", buckets)
    run(admin.open_map(layout, "msgpack"), ex)
    state = MapState(layout.name, NearCache(buckets), MapCommands(layout, "node-1", **cmds),
                     make_codec(None, None), MapConfig())  # fmt: skip
    run(admin.probe(state), ex)  # measures the store's clock (TTL deadlines are its)
    return ex, state


def _ref(s: MapState, key: str) -> writes.Ref:
    field = encode_key(key, 1000)
    return writes.Ref(field, key, bucket_of(field, s.cmds.layout.buckets))


def _set(s: MapState, ex: Executor, key: str, value: Any, mode: str = "set",
         expected: bytes | str = "", ttl_ms: int = 0, fence: writes.Fenced = None
         ) -> tuple[int, bytes | None]:  # fmt: skip
    flow = writes.set_value(s, _ref(s, key), writes.payload(s, value), ttl_ms=ttl_ms, mode=mode,
                            expected=expected, fence=fence)  # fmt: skip
    return run(flow, ex, _ignore)


def _ignore(messages: list[bytes]) -> None:
    return None


def _read(s: MapState, ex: Executor, key: str) -> Any:
    ref = _ref(s, key)
    return run(reads.read(s, ref.field, ref.key, ref.bucket, consistent=True), ex)[0]


def _raises(kind: type[Exception], fn: Callable[[], Any], what: str) -> Exception:
    try:
        fn()
    except kind as exc:
        return exc
    raise AssertionError(f"{what}: expected {kind.__name__}, nothing raised")


# ---- the checks --------------------------------------------------------------------------------


def check_order(kit: StoreKit) -> None:
    ex, s = _map(kit)
    key = f"conf:{{o{uuid.uuid4().hex[:8]}}}:h"
    cmds = [("HSET", key, "a", "1"), ("HGET", key, "a"), ("HSETNX", key, "a", "2"),
            ("HMGET", key, "a", "b"), ("HDEL", key, "a"), ("HGET", key, "a"),
            s.cmds.hget(0, b"sx"), ("HGETALL", key)]  # fmt: skip
    got = ex.call(cmds, write=True)
    assert got[:7] == [1, b"1", 0, [b"1", None], 1, None, None], f"{kit.name}: {got!r}"
    assert pairs(got[7]) == [], f"HGETALL of a deleted hash: {got[7]!r}"
    reply = ex.call([("CONFIG", "GET", "maxmemory-policy")], write=False)[0]
    assert config_value(reply) == "noeviction", reply
    assert ex.call([("WAIT", 0, 10)], write=True) == [0]


def check_set_modes(kit: StoreKit) -> None:
    ex, s = _map(kit, buckets=1)
    v1, old = _set(s, ex, "k", "one")
    assert v1 == 1 and old is None, f"first set: {(v1, old)!r}"
    v2, old = _set(s, ex, "k", "two", mode="swap")
    assert v2 == 2 and old is not None and old[24:] == writes.payload(s, "one"), f"swap: {old!r}"
    assert _set(s, ex, "k", "three", mode="nx")[0] == 0, "nx applied over a live value"
    assert _set(s, ex, "j", "new", mode="nx")[0] == 3, "nx on an absent key not applied"
    assert _set(s, ex, "k", "x", mode="cas", expected=writes.payload(s, "one"))[0] == 0
    assert _set(s, ex, "k", "x", mode="cas", expected=writes.payload(s, "two"))[0] == 4
    epoch = s.core.epoch_snapshot(_ref(s, "k").bucket)[0]
    assert _set(s, ex, "k", "y", mode="ver", expected=f"{epoch}:3")[0] == 0, "ver: wrong version"
    assert _set(s, ex, "k", "y", mode="ver", expected=f"{epoch}:4")[0] == 5, "ver: right version"
    assert _set(s, ex, "absent", "z", mode="ver", expected="0:0")[0] == 6, "ver 0:0 on absent"
    assert _read(s, ex, "k") == "y" and _read(s, ex, "absent") == "z"
    # The raw reply of a set: {version, deadline, old, epoch}.
    cmd = s.cmds.script("set", _ref(s, "k").bucket, b"sk", b"p", 5000, "set", "")
    version, deadline, old, ep = ex.call([cmd], write=True)[0]
    assert version == 7 and old is None and ep == epoch, f"set reply {(version, old, ep)!r}"
    assert deadline > 0, "a TTL gives a deadline"


def check_delete_modes(kit: StoreKit) -> None:
    ex, s = _map(kit, buckets=1)
    _set(s, ex, "k", "one")

    def d(mode: str, exp: bytes | str = "") -> tuple[int, bytes | None]:
        return run(writes.delete(s, _ref(s, "k"), mode=mode, expected=exp), ex)

    assert d("cad", writes.payload(s, "other"))[0] == 0, "cad with another value deleted"
    assert d("ver", "1:1")[0] == 0, "ver with another epoch deleted"
    version, old = d("cad", writes.payload(s, "one"))
    assert version == 2 and old is not None and old[24:] == writes.payload(s, "one")
    assert d("del") == (0, None), "deleting an absent key"
    _set(s, ex, "k", "again", ttl_ms=20)
    kit.advance(40)
    assert d("del") == (0, None), "deleting an expired key"
    reply = ex.call([s.cmds.probe()[0]], write=True)[0]
    assert reply[1] == 4, f"the expired leftover's delete took a version (seq {reply[1]})"
    assert _read(s, ex, "k") is reads.MISSING


def check_mset_clear(kit: StoreKit) -> None:
    ex, s = _map(kit, buckets=1)
    items = writes.items_of([(k, k.upper()) for k in ("a", "b", "c")], s)
    replies = run(writes.update(s, items, ttl_ms=0, fence=None), ex)
    assert [r[0] for r in replies] == [1], f"mset reply {replies!r}"
    assert [_read(s, ex, k) for k in "abc"] == ["A", "B", "C"]
    replies = run(writes.clear(s, fence=None), ex)
    assert replies[0][0] == 4 and replies[0][1] == s.core.epoch_snapshot(0)[0], f"{replies!r}"
    assert run(writes.clear(s, fence=None), ex) == [[0, 0]], "clearing an empty bucket"
    assert _read(s, ex, "a") is reads.MISSING
    assert ex.call([s.cmds.probe()[0]], write=True)[0][1] == 4, (
        "clear did not keep the bucket's sequence"
    )


def check_probe_reaps(kit: StoreKit) -> None:
    ex, s = _map(kit, buckets=1, target="")
    messages: list[bytes] = []
    for key, ttl in (("a", 30), ("b", 30), ("c", 0)):
        flow = writes.set_value(s, _ref(s, key), b"\x01", ttl_ms=ttl, mode="set")
        run(flow, ex, messages.extend)
    kit.advance(60)
    result = run(admin.probe(s), ex, messages.extend)
    state = result.states[0]
    assert state is not None, f"the probe of the only bucket did not run: {result!r}"
    epoch, seq, digest = state[0], state[1], state[2] if len(state) > 2 else None
    assert seq == 5 and result.live == 1, f"probe after reaping: {result!r}"
    decoded = [decode_message(m) for m in messages]
    assert [m.op for m in decoded] == [OP_SET, OP_SET, OP_SET, OP_EXPIRE], decoded
    assert decoded[-1].fields == (b"sa", b"sb") and decoded[-1].seq == 4, decoded[-1]
    chain = ""
    for m in decoded:
        chain = next_digest(chain, link(m))
    assert digest == chain, f"probe digest {digest!r}, messages chain to {chain!r}"
    assert epoch == decoded[0].epoch


def check_refusals(kit: StoreKit) -> None:
    ex, s = _map(kit)
    counter = f"conf:{{lock:l{uuid.uuid4().hex[:8]}}}:fence"
    fence = ("l", counter, 5)
    exc = _raises(StaleFence, lambda: _set(s, ex, "k", 1, fence=fence), "missing counter")
    assert "fence state was lost" in str(exc), str(exc)
    assert ex.call([("SET", counter, 5), ("INCR", counter)], write=True) == [b"OK", 6]
    exc = _raises(StaleFence, lambda: _set(s, ex, "k", 1, fence=fence), "older token")
    assert "older than token 6" in str(exc), str(exc)
    assert _set(s, ex, "k", 1, fence=("l", counter, 6))[0] == 1, "current token refused"
    other = MapCommands(s.cmds.layout, "node-2", codec="json")
    b = _ref(s, "k").bucket
    exc = _raises(ConfigurationError, lambda: ex.call([other.script("set", b, b"sk", b"1", 0,
                  "set", "")], write=True), "another codec")  # fmt: skip
    assert "(buckets/codec)" in str(exc), str(exc)
    cmds = [other.script("clear", b), s.cmds.hget(b, b"sk")]
    got = ex.call(cmds, write=True, partial=True)
    assert isinstance(got[0], ConfigurationError) and got[1] is not None, f"partial: {got!r}"


def check_relay(kit: StoreKit) -> None:
    key = b"k" * 16
    ex, s = _map(kit, target="", pads=pads(key))
    b = _ref(s, "k").bucket
    cmds = [s.cmds.script("set", b, b"sk", b"v", 0, "set", ""), s.cmds.hget(b, b"sk")]
    replies = ex.call(cmds, write=True)
    assert isinstance(replies[0], list) and len(replies[0]) == 2, f"relay reply {replies!r}"
    messages = unwrap_relayed(cmds, replies)
    assert replies[0][0] == 1 and replies[1][24:] == b"v", f"unwrapped {replies!r}"
    assert len(messages) == 1 and verify(messages[0], [key]), "a signed message"
    m = decode_message(messages[0])
    assert (m.op, m.bucket, m.seq, m.origin, m.fields) == (OP_SET, b, 1, "node-1", (b"sk",)), m
    assert m.epoch == replies[0][3] and m.stamp_ms > 0, m


def check_published(kit: StoreKit) -> None:
    ex, s = _map(kit)
    take = kit.subscribe(s.cmds.layout.channel)
    _set(s, ex, "k", 1)
    run(writes.delete(s, _ref(s, "k")), ex)
    got = [decode_message(m) for m in take(2)]
    assert [(m.op, m.seq, m.fields) for m in got] == [(1, 1, (b"sk",)), (2, 2, (b"sk",))], got


def check_noscript(kit: StoreKit) -> None:
    ex, s = _map(kit)
    assert ex.call([("SCRIPT", "FLUSH")], write=False) == [b"OK"]
    assert _set(s, ex, "k", 1)[0] == 1, "a set after SCRIPT FLUSH"
    result = run(admin.probe(s), ex)
    assert sum(st[1] for st in result.states if st is not None) == 1, result


def check_unavailable(kit: StoreKit) -> None:
    ex, s = _map(kit)
    _set(s, ex, "k", 1)
    kit.down()
    try:
        _raises(StoreUnavailable, lambda: _set(s, ex, "k", 2), "a write to a store that is down")
        _raises(StoreUnavailable, lambda: _read(s, ex, "k"), "a read from a store that is down")
    finally:
        kit.up()
    assert _read(s, ex, "k") == 1, "StoreUnavailable, yet the write ran"
    assert _set(s, ex, "k", 3)[0] == 2, "a write once the store is back"


def check_lost_write(kit: StoreKit) -> None:
    ex, s = _map(kit)
    counter = f"conf:{{c{uuid.uuid4().hex[:8]}}}:n"
    kit.cut(ex, False)
    _raises(WriteOutcomeUnknown, lambda: ex.call([("INCR", counter)], write=True),
            "a write whose reply was lost")  # fmt: skip
    assert ex.call([("GET", counter)], write=False) == [b"1"], "the write did not run once"
    kit.cut(ex, True)  # even if every connection fails the same way: never resent
    try:
        _raises(WriteOutcomeUnknown, lambda: ex.call([("INCR", counter)], write=True),
                "a write whose reply was lost, on every connection")  # fmt: skip
    finally:
        kit.up()
    assert ex.call([("GET", counter)], write=False) == [b"2"], "a lost write was resent"
    _set(s, ex, "k", "old")
    assert "k" in s.core.entries, "a write's own value is cached"
    kit.cut(ex, False)
    exc = _raises(WriteOutcomeUnknown, lambda: _set(s, ex, "k", "new"), "the set flow")
    assert "may or may not" in str(exc), str(exc)
    assert "k" not in s.core.entries, "the flow kept a value the store may no longer hold"
    assert _read(s, ex, "k") == "new", "the write whose reply was lost did run"


def check_lost_read(kit: StoreKit) -> None:
    ex, s = _map(kit)
    _set(s, ex, "k", "v")
    s.core.drop("k")
    kit.cut(ex, False)
    assert _read(s, ex, "k") == "v", "a read whose reply was lost is retried"
    counter = f"conf:{{c{uuid.uuid4().hex[:8]}}}:n"
    # The cut was spent on the read (not left for the next call): this write is not cut.
    assert ex.call([("INCR", counter)], write=True) == [1], "the read did not meet the cut"
    kit.cut(ex, True)
    try:
        _raises(StoreUnavailable, lambda: _read(s, ex, "k"), "a read cut twice (retried once)")
    finally:
        kit.up()
    assert _read(s, ex, "k") == "v"


def check_damage(kit: StoreKit) -> None:
    ex, s = _map(kit)
    layout = s.cmds.layout
    ex.call([("HSET", layout.data(1), "#s", "x")], write=True)
    ex.call([("SET", layout.bucket_keys(2)[1], "not a zset")], write=True)
    replies = ex.call(s.cmds.probe(), write=True, partial=True)
    assert isinstance(replies[1], StoreError) and "DAMAGED" in str(replies[1]), replies[1]
    assert isinstance(replies[2], StoreError) and "WRONGTYPE" in str(replies[2]), replies[2]
    result = parse_probe(layout, replies)
    assert [b for b, _ in result.damaged] == [1, 2], result.damaged


CHECKS: dict[str, Callable[[StoreKit], None]] = {
    f.__name__.removeprefix("check_"): f
    for f in (check_order, check_set_modes, check_delete_modes, check_mset_clear,
              check_probe_reaps, check_refusals, check_relay, check_published, check_noscript,
              check_unavailable, check_lost_write, check_lost_read, check_damage)
}  # fmt: skip
