"""The two map classes agree (issue 13 §4): ``SyncMap`` (store mode) and ``ReplicatedMap``
(replicated mode) share every public method with the same signature, and the same calls return
the same values and types, or raise the same errors.

Two checks that cannot drift: the signatures are read from the classes (a method added to one
class, or a keyword added to one side, fails here until the other follows or the allow-list says
why not), and one behaviour table runs against a store-mode map on a real redis-server and a
replicated map on a real Redis pub/sub feed.  Where replicated mode cannot honour a call (one
authority, a fence), the table says so and the call must raise ``UnsupportedInMode`` naming store
mode, never be ignored.
"""

from __future__ import annotations

import inspect
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from syncmap import Event, Lock, MapConfig, ReplicatedMap, SyncMap, UnsupportedInMode, Watch
from syncmap.storeonly import _MISSING

DUNDERS = ("__getitem__", "__setitem__", "__delitem__", "__contains__", "__iter__", "__len__",
           "__bool__", "__enter__", "__exit__", "__or__", "__ror__", "__ior__",
           "__eq__")  # fmt: skip
ALLOWED: dict[str, tuple[str, str]] = {
    # name: (what may differ, why)
    "statistics": (
        "return",
        "the counters are the mode's own: a near cache's hits, misses, resyncs... "
        "(Statistics) against a replica's applied, ignored, syncs... (ReplicaStatistics); both "
        "are frozen dataclasses with `entries` and `events_dropped`",
    ),
}
SHARED_OPEN_KEYWORDS = ("codec", "value_type", "config", "node_id", "signing_key")
_names = itertools.count()


def _public(cls: type) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n))}


def _params(fn: Callable[..., Any]) -> list[tuple[str, Any, Any, Any]]:
    return [(p.name, p.kind, p.default, p.annotation)
            for p in inspect.signature(fn).parameters.values()]  # fmt: skip


def differences(a: type, b: type) -> list[str]:
    """Every way ``b``'s public methods differ from ``a``'s (names, parameter names, kinds,
    defaults, annotations, return annotation), less what ``ALLOWED`` allows."""
    out = [f"{n}: only on {c.__name__}" for c, other in ((a, b), (b, a))
           for n in sorted(_public(c) - _public(other))]  # fmt: skip
    for name in sorted((_public(a) & _public(b)) | set(DUNDERS)):
        fa, fb = getattr(a, name), getattr(b, name)
        if _params(fa) != _params(fb):
            out.append(f"{name}: {inspect.signature(fa)} != {inspect.signature(fb)}")
        ra, rb = (inspect.signature(f).return_annotation for f in (fa, fb))
        if ra != rb and ALLOWED.get(name, ("",))[0] != "return":
            out.append(f"{name}: returns {ra} != {rb}")
    return out


def test_every_shared_method_has_one_signature() -> None:
    assert differences(SyncMap, ReplicatedMap) == []


def test_the_comparison_sees_a_drifted_class() -> None:
    """Guard off: a replicated map that swallows keywords again, or grows a method of its own."""

    class Drifted(ReplicatedMap):
        def set(self, key: Any, value: Any, *, ttl: float | None = None, **_: Any) -> None:  # type: ignore[override]
            pass

        def frobnicate(self) -> None:
            pass

    found = "\n".join(differences(SyncMap, Drifted))
    assert "set: (self, key" in found and "returns int != None" in found
    assert "frobnicate: only on Drifted" in found


def test_the_shared_constructor_keywords_agree() -> None:
    """``open_map(name, ..., **options)`` passes these to whichever class it opens."""
    sa, sb = (inspect.signature(c).parameters for c in (SyncMap, ReplicatedMap))
    for k in SHARED_OPEN_KEYWORDS:
        assert (sa[k].kind, sa[k].default, sa[k].annotation) == (
            sb[k].kind, sb[k].default, sb[k].annotation), k  # fmt: skip
    assert _MISSING is inspect.signature(SyncMap.pop).parameters["default"].default


