"""``map.lock(key)`` takes every key the map takes, and never quotes a long key in full."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest

from syncmap import ConfigurationError, InvalidKey, Lock, LockNotAcquired, SyncMap
from syncmap.keys import key_lock_name


@pytest.fixture
def m(shared_redis_url: str) -> Iterator[SyncMap]:
    with SyncMap("named", shared_redis_url) as sm:
        yield sm


@pytest.mark.parametrize(
    "key",
    ["k" * 600, "é" * 32 * 1024, b"\x00" * 300, b"b" * (64 * 1024), 10**700],
    ids=["str-600", "str-64KiB", "bytes-300", "bytes-64KiB", "int-701-digits"],
)
def test_any_valid_key_is_lockable_and_fences_its_writes(m: SyncMap, key: object) -> None:
    first, second = m.lock(key), m.lock(key)  # type: ignore[arg-type]
    assert first.name == second.name and len(first.name.encode()) <= 512
    with first as fence:
        with pytest.raises(LockNotAcquired):
            second.acquire(timeout=0)
        m.set(key, "v", fence=fence)  # type: ignore[arg-type]
    with second as newer:
        assert newer > fence
        m.set(key, "w", fence=newer)  # type: ignore[arg-type]
    assert m.get(key, consistent=True) == "w"  # type: ignore[arg-type]


def test_a_long_keys_lock_name_is_a_hash_every_server_derives_alike(m: SyncMap) -> None:
    long = "k" * 600
    field = b"s" + long.encode()
    assert m.lock(long).name == f"named:h:{hashlib.sha256(field).hexdigest()}"
    assert key_lock_name("named", field) == m.lock(long).name
    # Keys that differ only at their end, or only in type, get different locks.
    assert m.lock(long + "a").name != m.lock(long + "b").name
    assert m.lock(long.encode()).name != m.lock(long).name
    # Short keys keep their readable names (servers of earlier versions use the same ones).
    assert m.lock("alice").name == "named:s:alice"
    assert m.lock(7).name == "named:i:7"
    assert m.lock(b"\x01").name == "named:x:01"


def test_errors_never_quote_a_whole_long_key(m: SyncMap) -> None:
    with pytest.raises(ConfigurationError) as bad_name:
        Lock("{" + "n" * 100_000, "redis://127.0.0.1:1/0")  # refused before any connection
    assert len(str(bad_name.value)) < 400 and "100001 bytes" in str(bad_name.value)
    with pytest.raises(InvalidKey) as too_long:
        m.lock("k" * (64 * 1024 + 1))
    assert len(str(too_long.value)) < 400
    with pytest.raises(InvalidKey) as unencodable:
        m.lock("\ud800" * 50_000)
    assert len(str(unencodable.value)) < 400
