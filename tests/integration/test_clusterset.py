"""The Cluster fixture itself (``syncmap.testing.clusterset``): it starts with every node agreeing,
serves keys through redis-py's RedisCluster, fails over with acknowledged writes kept, moves a
slot (MOVED and ASK followed by a client), carries sharded pub/sub (Redis 7.0+), and leaves no
process or temp dir behind.  Each claim is checked by asking the nodes directly, not through the
fixture's own waiting code.  Last, the scenarios' faults and cleanup (``testing.faults``) reach
every master of a cluster."""

from __future__ import annotations

import os

import pytest
import redis
from redis.exceptions import AskError, MovedError

from syncmap import SyncMap, serverproc
from syncmap.errors import ConfigurationError
from syncmap.keys import Layout
from syncmap.testing.clusternode import (
    SLOTS,
    even_ranges,
    parse_cluster_nodes,
    parse_cluster_slots,
    server_major,
)
from syncmap.testing.clusterset import ClusterSet, MigrationStep
from syncmap.testing.faults import admin_client, kill_subscribers, master_clients, subscribers
from syncmap.testing.scenarios_cache import delete_map
from syncmap.testing.scenarios_store import delete_map_keys
from syncmap.testing.wait import wait_until


def _views(cluster: ClusterSet) -> list[tuple[str, tuple[object, ...]]]:
    """Each running node's (cluster_state, CLUSTER SLOTS), asked node by node."""
    views = []
    for node in cluster.servers:
        if node.running:
            with node.client(socket_timeout=2.0) as c:
                state = c.execute_command("CLUSTER", "INFO").decode().split("\r\n", 1)[0]
                views.append((state, parse_cluster_slots(c.execute_command("CLUSTER", "SLOTS"))))
    return views


def _owner_everywhere(cluster: ClusterSet, slot: int) -> set[str]:
    """The master id each running node names for ``slot``."""
    return {m for _, view in _views(cluster) for s, e, m, _ in view if s <= slot <= e}


def test_the_cluster_starts_and_every_node_agrees(
    shared_cluster: ClusterSet, record_property: pytest.RecordProperty
) -> None:
    c = shared_cluster
    record_property("startup_seconds", round(c.startup_seconds, 3))
    assert len(c.servers) == 6
    assert c.url == "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in c.servers)
    assert c.startup_nodes == [("127.0.0.1", n.port) for n in c.servers]
    views = _views(c)
    assert {state for state, _ in views} == {"cluster_state:ok"}
    assert len({view for _, view in views}) == 1, views  # one slot map, the same everywhere
    slot_map = views[0][1]
    assert [(s, e) for s, e, _, _ in slot_map] == even_ranges(3)
    assert sum(e - s + 1 for s, e, _, _ in slot_map) == SLOTS
    # Three masters with one replica each, and the pids are the processes'.
    nodes = {n.node_id: n for n in c.nodes()}
    masters = [n for n in nodes.values() if n.role == "master"]
    replicas = [n for n in nodes.values() if n.role == "replica"]
    assert len(masters) == 3 and len(replicas) == 3
    assert {r.master_id for r in replicas} == {m.node_id for m in masters}
    assert {n.pid for n in nodes.values()} == {s.pid for s in c.servers}
    for s, e, master_id, replica_ids in slot_map:
        assert nodes[master_id].slots == ((s, e),)
        assert c.master_for_slot(s).node_id == master_id
        assert {nodes[r].master_id for r in replica_ids} == {master_id}


def test_a_key_set_through_redis_cluster_is_on_its_slots_master_and_replica(
    shared_cluster: ClusterSet,
) -> None:
    c = shared_cluster
    client = c.client()
    for key in ("a", "b", "c", "{user1}:x"):
        client.set(key, key.upper())
        assert client.get(key) == key.upper().encode()
        master = c.master_for_slot(c.slot_of(key))
        with c.node_client(master) as direct:
            assert direct.get(key) == key.upper().encode()
            assert direct.execute_command("WAIT", 1, 5000) == 1
        (replica,) = c.replicas_of(master)
        with c.node_client(replica) as direct:
            direct.execute_command("READONLY")
            assert direct.get(key) == key.upper().encode()
    # The other masters answer MOVED for it: the map is really split.
    other = next(m for m in c.masters() if m is not c.master_for_slot(c.slot_of("a")))
    with c.node_client(other) as direct, pytest.raises(MovedError):
        direct.get("a")


