"""Issue 12 §2: what Redis's eviction of syncmap's own keys may and may not do (real redis-server).

Each test removes exactly the key (or the fields) that ``maxmemory`` with an ``allkeys-*`` policy
evicts, so the outcome is deterministic; scenario S16 (tests/scenarios/test_eviction_scenario.py)
does the same with real eviction under memory pressure.  Each protection has a guard-off test
(``Guards``) showing that without it the bug comes back.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator

import pytest
import redis

from syncmap import ConfigurationError, Lock, MapConfig, RWLock, SyncMap
from syncmap.core.nearcache import Guards
from syncmap.errors import StaleFence, StoreError, SyncMapError
from syncmap.keys import bucket_of, encode_key
from syncmap.testing.wait import wait_until

FAST = MapConfig(max_staleness=0.2, presence=False)


@pytest.fixture
def url(redis_url: str) -> str:
    return redis_url


@pytest.fixture
def maps(url: str) -> Iterator[list[SyncMap]]:
    opened: list[SyncMap] = []
    yield opened
    for m in opened:
        m.close()


def open_map(maps: list[SyncMap], url: str, name: str = "ev", **kw: object) -> SyncMap:
    cfg = kw.pop("config", FAST)
    m = SyncMap(name, url, config=cfg, **kw)  # type: ignore[arg-type]
    maps.append(m)
    return m


def bucket_names(name: str, key: str, buckets: int = 16) -> tuple[int, str]:
    """(bucket, the name prefix of its keys ``<ns>:{<map>:<b>}``)."""
    b = bucket_of(encode_key(key, 1000), buckets)
    return b, f"sm:{{{name}:{b}}}"


def lose_bookkeeping(admin: redis.Redis, name: str, key: str) -> None:
    """Forget a bucket's epoch and sequence but keep its data (what evicting a separate sequence
    hash did; with the bookkeeping inside the data hash it can only go with the data)."""
    _, tag = bucket_names(name, key)
    admin.delete(f"{tag}:m")
    admin.hdel(f"{tag}:d", "#e", "#s")


# ---- (a) fence counter evicted -----------------------------------------------------------------


def test_missing_fence_counter_refuses_a_stale_token(url: str, maps: list[SyncMap],
                                                     admin: redis.Redis) -> None:  # fmt: skip
    m = open_map(maps, url)
    lock = Lock("job", url, lease=5)
    old = lock.acquire()
    lock.release()
    newer = Lock("job", url, lease=5)
    newer.acquire()  # a later holder: ``old`` is stale now
    newer.release()
    admin.delete(lock.layout.fence)  # evicted
    with pytest.raises(StaleFence, match="lost"):
        m.set("k", 1, fence=old)
    assert m.get("k", consistent=True) is None
    again = lock.acquire()  # re-acquiring re-seeds the counter above every token issued
    assert int(again) > int(old)
    m.set("k", 2, fence=again)
    lock.release()


def test_missing_fence_counter_guard_off_accepts_the_stale_token(
    url: str, maps: list[SyncMap], admin: redis.Redis
) -> None:
    """The control: reading a missing counter as 0 (the old script) lets the stale write in."""
    cfg = MapConfig(max_staleness=0.2, presence=False, guards=Guards(fence_missing_refuses=False))
    m = open_map(maps, url, config=cfg)
    lock = Lock("job", url, lease=5)
    old = lock.acquire()
    lock.release()
    admin.delete(lock.layout.fence)
    m.set("k", 1, fence=old)
    assert m.get("k", consistent=True) == 1


def test_rw_read_seeds_a_missing_counter(url: str, admin: redis.Redis) -> None:
    rw = RWLock("doc", url, lease=5)
    with rw.write as wfence:
        pass
    admin.delete(rw.layout.fence)
    rfence = rw.read.acquire()
    try:
        assert int(rfence) > int(wfence), "a reader's token must be a real one, above all issued"
        assert int(admin.get(rw.layout.fence) or 0) == int(rfence)
    finally:
        rw.read.release()


# ---- (b) ABA: versions restart under a new epoch -------------------------------------------------


def _aba(maps: list[SyncMap], url: str, admin: redis.Redis, guards: Guards) -> tuple[object, int]:
    cfg = MapConfig(max_staleness=0.2, presence=False, guards=guards)
    a, b = open_map(maps, url, config=cfg), open_map(maps, url, config=cfg)
    a.set("k", 1)  # the bucket's first write: (E1, 1)
    calls = [0]

    def bump(v: int) -> int:
        calls[0] += 1
        if calls[0] == 1:  # between transform's read and its conditional write
            lose_bookkeeping(admin, "ev", "k")
            assert b.set("k", 100) == 1  # acknowledged: (E2, 1), the same version number
        return v + 1

    a.transform("k", bump)
    return a.get("k", consistent=True), calls[0]


def test_transform_compares_epoch_and_version(url: str, maps: list[SyncMap],
                                              admin: redis.Redis) -> None:  # fmt: skip
    value, calls = _aba(maps, url, admin, Guards())
    assert value == 101, "the acknowledged set of 100 was lost (ABA)"
    assert calls == 2


def test_transform_guard_off_loses_the_concurrent_set(url: str, maps: list[SyncMap],
                                                      admin: redis.Redis) -> None:  # fmt: skip
    value, calls = _aba(maps, url, admin, Guards(ver_epoch=False))
    assert (value, calls) == (2, 1)


def test_ver_mode_compares_epoch_and_version(url: str, maps: list[SyncMap],
                                            admin: redis.Redis) -> None:  # fmt: skip
    """The scripts' 'ver' condition (transform, and compare_and_set's retry when an equal value
    has other bytes) is "epoch:version": the same version of another epoch does not match."""
    a = open_map(maps, url)
    b = open_map(maps, url)
    field = encode_key("k", 1000)
    bucket, tag = bucket_names("ev", "k")
    a.set("k", {"x": 1, "y": 2})
    epoch = struct.unpack(">QQQ", admin.hget(f"{tag}:d", field)[:24])[2]

    def attempt(expected: str) -> int:
        cmd = a._cmds.script("set", bucket, field, b"\x01", 0, "ver", expected)
        return int(a._executor.call([cmd], write=True)[0][0])

    assert attempt(f"{epoch + 1}:1") == 0
    lose_bookkeeping(admin, "ev", "k")
    b.set("k", {"y": 2, "x": 1, "z": 3})  # (E2, 1)
    assert attempt(f"{epoch}:1") == 0, "(E1, 1) must not match (E2, 1)"
    assert not a.compare_and_set("k", {"x": 1, "y": 2}, {"x": 0})
    assert b.get("k", consistent=True) == {"y": 2, "x": 1, "z": 3}
    assert a.compare_and_set("k", {"x": 1, "y": 2, "z": 3}, {"x": 0})  # equal, other bytes


# ---- (c) data evicted, bookkeeping kept --------------------------------------------------------


def test_evicted_data_is_not_served_beyond_max_staleness(url: str, maps: list[SyncMap],
                                                         admin: redis.Redis) -> None:  # fmt: skip
    m = open_map(maps, url)
    m.set("k", "v")
    assert m.peek("k") is not None
    _, tag = bucket_names("ev", "k")
    admin.delete(f"{tag}:d")  # evicted; a separate sequence hash would have stayed
    wait_until(lambda: m.peek("k") is None, timeout=5 * FAST.max_staleness,
               what="the cache to drop an entry whose data was evicted")  # fmt: skip
    assert m.get("k") is None
    assert m.set("k", "w") == 1  # a new epoch starts at version 1; every server sees it


def test_evicted_data_guard_off_is_served_forever(url: str, maps: list[SyncMap],
                                                  admin: redis.Redis) -> None:  # fmt: skip
    """The control: bookkeeping kept apart from the data (the old layout) hides the eviction."""
    cfg = MapConfig(max_staleness=0.2, presence=False, guards=Guards(bookkeeping_in_data=False))
    m = open_map(maps, url, config=cfg)
    m.set("k", "v")
    _, tag = bucket_names("ev", "k")
    admin.delete(f"{tag}:d")
    for _ in range(8):
        m._engine.probe_once()
    assert m.peek("k") == ("v", 1)
    assert m["k"] == "v"


def test_clear_keeps_the_epoch_and_sequence(url: str, maps: list[SyncMap],
                                            admin: redis.Redis) -> None:  # fmt: skip
    m = open_map(maps, url)
    v1 = m.set("k", 1)
    m.clear()
    assert m.set("k", 2) == v1 + 2, "versions continue across a clear"
    assert len(m) == 1 and list(m.items()) == [("k", 2)] and list(m) == ["k"]
    m.clear()
    m.clear()  # already empty: no new version
    assert m.set("k", 3) == v1 + 4
    fresh = open_map(maps, url)
    assert fresh.preload() == 1, "bookkeeping fields are no entries"
    assert fresh.peek("k") == (3, v1 + 4)


# ---- (d) meta key lost ---------------------------------------------------------------------------


def test_lost_meta_key_other_settings_cannot_split_the_map(url: str, maps: list[SyncMap],
                                                           admin: redis.Redis) -> None:  # fmt: skip
    a = open_map(maps, url)
    for i in range(40):
        a[f"k{i}"] = i
    admin.delete(a._cmds.layout.meta)
    with pytest.raises(ConfigurationError, match="codec"):
        open_map(maps, url, codec="json")
    admin.delete(a._cmds.layout.meta)
    b = open_map(maps, url, config=MapConfig(buckets=32, max_staleness=0.2, presence=False))
    assert b._buckets == 16, "the bucket count of the map's stamps is adopted"
    assert b["k5"] == 5
    b["k5"] = 6
    assert a.get("k5", consistent=True) == 6


def test_write_refused_when_the_bucket_was_stamped_with_other_settings(
    url: str, maps: list[SyncMap], admin: redis.Redis
) -> None:
    a = open_map(maps, url)
    a["k"] = 5
    _, tag = bucket_names("ev", "k")
    admin.hset(f"{tag}:d", "#c", "32/json")  # as a server with other settings stamped it
    with pytest.raises(ConfigurationError, match="settings"):
        a["k"] = 6
    assert a.get("k", consistent=True) == 5


def test_settings_guard_off_lets_the_other_settings_write(
    url: str, maps: list[SyncMap], admin: redis.Redis
) -> None:
    cfg = MapConfig(max_staleness=0.2, presence=False, guards=Guards(settings_stamp=False))
    a = open_map(maps, url, config=cfg)
    a["k"] = 5
    _, tag = bucket_names("ev", "k")
    admin.hset(f"{tag}:d", "#c", "32/json")
    a["k"] = 6


def test_lost_meta_key_guard_off_lets_other_settings_in(url: str, maps: list[SyncMap],
                                                        admin: redis.Redis) -> None:  # fmt: skip
    """The control: ignoring the stamps (the old open, the old scripts) re-creates the meta key
    from this server's settings: a json server's 5 is then read by msgpack servers as 53."""
    off = Guards(settings_stamp=False)
    a = open_map(maps, url)
    a["k"] = 1
    admin.delete(a._cmds.layout.meta)
    b = open_map(maps, url, codec="json",
                 config=MapConfig(max_staleness=0.2, presence=False, guards=off))  # fmt: skip
    b["k"] = 5
    assert a.get("k", consistent=True) == 53


# ---- (e) one damaged bucket ----------------------------------------------------------------------


def test_one_damaged_bucket_stays_in_its_bucket(
    url: str, maps: list[SyncMap], admin: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    a = open_map(maps, url)
    for i in range(40):
        a[f"k{i}"] = i
    bad, tag = bucket_names("ev", "k0")
    good = next(f"k{i}" for i in range(40) if bucket_names("ev", f"k{i}")[0] != bad)
    admin.delete(f"{tag}:d")
    admin.set(f"{tag}:d", "not a hash")  # a wrong-typed key at a bucket's name
    with caplog.at_level(logging.WARNING, logger="syncmap"):
        b = open_map(maps, url)  # opening works
        for _ in range(3):
            b._engine.probe_once()
            a._engine.probe_once()
    assert b[good] == int(good[1:])
    assert b.peek(good) is not None, "the other buckets keep their near cache"
    with pytest.raises(StoreError):
        b["k0"]
    assert a.peek("k0") is None, "the damaged bucket is flushed"
    damaged = [r for r in caplog.records if "damaged" in r.getMessage()]
    assert damaged and all(r.levelno == logging.WARNING for r in damaged)
    assert len(damaged) <= 2, "logged once per map, not once per probe"
    assert b._engine.damaged_buckets >= 1


def test_non_numeric_sequence_is_a_damaged_bucket(url: str, maps: list[SyncMap],
                                                  admin: redis.Redis) -> None:  # fmt: skip
    a = open_map(maps, url)
    for i in range(40):
        a[f"k{i}"] = i
    _, tag = bucket_names("ev", "k0")
    admin.hset(f"{tag}:m", "seq", "garbage")  # the old layout's sequence hash
    admin.hset(f"{tag}:d", "#s", "garbage")
    b = open_map(maps, url)
    b._engine.probe_once()
    with pytest.raises(SyncMapError):
        b["k0"] = 1
    good = next(f"k{i}" for i in range(40) if bucket_names("ev", f"k{i}")[1] != tag)
    b[good] = -1
    assert a.get(good, consistent=True) == -1


# ---- what is and is not guaranteed: said at open and by doctor -----------------------------------


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru", "noeviction"])
def test_open_and_doctor_say_what_an_evicting_policy_guarantees(
    url: str, maps: list[SyncMap], admin: redis.Redis, caplog: pytest.LogCaptureFixture,
    policy: str,
) -> None:  # fmt: skip
    from syncmap.cli.doctor import _memory

    admin.config_set("maxmemory", "100mb")
    admin.config_set("maxmemory-policy", policy)
    with caplog.at_level(logging.WARNING, logger="syncmap"):
        open_map(maps, url)
    said = [r.getMessage() for r in caplog.records if "maxmemory-policy" in r.getMessage()]
    check = _memory(admin)
    if policy == "allkeys-lru":
        assert len(said) == 1 and "allkeys-lru" in said[0]
        assert "refused" in said[0] and "gone" in said[0], said  # what holds, what does not
        assert check.status == "WARN" and "fence counter" in check.hint
    elif policy == "volatile-lru":
        assert said == [], "volatile-* never evicts a map's keys: nothing to warn about at open"
        assert check.status == "WARN" and "never evicted" in check.hint
    else:
        assert said == [] and check.status == "OK"


def test_damaged_bucket_guard_off_disables_the_whole_map(url: str, maps: list[SyncMap],
                                                         admin: redis.Redis) -> None:  # fmt: skip
    """The control: a probe that fails on its first damaged bucket fails for every bucket."""
    a = open_map(maps, url)
    a["k0"] = 0
    _, tag = bucket_names("ev", "k0")
    admin.delete(f"{tag}:d")
    admin.set(f"{tag}:d", "not a hash")
    off = MapConfig(max_staleness=0.2, presence=False, guards=Guards(damage_isolated=False))
    with pytest.raises(StoreError, match="WRONGTYPE"):
        open_map(maps, url, config=off)
