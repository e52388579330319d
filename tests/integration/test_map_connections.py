"""Issue 16 goal 1: the maps of a process share its connections to a Redis node.  Ten idle maps
(each written and read, so each has made its calls) hold the subscriber's connection and one
data connection, not one each, once a call has closed what sat idle ``IDLE_TRIM`` (the pool
grows with the calls in flight at once, as when a map opens while another probes); closing the
last map closes the data connection.  The controls give each map an executor of its own again,
or never trim, and must see more."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from syncmap import MapConfig, SyncMap
from syncmap.embedded import EmbeddedRedis
from syncmap.store import node
from syncmap.store import topology as topology_module

MAPS = 10
CFG = MapConfig(presence=False)


def connections(server: EmbeddedRedis) -> int:
    """Clients of the server, less the one asking (a fresh one each time)."""
    with server.client() as admin:
        return len(admin.client_list()) - 1


def open_maps(url: str, numbers: Iterable[int] = range(MAPS)) -> list[SyncMap]:
    maps = [SyncMap(f"conn-{i}", url, config=CFG) for i in numbers]
    for i, m in zip(numbers, maps, strict=True):
        m[f"k{i}"] = i
        assert m.get(f"k{i}", consistent=True) == i
    return maps


@pytest.fixture
def maps(redis_server: EmbeddedRedis) -> Iterator[list[SyncMap]]:
    opened = open_maps(redis_server.url)
    try:
        yield opened
    finally:
        for m in opened:
            m.close()


def settle(maps: list[SyncMap], monkeypatch: pytest.MonkeyPatch, trim: float) -> None:
    """Calls enough to trim the largest pool the maps can have grown (one per map opened at
    once, and the probes'): each call closes one idle connection unused for ``trim`` s."""
    monkeypatch.setattr(node, "IDLE_TRIM", trim)
    for m in maps * 3:
        m.get("k0", consistent=True)


def test_ten_idle_maps_hold_two_connections(
    redis_server: EmbeddedRedis, maps: list[SyncMap], monkeypatch: pytest.MonkeyPatch
) -> None:
    settle(maps, monkeypatch, 0.0)
    assert connections(redis_server) <= 2
    for m in maps:
        m.close()
    assert connections(redis_server) <= 1  # the subscriber may linger for a lock or a re-open


def test_control_an_executor_per_map_holds_a_connection_each(
    redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    def own(topology: topology_module.Topology, timeout: float | None,
            deadline: float | None) -> object:  # fmt: skip
        return topology.executor(timeout=timeout, deadline=deadline)

    monkeypatch.setattr("syncmap.map.use_executor", own)
    opened = open_maps(redis_server.url)
    try:
        assert connections(redis_server) >= MAPS
    finally:
        for m in opened:
            m.close()


def test_control_without_trimming_the_pool_keeps_what_it_grew_to(
    redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten maps opened from ten threads at once: calls in flight together grow the pool; with
    no trimming (IDLE_TRIM infinite) it stays grown after they went idle."""
    with ThreadPoolExecutor(MAPS) as pool:
        opened = list(pool.map(lambda i: open_maps(redis_server.url, [i])[0], range(MAPS)))
    try:
        settle(opened, monkeypatch, float("inf"))
        assert connections(redis_server) > 2
        settle(opened, monkeypatch, 0.0)  # and the same pool does shrink when trimmed
        assert connections(redis_server) <= 2
    finally:
        for m in opened:
            m.close()