def test_kill_master_promotes_the_replica_and_acknowledged_writes_survive(
    redis_cluster: ClusterSet, record_property: pytest.RecordProperty
) -> None:
    c = redis_cluster
    slot = c.slot_of("{k}")
    old = c.master_for_slot(slot)
    (replica,) = c.replicas_of(old)
    with c.node_client(old) as direct:
        for i in range(100):
            direct.set(f"{{k}}{i}", i)
        assert direct.execute_command("WAIT", 1, 5000) == 1  # the replica has all 100
    done = c.kill_master(slot)
    record_property("failover_seconds", round(done.seconds, 3))
    assert (done.old, done.new) == (old, replica) and not old.running
    assert _owner_everywhere(c, slot) == {replica.node_id}
    assert {state for state, _ in _views(c)} == {"cluster_state:ok"}
    client = c.client()
    assert [client.get(f"{{k}}{i}") for i in range(100)] == [str(i).encode() for i in range(100)]
    # The killed master comes back as the replica of the one that took its slots.
    c.restart(old)
    back = next(n for n in c.nodes() if n.node_id == old.node_id)
    assert (back.role, back.master_id, back.failed) == ("replica", replica.node_id, False)
    assert _owner_everywhere(c, slot) == {replica.node_id}


def test_a_graceful_failover_swaps_master_and_replica(redis_cluster: ClusterSet) -> None:
    c = redis_cluster
    old = c.master_for_slot(0)
    (replica,) = c.replicas_of(old)
    c.client().set("{a}", "1")
    done = c.failover(replica)
    assert (done.old, done.new) == (old, replica) and old.running
    assert _owner_everywhere(c, 0) == {replica.node_id}
    assert [n.node_id for n in c.replicas_of(replica)] == [old.node_id]
    with pytest.raises(ValueError, match="is a master"):
        c.failover(replica)


def test_migrate_slot_moves_its_keys_and_clients_follow_ask_then_moved(
    redis_cluster: ClusterSet,
) -> None:
    c = redis_cluster
    slot = c.slot_of("{m}")
    keys = [f"{{m}}{i}" for i in range(6)]
    client = c.client()  # its slot map predates the migration
    for key in keys:
        client.set(key, key)
    source = c.master_for_slot(slot)
    target = next(m for m in c.masters() if m is not source)
    seen: list[MigrationStep] = []
    raw = c.node_client(source)

    def mid_migration(step: MigrationStep) -> None:
        seen.append(step)
        if seen.count("batch") != 1 or step != "batch":
            return
        remaining = set(raw.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 10))
        gone = [k for k in keys if k.encode() not in remaining]
        assert len(gone) == 2  # the first batch left the source
        # The ASK window: the source answers ASK for a key it no longer has, and the client
        # follows it to the target; a key still here is served here.
        with pytest.raises(AskError, match=f"^{slot} 127.0.0.1:{target.port}$") as asked:
            raw.get(gone[0])
        assert type(asked.value) is AskError  # not its subclass MovedError
        assert raw.get(remaining.pop()) is not None
        assert [client.get(k) for k in keys] == [k.encode() for k in keys]
        assert _owner_everywhere(c, slot) == {source.node_id}

    assert c.migrate_slot(slot, target, hook=mid_migration, batch=2) == len(keys)
    assert seen == ["migrating", "batch", "batch", "batch", "moved"]
    assert _owner_everywhere(c, slot) == {target.node_id}
    with pytest.raises(MovedError, match=f"^{slot} 127.0.0.1:{target.port}$"):
        raw.get(keys[0])
    raw.close()
    assert [client.get(k) for k in keys] == [k.encode() for k in keys]  # MOVED followed
    with c.node_client(target) as direct:
        assert direct.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == len(keys)
    assert c.migrate_slot(slot, target) == 0  # already there
    with pytest.raises(ValueError, match="not a master"):
        c.migrate_slot(slot, c.replicas_of(source)[0])


def test_sharded_pubsub_reaches_the_shard_and_only_it(shared_cluster: ClusterSet) -> None:
    """SSUBSCRIBE on the replica of a channel's shard gets an SPUBLISH sent to its master; a node
    of another shard refuses the subscription (MOVED).  Redis 6.2 has no sharded pub/sub."""
    c = shared_cluster
    channel = "{ch}changes"
    master = c.master_for_slot(c.slot_of(channel))
    (replica,) = c.replicas_of(master)
    other = next(m for m in c.masters() if m is not master)
    with c.node_client(replica) as sub_client, c.node_client(other) as elsewhere:
        sub = sub_client.pubsub()
        if server_major(c.binary) < 7:
            with pytest.raises(redis.ResponseError, match="unknown command"):
                sub.ssubscribe(channel)
                sub.get_message(timeout=5.0)
            return
        sub.ssubscribe(channel)
        assert sub.get_message(timeout=5.0)["type"] == "ssubscribe"
        with pytest.raises(MovedError):
            elsewhere.execute_command("SSUBSCRIBE", channel)
        c.client().spublish(channel, "hello")
        message = sub.get_message(timeout=5.0)
        assert message is not None and (message["type"], message["data"]) == ("smessage", b"hello")
        sub.close()


