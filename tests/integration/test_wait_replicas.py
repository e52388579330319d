"""``MapConfig(wait_replicas=n)``: each write ends with ``WAIT n`` in its round trip; fewer
replicas than asked raise ``NotReplicated`` (a ``WriteOutcomeUnknown``): the write did run on the
master, and this server drops the key from its near cache.  A lone redis-server has no replica,
so every write there is not replicated; the control asks for none."""

from __future__ import annotations

import pytest

from syncmap import MapConfig, NotReplicated, SyncMap, WriteOutcomeUnknown


def test_a_write_no_replica_confirmed_raises_and_drops_the_key(redis_url: str) -> None:
    cfg = MapConfig(presence=False, wait_replicas=1, wait_timeout=0.05)
    with SyncMap("w", redis_url, config=cfg) as m:
        with pytest.raises(NotReplicated, match="0 of the 1 replicas") as raised:
            m["k"] = 1
        assert isinstance(raised.value, WriteOutcomeUnknown)
        assert m.peek("k") is None  # not believed locally
        assert m.get("k", consistent=True) == 1  # it ran on the master
        with pytest.raises(NotReplicated):
            m.update({"a": 1, "b": 2})
        assert m.peek("a") is None and m.get("a", consistent=True) == 1


def test_control_without_wait_replicas_the_write_is_acknowledged(redis_url: str) -> None:
    with SyncMap("w", redis_url, config=MapConfig(presence=False)) as m:
        m["k"] = 1
        assert m.get("k") == 1 and m.peek("k") == (1, m.get_with_meta("k")[1])
