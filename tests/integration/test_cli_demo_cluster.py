"""``syncmap demo --cluster`` end to end: the demo's servers on a 3-master Redis Cluster (a
replica each) it starts itself; and the per-master ``CLIENT KILL`` its chaos needs on a Cluster.
``--chaos`` (a master killed until its replica takes over, then the usual chaos) is run by hand
(``syncmap demo --cluster --chaos --seconds 12``): ``test_cluster_maps`` tests the same failover,
and the suite's time is kept near ten minutes."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
from redis.cluster import RedisCluster

from syncmap import SyncMap
from syncmap.cli.demo_cluster import kill_subscribers
from syncmap.cli.options import redis_client
from syncmap.testing.clusterset import ClusterSet


def _demo(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncmap.cli", "demo", *args],
        check=False, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_demo_on_a_cluster_converges_and_shows_the_topology(cluster_binary: str) -> None:
    result = _demo("--cluster", "--nodes", "2", "--seconds", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    node = r"127\.0\.0\.1:\d+"
    master = rf"{node} \(slots \d+-\d+; replica {node}\)"
    assert re.search(rf"started an embedded Redis Cluster, 3 masters: {master}; {master}; "
                     rf"{master} in [\d.]+ s", out), out  # fmt: skip
    assert "maps open redis+cluster://127.0.0.1:" in out, out
    assert re.search(r"store \(3 masters\): \d+ entries in Redis", out), out
    assert out.splitlines()[-1].startswith("CONVERGED: all"), out


@pytest.mark.parametrize("flags", [["--url", "redis://127.0.0.1:1/0"], ["--sentinel"]])
def test_cluster_with_a_url_or_sentinel_is_a_usage_error(flags: list[str]) -> None:
    result = _demo("--cluster", *flags, timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    assert ("leave out --url" if "--url" in flags else "choose one") in result.stderr


def _subscribers(cluster: ClusterSet) -> dict[int, int]:
    """Pub/sub connections on each master, by port."""
    counts = {}
    for master in cluster.masters():
        with master.client() as c:
            counts[master.port] = len(c.client_list(_type="pubsub"))
    return counts


def test_the_pubsub_kill_reaches_every_master(shared_cluster: ClusterSet) -> None:
    """A map's sharded subscriber holds a connection on each master; the demo's chaos must kill
    all of them.  Control: redis-py's ``RedisCluster`` sends ``CLIENT KILL`` to one node."""
    admin = redis_client(shared_cluster.url)
    try:
        with SyncMap("demo-kill", shared_cluster.url):
            deadline = time.monotonic() + 10
            while min(_subscribers(shared_cluster).values()) < 1:  # every master's subscriber
                assert time.monotonic() < deadline, _subscribers(shared_cluster)
                time.sleep(0.02)
            assert isinstance(admin, RedisCluster)
            control = admin.client_kill_filter(_type="pubsub")  # to one node only
            assert 1 <= control < 3, control
            while min(_subscribers(shared_cluster).values()) < 1:  # reconnected after it
                assert time.monotonic() < deadline, _subscribers(shared_cluster)
                time.sleep(0.02)
            assert kill_subscribers(admin, cluster=True) >= 3
    finally:
        admin.close()