# ---- the behaviour table ------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One call made on each map in turn.  ``norm`` turns its result into what must agree (the
    type alone where the value is the mode's own, e.g. a version); ``replicated`` is the error
    replicated mode raises instead when it cannot honour the call (store mode must succeed)."""

    what: str
    call: Callable[[Any], Any]
    norm: Callable[[Any], Any] = field(default=lambda r: r)
    replicated: type[Exception] | None = None


def _type(r: Any) -> str:
    return type(r).__name__


def _fenced(op: Callable[[Any, Any], Any]) -> Callable[[Any], Any]:
    """``op(m, fence)`` with a real fence in store mode (the key's lock, held); replicated mode
    has no locks, so it gets a (lock name, token) pair it must refuse."""

    def call(m: Any) -> Any:
        if isinstance(m, SyncMap):
            with m.lock("f") as fence:
                return op(m, fence)
        return op(m, ("f", 1))

    return call


def _next_event(events: Watch, key: str, timeout: float = 5.0) -> Event:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        e = events.get(timeout=left)
        if e is not None and e.key == key:
            return e
    raise AssertionError(f"no event for {key!r} within {timeout} s")


def _watched_set(m: Any) -> tuple[Any, ...]:
    with m.watch() as events:
        version = m.set("w", 1)
        e = _next_event(events, "w")
    return e.op, e.version == version, e.origin == m.node_id


def _subscribed(inline: bool) -> Callable[[Any], Any]:
    def call(m: Any) -> tuple[Any, ...]:
        seen: list[Event] = []
        got = threading.Event()
        key = f"cb{inline}"

        def on(e: Event) -> None:
            if e.key == key:
                seen.append(e)
                got.set()

        unsubscribe = m.subscribe(on, inline=inline)
        version = m.set(key, 1)
        assert got.wait(5), f"no event for {key}"
        unsubscribe()
        return seen[0].op, seen[0].version == version, unsubscribe() is None

    return call


def _sorted(r: Any) -> list[str]:
    return sorted(map(repr, r))


LONG_KEY = "k" * (MapConfig().max_key_bytes + 1)
BIG = b"x" * (MapConfig().max_value_bytes + 1)

TABLE = [
    Row("set returns a version", lambda m: m.set("a", 1), _type),
    Row("versions grow", lambda m: m.set("a", 2) < m.set("a", 3)),
    Row("set's version is the read's", lambda m: m.set("a", 4) == m.get_with_meta("a")[1]),
    Row("get_with_meta value", lambda m: m.get_with_meta("a")[0]),
    Row("get_with_meta absent", lambda m: m.get_with_meta("zz")[:2]),
    Row("peek", lambda m: (m.peek("a") or (None, 0))[0]),
    Row("peek absent", lambda m: m.peek("zz")),
    Row("m[k]", lambda m: m["a"]),
    Row("m[absent]", lambda m: m["zz"]),
    Row("get", lambda m: m.get("a")),
    Row("get absent", lambda m: m.get("zz")),
    Row("get absent, default", lambda m: m.get("zz", 7)),
    Row("in", lambda m: ("a" in m, "zz" in m)),
    Row("int key", lambda m: (m.set(1, "one") > 0, m[1], m.get(1))),
    Row("bool key does not alias 1", lambda m: m[True]),
    Row("float key does not alias 1", lambda m: m.get(1.0)),
    Row("float key, in", lambda m: 1.5 in m),
    Row("unhashable key", lambda m: m[[1]]),
    Row("set with a bad key", lambda m: m.set(1.5, 1)),
    Row("key too long", lambda m: m.get(LONG_KEY)),
    Row("value too large", lambda m: m.set("big", BIG)),
    Row("ttl", lambda m: m.set("t", 1, ttl=60), _type),
    Row("ttl=0", lambda m: m.set("t", 1, ttl=0)),
    Row("ttl<0", lambda m: m.set("t", 1, ttl=-1)),
    Row("ttl=nan", lambda m: m.set("t", 1, ttl=float("nan"))),
    Row(
        "a read is the caller's copy",
        lambda m: (m.set("d", {"n": 1}), m["d"].update(n=2), m["d"])[2],
    ),
    Row("delete", lambda m: (m.delete("a"), m.delete("a"))),
    Row("del absent", lambda m: m.__delitem__("a")),
    Row("pop", lambda m: m.pop("t")),
    Row("pop absent", lambda m: m.pop("t")),
    Row("pop absent, default", lambda m: m.pop("t", 5)),
    Row("update, ttl", lambda m: m.update({"u1": 1, "u2": [1]}, ttl=60)),
    Row("update, pairs and keywords", lambda m: m.update([("u3", 3)], u4=4)),
    Row("update checks every key first", lambda m: m.update({"ok": 1, 1.5: 2})),
    Row("... and sent nothing", lambda m: "ok" in m),
    Row("copy", lambda m: m.copy()),
    Row("len, bool", lambda m: (len(m), bool(m))),
    Row("keys", lambda m: m.keys(), _sorted),
    Row("items", lambda m: m.items(), _sorted),
    Row("values", lambda m: m.values(), _sorted),
    Row("preload", lambda m: m.preload(), _type),  # store mode: entries newly cached, often 0
    Row("preload(limit=0)", lambda m: m.preload(limit=0)),
    Row("popitem", lambda m: m.popitem(), lambda r: (_type(r), len(r))),
    Row(
        "statistics",
        lambda m: (m.statistics().entries, m.statistics().events_dropped),
        lambda r: tuple(map(_type, r)),
    ),
    Row("watch: the event carries set's version", _watched_set),
    Row("subscribe: the event carries set's version", _subscribed(inline=False)),
    Row("subscribe(inline=True)", _subscribed(inline=True)),
    # What replicated mode cannot honour, each refused (store mode does it):
    Row(
        "get(consistent=True)", lambda m: m.get("u3", consistent=True), replicated=UnsupportedInMode
    ),
    Row(
        "get_with_meta(consistent=True)",
        lambda m: m.get_with_meta("u3", consistent=True)[0],
        replicated=UnsupportedInMode,
    ),
    Row("swap", lambda m: m.swap("s", 1), replicated=UnsupportedInMode),
    Row("setdefault", lambda m: m.setdefault("s", 2), replicated=UnsupportedInMode),
    Row("compare_and_set", lambda m: m.compare_and_set("s", 1, 2), replicated=UnsupportedInMode),
    Row("compare_and_delete", lambda m: m.compare_and_delete("s", 2), replicated=UnsupportedInMode),
    Row("transform", lambda m: m.transform("n", lambda n: n + 1, 0), replicated=UnsupportedInMode),
    Row("lock", lambda m: m.lock("s"), lambda r: isinstance(r, Lock), UnsupportedInMode),
    Row("set(fence=)", _fenced(lambda m, f: m.set("f", 1, fence=f)), _type, UnsupportedInMode),
    Row(
        "delete(fence=)", _fenced(lambda m, f: m.delete("f", fence=f)), replicated=UnsupportedInMode
    ),
    Row("pop(fence=)", _fenced(lambda m, f: m.pop("f", 0, fence=f)), replicated=UnsupportedInMode),
    Row(
        "update(fence=)",
        _fenced(lambda m, f: m.update({"f": 2}, fence=f)),
        replicated=UnsupportedInMode,
    ),
    Row("clear(fence=)", _fenced(lambda m, f: m.clear(fence=f)), replicated=UnsupportedInMode),
    # Both again:
    Row("clear", lambda m: m.clear()),
    Row("empty", lambda m: (len(m), bool(m), m.copy(), list(m))),
    Row("with", lambda m: m.__enter__() is m),
    Row("close", lambda m: (m.close(), m.close())),
    Row("read after close", lambda m: m["a"]),
    Row("get after close", lambda m: m.get("a")),
    Row("in after close", lambda m: "a" in m),
    Row("write after close", lambda m: m.set("a", 1)),
    Row("len after close", len),
    Row("copy after close", lambda m: m.copy()),
    Row("subscribe after close", lambda m: m.subscribe(print)),
    Row("watch after close", lambda m: m.watch()),
    Row("statistics after close", lambda m: m.statistics().entries, _type),
]


def _outcome(row: Row, m: Any) -> tuple[Any, ...]:
    try:
        result = row.call(m)
    except Exception as exc:
        return ("raises", type(exc).__name__, str(exc))
    return ("returns", row.norm(result))


@pytest.fixture
def maps(redis_url: str) -> Iterator[tuple[SyncMap, ReplicatedMap]]:
    name = f"agree{next(_names)}"
    cfg = MapConfig(presence=False)
    with SyncMap(name, redis_url, config=cfg) as store, \
            ReplicatedMap(name, redis_url, config=cfg, snapshot={}) as replicated:  # fmt: skip
        yield store, replicated


def test_one_table_both_modes(maps: tuple[SyncMap, ReplicatedMap]) -> None:
    store, replicated = maps
    wrong = []
    for row in TABLE:
        s, r = _outcome(row, store), _outcome(row, replicated)
        if row.replicated is None:
            ok = s[:2] == r[:2]
        else:
            ok = (s[0] == "returns" and r[:2] == ("raises", row.replicated.__name__)
                  and "store mode" in r[2])  # fmt: skip
        if not ok:
            wrong.append(f"{row.what}:\n    store:      {s}\n    replicated: {r}")
    assert not wrong, "the modes disagree:\n" + "\n".join(wrong)
