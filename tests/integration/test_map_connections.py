"""Issue 16 goal 1: the maps of a process share its connections to a Redis node.  Ten idle maps
(each written and read, so each has made its calls) hold the subscriber's connection and one
data connection, not one each, once a call has closed what sat idle ``IDLE_TRIM`` (the pool
grows with the calls in flight at once, as when a map opens while another probes); closing the
last map closes the data connection.  The controls give each map an executor of its own again,
or never trim, and must see more.

On a Redis Cluster the same holds per master: a map's probes wait at most ``probe_deadline``,
through a view of the data executor (``within``) on its connections, so ten maps that wrote,
read and probed hold two connections per master (the subscriber's and one data connection);
an asyncio map's probes open none beyond its data connections.  The controls probe on an
executor of their own again (as before: one per process, or per asyncio map) and must see a
third connection per master, or one more."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from syncmap import MapConfig, SyncMap, aio
from syncmap.aio.engine import AsyncEngine
from syncmap.embedded import EmbeddedRedis
from syncmap.store import node
from syncmap.store import topology as topology_module
from syncmap.store.clusterexec import AsyncClusterExecutor, ClusterExecutor
from syncmap.testing.clusternode import ClusterNodeProcess
from syncmap.testing.clusterset import ClusterSet

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


# ---- a Redis Cluster: at most two connections per master -------------------------------------


def per_master(cluster: ClusterSet, masters: list[ClusterNodeProcess]) -> list[int]:
    """Clients of each master, less the one asking and the replicas' links (flag S)."""
    counts = []
    for master in masters:
        with cluster.node_client(master.addr) as admin:
            me = admin.client_id()
            clients = admin.client_list()
        counts.append(sum(1 for c in clients if int(c["id"]) != me and "S" not in c["flags"]))
    return counts


def cluster_maps_connections(cluster: ClusterSet, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Ten maps on a private cluster, each written, read and probed through its prober (every
    master), the pools then trimmed: the connections they hold on each master.  The cluster's
    own clients (ClusterSet's kept probes) are counted before and left out; no other client
    of this process knows this cluster's ports."""
    masters = cluster.masters()
    before = per_master(cluster, masters)
    opened = open_maps(cluster.url)
    try:
        for m in opened:
            m._engine.probe_once(m._engine.prober)
        monkeypatch.setattr(node, "IDLE_TRIM", 0.0)
        for m in opened * 3:  # each call closes one idle connection per master it reaches
            m._engine.probe_once()
        during = [n - b for n, b in zip(per_master(cluster, masters), before, strict=True)]
    finally:
        for m in opened:
            m.close()
    after = [n - b for n, b in zip(per_master(cluster, masters), before, strict=True)]
    assert max(after) <= 1  # the data connections closed with the last map
    return during


def test_ten_idle_cluster_maps_hold_two_connections_per_master(
    redis_cluster: ClusterSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    counts = cluster_maps_connections(redis_cluster, monkeypatch)
    assert all(1 <= n <= 2 for n in counts), counts


def test_control_probing_on_an_executor_of_its_own_holds_a_third_per_master(
    redis_cluster: ClusterSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old way: the probes' executor one per process (topology, timeout, probe_deadline)."""
    made: list[node.NodeExecutor | ClusterExecutor] = []

    def own(self: ClusterExecutor, deadline: float) -> object:
        made.append(topology_module.shared_executor(self.topology, self.timeout, deadline))
        return made[-1]

    monkeypatch.setattr(ClusterExecutor, "within", own)
    try:
        counts = cluster_maps_connections(redis_cluster, monkeypatch)
    finally:
        for executor in made:
            executor.close()
    assert max(counts) >= 3, counts


async def async_probe_connections(
    cluster: ClusterSet, monkeypatch: pytest.MonkeyPatch
) -> list[int]:
    """The connections one asyncio map (its executor is its own) opens on each master to probe
    through its prober, once its data executor has probed every master.  Counted as a difference:
    its feed publishes on a connection of its own besides the subscriber's (feed/aredis_base.py),
    and its pool, never trimmed, may have grown with its calls in flight at once.  The engine's
    probe loop is off (it probes through the prober when woken, at any time): this test's
    probe is the prober's only call."""

    async def no_probe_loop(self: AsyncEngine) -> None:
        return None

    monkeypatch.setattr(AsyncEngine, "_probe_loop", no_probe_loop)
    masters = cluster.masters()
    async with aio.SyncMap("aconn", cluster.url, config=CFG) as m:
        assert m._engine is not None
        await m._engine.probe_once()  # the data executor: a connection to every master
        before = per_master(cluster, masters)
        await m._engine.probe_once(m._engine.prober)
        return [n - b for n, b in zip(per_master(cluster, masters), before, strict=True)]


async def test_an_async_cluster_map_probes_on_its_data_connections(
    redis_cluster: ClusterSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert await async_probe_connections(redis_cluster, monkeypatch) == [0, 0, 0]


async def test_control_an_async_map_probing_on_an_executor_of_its_own_opens_more(
    redis_cluster: ClusterSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    def own(self: AsyncClusterExecutor, deadline: float) -> AsyncClusterExecutor:
        return AsyncClusterExecutor(self.topology, timeout=self.timeout, deadline=deadline)

    monkeypatch.setattr(AsyncClusterExecutor, "within", own)
    assert await async_probe_connections(redis_cluster, monkeypatch) == [1, 1, 1]
