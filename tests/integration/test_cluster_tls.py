"""``rediss+cluster://`` with a CA and a client certificate, as docs/deploying.md shows, against a
Redis Cluster whose nodes require client certificates and speak TLS to each other (cluster bus,
replication): maps and locks on both drivers, change and release messages on the sharded
subscriptions, which are checked to sit on the nodes' TLS ports, and the refusals.

One 3 + 3 TLS cluster for the module (``ClusterSet(tls=...)``, certificates made with openssl).
Skipped where openssl or a TLS-capable server is missing (failed under CI=true)."""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import redis

from syncmap import Lock, StoreUnavailable, SyncMap, aio
from syncmap.store.cluster import slot_for
from syncmap.store.endpoint import TLS_ADVICE
from syncmap.testing.certs import CertSet, make_certs, openssl_missing
from syncmap.testing.clusterset import ClusterModeUnavailable, ClusterSet, TlsUnavailable
from syncmap.testing.wait import wait_until

DOC = Path(__file__).resolve().parents[2] / "docs" / "deploying.md"
DOC_NODES = "10.0.0.1:7000,10.0.0.2:7000"


def _cannot(why: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the TLS cluster tests: {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    if (why := openssl_missing()) is not None:
        _cannot(why)
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_cluster(cluster_binary: str, certs: CertSet) -> Iterator[ClusterSet]:
    try:
        cluster = ClusterSet(binary=cluster_binary, tls=certs.server)
    except (ClusterModeUnavailable, TlsUnavailable) as exc:
        _cannot(str(exc))
    with cluster:
        yield cluster


@pytest.fixture
def url(tls_cluster: ClusterSet, certs: CertSet) -> str:
    """docs/deploying.md's ``rediss+cluster://`` example, on two of this cluster's TLS ports and
    these certificates."""
    found = re.search(r"^(rediss\+cluster://\S+)$", DOC.read_text(), re.M)
    assert found, "docs/deploying.md shows no rediss+cluster:// URL on a line of its own"
    assert DOC_NODES in found[1] and "ssl_certfile=" in found[1], found[1]
    nodes = ",".join(f"{h}:{p}" for h, p in tls_cluster.tls_startup_nodes[:2])
    return found[1].replace(DOC_NODES, nodes).replace("/etc/ssl/redis/", f"{certs.dir}/")


def _subscribed_ports(cluster: ClusterSet) -> set[int]:
    """The local ports of every connection with sharded subscriptions, on every master (asked
    over the plain port, where the fixture's own probes go)."""
    ports = set()
    for master in cluster.masters():
        with cluster.node_client(master) as c:
            for client in c.client_list():
                if int(client.get("ssub", 0)) > 0:
                    ports.add(int(client["laddr"].rpartition(":")[2]))
    return ports


def _shard_subscribers(node: redis.Redis, channel: str) -> int:
    return int(node.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1])  # type: ignore[no-untyped-call]


def test_the_tls_cluster_requires_client_certificates_and_uses_tls_between_nodes(
    tls_cluster: ClusterSet, certs: CertSet
) -> None:
    node = tls_cluster.servers[0]
    c = certs.client
    with node.client(port=node.tls_port, ssl=True, ssl_ca_certs=str(c.ca),
                     ssl_certfile=str(c.cert), ssl_keyfile=str(c.key)) as tls:  # fmt: skip
        assert tls.ping()
        # Seen over TLS, the cluster names its nodes by their TLS ports, bus = tls_port + 10000.
        tls_ports = {n.tls_port for n in tls_cluster.servers}
        lines = tls.execute_command("CLUSTER", "NODES").decode().splitlines()
        addrs = {tuple(map(int, line.split()[1].split(":")[1].split("@"))) for line in lines}
        assert addrs == {(p, p + 10000) for p in tls_ports}
    for replica in tls_cluster.servers[3:]:  # each replica follows its master on the TLS port
        with replica.client() as plain:
            info = plain.info("replication")
        assert info["master_link_status"] == "up" and info["master_port"] in tls_ports
    with node.client(port=node.tls_port, ssl=True, ssl_ca_certs=str(c.ca),
                     socket_timeout=2, retry=None) as bare:  # fmt: skip
        with pytest.raises(redis.ConnectionError):
            bare.ping()  # no client certificate: the node refuses


def test_migrate_slot_moves_keys_with_migrate_over_tls(tls_cluster: ClusterSet) -> None:
    # MIGRATE speaks TLS on a tls-cluster: the fixture sends it to the target's TLS port (to the
    # plain port it times out).  Moved there and back, so the module's cluster is as it was.
    slot = tls_cluster.slot_of("{tls-migrate}k")
    source = tls_cluster.master_for_slot(slot)
    target = next(m for m in tls_cluster.masters() if m is not source)
    with tls_cluster.node_client(source) as c:
        c.set("{tls-migrate}k", "v")
    try:
        assert tls_cluster.migrate_slot(slot, target) == 1
        with tls_cluster.node_client(target) as c:
            assert c.get("{tls-migrate}k") == b"v"
    finally:
        tls_cluster.migrate_slot(slot, source)
    with tls_cluster.node_client(source) as c:
        assert c.delete("{tls-migrate}k") == 1


def test_the_documented_url_map_and_lock_over_tls(tls_cluster: ClusterSet, url: str) -> None:
    assert url.startswith("rediss+cluster://") and "ssl_ca_certs=" in url
    with SyncMap("tls", url) as a, SyncMap("tls", url) as b, b.watch() as events:
        a["k"] = 1
        event = events.get(10)  # the change message reached b's sharded subscriber, over TLS
        assert event is not None and event.key == "k"
        assert b.get("k", consistent=True) == 1
        with a.lock("k") as fence:
            a.set("k", 2, fence=fence)
        assert b.get("k", consistent=True) == 2
        # Every master's subscriber connection is on its TLS port (16 buckets: on all three).
        assert _subscribed_ports(tls_cluster) == {m.tls_port for m in tls_cluster.masters()}
    # Control: the same map on the plain ports subscribes there, so the check above can fail.
    with SyncMap("tls", tls_cluster.url):
        assert {m.port for m in tls_cluster.masters()} <= _subscribed_ports(tls_cluster)


def test_a_lock_waiter_is_woken_by_the_release_message_over_tls(
    tls_cluster: ClusterSet, url: str
) -> None:
    holder, waiter = Lock("tls-lock", url, lease=30), Lock("tls-lock", url, lease=30)
    holder.acquire()
    acquired: list[float] = []

    def wait() -> None:
        waiter.acquire(timeout=3.0)
        acquired.append(time.monotonic())

    t = threading.Thread(target=wait)
    t.start()
    channel = holder.layout.channel
    master = tls_cluster.master_for_slot(slot_for(channel))
    with tls_cluster.node_client(master) as node:
        wait_until(lambda: _shard_subscribers(node, channel) >= 1, 5.0,
                   "the waiter subscribing the lock's sharded channel")  # fmt: skip
    assert master.tls_port in _subscribed_ports(tls_cluster)  # the waiter's, the only one there
    released = time.monotonic()
    holder.release()
    t.join()
    waiter.release()
    # Woken by the release message, not at its 3 s deadline (the lease is 30 s).
    assert acquired[0] - released < 1.0


async def test_the_asyncio_driver_over_tls(url: str) -> None:
    async with aio.SyncMap("atls", url) as a, aio.SyncMap("atls", url) as b:
        watch = b.watch()
        await a.set("k", 1)
        event = await asyncio.wait_for(anext(watch), 10)
        assert event.key == "k" and await b.get("k", consistent=True) == 1
        async with a.lock("k") as fence:
            await a.set("k", 2, fence=fence)
        assert await b.get("k", consistent=True) == 2
        watch.close()


async def test_without_the_client_certificate_the_url_is_refused_clearly(
    url: str, certs: CertSet
) -> None:
    bare = re.sub(r"&ssl_certfile=[^&]*&ssl_keyfile=[^&]*", "", url)
    assert "ssl_certfile" not in bare and "ssl_ca_certs" in bare
    with pytest.raises(StoreUnavailable, match=re.escape(TLS_ADVICE)):
        SyncMap("refused", bare)
    with pytest.raises(StoreUnavailable, match=re.escape(TLS_ADVICE)):
        await aio.SyncMap("refused", bare).open()
    # Control: a node that is not there is no TLS failure, and is not reported as one.
    gone = re.sub(r"rediss\+cluster://[^?]*", "rediss+cluster://127.0.0.1:1", url)
    with pytest.raises(StoreUnavailable, match="the cluster runs") as info:
        SyncMap("refused", gone)
    assert TLS_ADVICE not in str(info.value)
