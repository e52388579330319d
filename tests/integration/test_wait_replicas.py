"""``MapConfig(wait_replicas=n)``: each write ends with ``WAIT n`` in its round trip; fewer
replicas than asked raise ``NotReplicated`` (a ``WriteOutcomeUnknown``): the write did run on the
master, and this server drops the key from its near cache.  A lone redis-server has no replica,
so every write there is not replicated; the control asks for none."""

from __future__ import annotations

import pytest

from syncmap import MapConfig, NotReplicated, SyncMap, WriteOutcomeUnknown, aio
from syncmap.store import executor


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


# WAIT blocks on the server for ``wait_timeout`` before it answers "0 replicas".  A socket
# timeout no longer than that fired first: the write was reported as of unknown outcome (the
# connection dropped), never as ``NotReplicated``.  Under Sentinel the socket timeout is capped at
# half of down-after, so down-after 1 s with the default wait_timeout 0.5 s hit exactly this (S10
# ``wait``: 67 writes "unknown", 0 "not replicated").  The reply to a trailing WAIT is waited for
# ``wait_timeout`` longer than the socket timeout.
LONG_WAIT = MapConfig(presence=False, wait_replicas=1, wait_timeout=0.4, socket_timeout=0.2)


def test_a_wait_longer_than_the_socket_timeout_is_not_replicated(redis_url: str) -> None:
    with SyncMap("w", redis_url, config=LONG_WAIT) as m:
        with pytest.raises(NotReplicated, match="0 of the 1 replicas"):
            m["k"] = 1
        with pytest.raises(NotReplicated):
            m.update({"a": 1, "b": 2})
        assert m.get("k", consistent=True) == 1


async def test_a_wait_longer_than_the_socket_timeout_is_not_replicated_asyncio(
    redis_url: str,
) -> None:
    async with aio.SyncMap("w", redis_url, config=LONG_WAIT) as m:
        with pytest.raises(NotReplicated, match="0 of the 1 replicas"):
            await m.set("k", 1)
        assert await m.get("k", consistent=True) == 1


def test_control_the_socket_timeout_alone_cuts_a_wait_short(redis_url: str) -> None:
    """Control: with the WAIT's allowance off, the same write is reported unknown, not refused."""
    with (
        pytest.MonkeyPatch.context() as mp,
        SyncMap("w", redis_url, config=LONG_WAIT) as m,
    ):
        mp.setattr(executor, "wait_allowance", lambda cmds: 0.0)
        with pytest.raises(WriteOutcomeUnknown) as raised:
            m["k"] = 1
        assert not isinstance(raised.value, NotReplicated)