def test_pause_stops_a_node_until_the_timer_resumes_it(redis_cluster: ClusterSet) -> None:
    c = redis_cluster
    node = c.servers[4]
    c.pause(node, seconds=0.5)
    with node.client(socket_timeout=0.2, retry=None) as probe:
        with pytest.raises(redis.TimeoutError):
            probe.ping()
        wait_until(lambda: _answers(probe), 10, "the paused node answering again")


def _answers(probe: redis.Redis) -> bool:
    try:
        return bool(probe.ping())
    except redis.TimeoutError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie still answers kill(0)
        return fh.read().split(") ")[1][0] != "Z"


def test_close_stops_every_node_and_removes_the_dirs(cluster_binary: str) -> None:
    c = ClusterSet(binary=cluster_binary, masters=1, replicas=1)
    assert [n.role for n in c.nodes()].count("replica") == 1
    pids = [n.pid for n in c.servers]
    dirs = [n.dir for n in c.servers]
    c.pause(c.servers[0])  # a stopped process must be stopped too
    c.close()
    assert not any(_alive(pid) for pid in pids if pid is not None)
    assert not any(d.exists() for d in dirs)
    c.close()  # idempotent


def test_a_failed_start_leaves_nothing_behind(cluster_binary: str) -> None:
    live_before = set(serverproc._LIVE)
    with pytest.raises(ConfigurationError, match="did not happen in time"):
        ClusterSet(binary=cluster_binary, masters=1, replicas=1, ready_timeout=0.0)
    assert set(serverproc._LIVE) == live_before


def test_parse_cluster_nodes_reads_slots_roles_and_skips_migration_marks() -> None:
    reply = (
        b"aaa 127.0.0.1:7000@17000,host myself,master - 0 0 1 connected 0-10 12 [11->-bbb]\n"
        b"bbb 127.0.0.1:7001@17001 master,fail - 0 0 2 connected [11-<-aaa] 11 13-16383\n"
        b"ccc :7002@17002 slave aaa 0 0 1 connected\n"
    )
    a, b, cc = parse_cluster_nodes(reply)
    assert (a.addr, a.role, a.slots, a.master_id) == (("127.0.0.1", 7000), "master",
                                                      ((0, 10), (12, 12)), None)  # fmt: skip
    assert b.failed and b.slots == ((11, 11), (13, 16383))
    assert (cc.role, cc.master_id, cc.host) == ("replica", "aaa", "")
    assert even_ranges(3) == [(0, 5460), (5461, 10922), (10923, 16383)]


# ---- the scenarios' faults and cleanup on a cluster (syncmap.testing.faults) -----------------


def _port(client: redis.Redis) -> int:
    return int(client.connection_pool.connection_kwargs["port"])


def test_the_scenario_faults_reach_every_master(shared_cluster: ClusterSet) -> None:
    """``master_clients``: every master, where a map's buckets and their subscribers live; a
    one-node fault (control: the first master alone) leaves the others' subscribers alone."""
    c = shared_cluster
    masters = master_clients(c.url)
    try:
        assert sorted(_port(a) for a in masters) == sorted(m.port for m in c.masters())
        before = [len(subscribers(a)) for a in masters]
        with SyncMap("faults", c.url) as m:
            m.update((f"k{i}", i) for i in range(64))
            # one SSUBSCRIBE connection per master: the map has buckets on each
            now = [len(subscribers(a)) for a in masters]
            assert [n - b for n, b in zip(now, before, strict=True)] == [1, 1, 1]
            assert kill_subscribers(masters[0]) == 1 + before[0]
            assert [len(subscribers(a)) for a in masters[1:]] == [n + 1 for n in before[1:]]
            assert sum(kill_subscribers(a) for a in masters[1:]) == 2 + sum(before[1:])
    finally:
        for a in masters:
            a.close()


def test_admin_client_is_a_keys_master_and_cleanup_deletes_over_every_master(
    shared_cluster: ClusterSet,
) -> None:
    """``admin_client(key=)``: the master of the key's slot (none without a key); the scenarios'
    cleanup deletes a map spread over every master, one DEL per key (a DEL of keys in two slots
    is refused, CROSSSLOT: ``syncmap verify --url redis+cluster://`` crashed at its cleanup)."""
    c = shared_cluster
    with pytest.raises(ConfigurationError, match="pass key="):
        admin_client(c.url)
    for name in ("gone", "gone-too"):
        with SyncMap(name, c.url) as m:
            m.update((f"k{i}", i) for i in range(64))
    data = Layout("sm", "gone", 16).data(5)
    with admin_client(c.url, key=data) as admin:
        assert _port(admin) == c.master_for_slot(c.slot_of(data)).port
        assert admin.hlen(data) > 0  # served there: no MOVED
    assert delete_map_keys(c.url, "gone", "sm") == 17  # its meta hash and 16 buckets
    assert delete_map(c.url, "gone-too") == 17
    assert c.client().dbsize() == 0
