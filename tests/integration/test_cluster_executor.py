"""The Cluster topology and executors against a real Redis Cluster (issue 14 item 1): a batch
split per owning master with its order kept, MOVED and ASK followed, a trailing WAIT asked of
every master that wrote, and an unreachable master told apart from the others."""

from __future__ import annotations

import threading

import pytest
from redis.exceptions import TryAgainError

from syncmap import SyncMap
from syncmap.config import MapConfig
from syncmap.errors import ConfigurationError, StoreUnavailable, WriteOutcomeUnknown
from syncmap.keys import Layout, bucket_of, encode_key
from syncmap.store.cluster import ClusterTopology, slot_for
from syncmap.store.node import NodeExecutor
from syncmap.store.topology import open_topology
from syncmap.testing.clusterproxy import announce
from syncmap.testing.clusterset import ClusterSet
from syncmap.testing.proxy import FaultProxy

KEYS = [f"key:{i}" for i in range(60)]


def _topology(cluster: ClusterSet) -> ClusterTopology:
    topology = open_topology(cluster.url, timeout=5.0)
    assert isinstance(topology, ClusterTopology)
    return topology


def test_urls_parse_and_bad_ones_say_why() -> None:
    t = open_topology("redis+cluster://u:p@10.0.0.1:7000,10.0.0.2,[::1]:7002", timeout=1.0)
    assert isinstance(t, ClusterTopology) and t.sharded and t.kind == "cluster"
    assert [e.address for e in t.startup] == ["10.0.0.1:7000", "10.0.0.2:6379", "::1:7002"]
    assert t.startup[0].username == "u" and t.startup[0].password == "p"
    for bad, why in [("redis+cluster://h:7000/3", "one database"),
                     ("redis+cluster://h:7000?ssl_ca_certs=x", "rediss"),
                     ("redis+cluster://h:x", "not a number")]:  # fmt: skip
        with pytest.raises(ConfigurationError, match=why):
            open_topology(bad)


def test_a_batch_over_every_master_keeps_its_order(shared_cluster: ClusterSet) -> None:
    ex = _topology(shared_cluster).executor(timeout=5.0)
    try:
        cmds = [c for k in KEYS for c in (("SET", k, k.upper()), ("GET", k))]
        replies = ex.call(cmds, write=True)
        assert replies[1::2] == [k.upper().encode() for k in KEYS]
        assert len({shared_cluster.master_for_slot(slot_for(k)).port for k in KEYS}) == 3
    finally:
        ex.close()


async def test_the_async_executor_sends_each_masters_pipeline(shared_cluster: ClusterSet) -> None:
    ex = _topology(shared_cluster).async_executor(timeout=5.0)
    try:
        await ex.call([("SET", k, "v") for k in KEYS], write=True)
        assert await ex.call([("GET", k) for k in KEYS], write=False) == [b"v"] * len(KEYS)
    finally:
        await ex.aclose()


def test_moved_and_ask_are_followed_and_nothing_runs_twice(redis_cluster: ClusterSet) -> None:
    topology = _topology(redis_cluster)
    ex = topology.executor(timeout=5.0)
    key = "moving"
    slot = slot_for(key)
    ex.call([("SET", key, 0)], write=True)
    source = redis_cluster.master_for_slot(slot)
    target = next(m for m in redis_cluster.masters() if m is not source)
    seen: list[object] = []

    def mid_migration(step: str) -> None:
        if step == "moved":  # the key is on the target, the slot still the source's: ASK
            seen.append(ex.call([("INCR", key)], write=True)[0])

    generation = topology.generation
    redis_cluster.migrate_slot(slot, target, hook=mid_migration)
    seen.append(ex.call([("INCR", key)], write=True)[0])  # the source now answers MOVED
    assert seen == [1, 2]  # each INCR ran exactly once
    assert topology.generation > generation
    assert topology.owner(slot) == f"{target.host}:{target.port}"
    ex.close()


def test_wait_is_asked_of_every_master_that_wrote(shared_cluster: ClusterSet) -> None:
    ex = _topology(shared_cluster).executor(timeout=5.0)
    try:
        replies = ex.call([*(("SET", k, 1) for k in KEYS), ("WAIT", 1, 2000)], write=True)
        assert replies[-1] == 1  # the smallest count: every master's replica confirmed
    finally:
        ex.close()


def test_an_unreachable_master_fails_only_its_own_commands(redis_cluster: ClusterSet) -> None:
    topology = _topology(redis_cluster)
    ex = topology.executor(timeout=2.0)
    ex.call([("SET", k, 1) for k in KEYS], write=True)  # connections to every master
    victim = redis_cluster.master_for_slot(slot_for(KEYS[0]))
    theirs = [k for k in KEYS if redis_cluster.master_for_slot(slot_for(k)) is victim]
    others = [k for k in KEYS if k not in theirs]
    victim.kill()  # refused from now on, before its replica takes over
    replies = ex.call([("INCR", k) for k in KEYS], write=True, partial=True)
    failed = [k for k, r in zip(KEYS, replies, strict=True) if isinstance(r, StoreUnavailable)]
    assert failed == theirs
    assert all(r == 2 for r in replies if not isinstance(r, Exception))
    # Without partial: the other masters ran their part first, so the outcome is partly unknown.
    with pytest.raises(WriteOutcomeUnknown, match="had already run"):
        ex.call([("INCR", k) for k in others + theirs], write=True)
    ex.close()


# A pipeline that keeps its master busy for 0.3 s, then reads the server's clock; and one that
# reads it at once.  Every node of the fixture runs on this host's clock.
BUSY = """local t = redis.call('TIME'); local t0 = t[1] * 1e6 + t[2]
repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] - t0 >= 300000
return t"""
NOW = "return redis.call('TIME')"


def _micros(reply: list[bytes]) -> int:
    return int(reply[0]) * 1_000_000 + int(reply[1])


def test_every_masters_pipeline_is_sent_before_any_reply_is_read(
    shared_cluster: ClusterSet,
) -> None:
    """Write all, then read all: master B runs its pipeline while master A is still busy with
    A's, so B's clock reading comes before A's.  Control: the same two pipelines sent one after
    the other (the thread executor before issue 14's benchmarks) read B's clock after A's."""
    topology = _topology(shared_cluster)
    by_master = {shared_cluster.master_for_slot(slot_for(k)).port: k for k in KEYS}
    key_a, key_b = list(by_master.values())[:2]
    cmds = [("EVAL", BUSY, 1, key_a), ("EVAL", NOW, 1, key_b)]  # A's group is sent first
    ex = topology.executor(timeout=5.0)
    try:
        a_done, b_now = (_micros(r) for r in ex.call(cmds, write=False))
        assert b_now < a_done, "B ran only after A's reply was read: sent one by one"
    finally:
        ex.close()
    # Control: one by one, each master's replies read before the next pipeline is sent.
    nodes = [NodeExecutor(topology.node(topology.owner(slot_for(k))), timeout=5.0)
             for k in (key_a, key_b)]  # fmt: skip
    try:
        first, then = (n.raw([c], write=False, until=None)[0]
                       for n, c in zip(nodes, cmds, strict=True))  # fmt: skip
        assert _micros(then) > _micros(first)
    finally:
        for n in nodes:
            n.close()


def test_commands_still_redirected_fail_like_an_unreachable_masters(
    redis_cluster: ClusterSet,
) -> None:
    # A two-key script in a migrating slot whose second key does not exist is refused with
    # TRYAGAIN until the slot is handed over (Redis cannot run it on either side).  When the
    # executor gives up on it, the other master's command of the same call has already run:
    # with partial=True only the refused command carries the error; without, the write's
    # outcome is partly unknown, never "nothing ran" (StoreUnavailable).
    topology = _topology(redis_cluster)
    ex = topology.executor(timeout=2.0)
    moving, other = "{mig}a", "elsewhere"  # slots 13513 and 6140: two masters
    ex.call([("SET", moving, 1), ("SET", other, 0)], write=True)
    source = redis_cluster.master_for_slot(slot_for(moving))
    target = next(m for m in redis_cluster.masters() if m is not source)
    assert redis_cluster.master_for_slot(slot_for(other)) is not source, "pick another key"
    script = ("EVAL", "return redis.call('INCR', KEYS[1])", 2, moving, "{mig}absent")
    seen: list[object] = []

    def mid_migration(step: str) -> None:
        if step == "moved":  # both sides marked, the key on the target: TRYAGAIN
            seen.append(ex.call([("INCR", other), script], write=True, partial=True))
            with pytest.raises(WriteOutcomeUnknown, match="had already run"):
                ex.call([("INCR", other), script], write=True)
            with pytest.raises(StoreUnavailable, match="still redirected") as alone:
                ex.call([script], write=True)  # refused at every try: nothing ran anywhere
            assert not isinstance(alone.value, WriteOutcomeUnknown)

    try:
        redis_cluster.migrate_slot(slot_for(moving), target, hook=mid_migration)
        (replies,) = seen
        assert replies[0] == 1 and isinstance(replies[1], StoreUnavailable)
        assert ex.call([("GET", other), ("GET", moving)], write=False) == [b"2", b"1"]  # INCR x2
    finally:
        ex.close()


def test_a_slot_left_without_a_master_is_looked_up_again_on_the_next_call(
    redis_cluster: ClusterSet,
) -> None:
    # During a failover the slot map names no master for the dead one's slots (CLUSTER SHARDS
    # marks it failed).  Once the replica has taken over, the very next call must find it: a
    # slot without a master is read again, not trusted until something else reads the map.
    topology = _topology(redis_cluster)
    ex = topology.executor(timeout=2.0)
    key = KEYS[0]
    ex.call([("SET", key, 1)], write=True)
    victim = redis_cluster.master_for_slot(slot_for(key))
    seen: list[str] = []
    done = threading.Event()

    def write_until_done() -> None:
        while not done.is_set():
            try:
                ex.call([("INCR", key)], write=True)
            except StoreUnavailable as exc:
                seen.append(str(exc))
            except WriteOutcomeUnknown:
                pass  # the connection the kill cut
            done.wait(0.01)  # pacing, as a retrying client would

    writer = threading.Thread(target=write_until_done)
    writer.start()
    try:
        redis_cluster.kill_master(victim)
    finally:
        done.set()
        writer.join()
    assert any("no master serves" in s for s in seen), seen[-3:]
    assert ex.call([("INCR", key)], write=True)[0] >= 2  # on the promoted replica, at once
    ex.close()


def test_a_master_lost_between_the_write_and_its_wait_is_not_replicated(
    redis_cluster: ClusterSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The WAIT of a call goes to each master that wrote after the writes' replies came back.
    # The master dies in between (the fault is injected there, just before the WAIT): the
    # write ran, so the call reports it unconfirmed (a count of 0: the map raises
    # NotReplicated), never "nothing ran" (StoreUnavailable).
    topology = _topology(redis_cluster)
    ex = topology.executor(timeout=2.0)
    key = KEYS[0]
    victim = redis_cluster.master_for_slot(slot_for(key))
    send = NodeExecutor.send

    def kill_before_wait(self: NodeExecutor, commands: list[tuple[object, ...]], **kw: object
                         ) -> object:  # fmt: skip
        if commands and commands[0][0] == "WAIT" and victim.running:
            victim.kill()
        return send(self, commands, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(NodeExecutor, "send", kill_before_wait)
    try:
        replies = ex.call([("SET", key, "ran"), ("WAIT", 1, 500)], write=True)
        assert replies == [b"OK", 0]
        assert not victim.running
    finally:
        ex.close()


async def test_the_async_executor_too_reports_a_lost_wait_as_unconfirmed(
    redis_cluster: ClusterSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    from syncmap.store.anode import AsyncNodeExecutor

    ex = _topology(redis_cluster).async_executor(timeout=2.0)
    key = KEYS[0]
    victim = redis_cluster.master_for_slot(slot_for(key))
    raw = AsyncNodeExecutor.raw

    async def kill_before_wait(self: AsyncNodeExecutor, commands: list[tuple[object, ...]],
                               **kw: object) -> list[object]:  # fmt: skip
        if commands and commands[0][0] == "WAIT" and victim.running:
            victim.kill()
        return await raw(self, commands, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(AsyncNodeExecutor, "raw", kill_before_wait)
    try:
        assert await ex.call([("SET", key, "ran"), ("WAIT", 1, 500)], write=True) == [b"OK", 0]
    finally:
        await ex.aclose()


def _write_during_a_migration(cluster: ClusterSet) -> object:
    """A two-key script in a slot being handed over, sent while the hand-over goes on: the
    reply, or the error the executor gave up with."""
    topology = _topology(cluster)
    ex = topology.executor(timeout=2.0)
    moving = "{mig}a"
    ex.call([("SET", moving, 1)], write=True)
    source = cluster.master_for_slot(slot_for(moving))
    target = next(m for m in cluster.masters() if m is not source)
    script = ("EVAL", "return redis.call('INCR', KEYS[1])", 2, moving, "{mig}absent")
    got: list[object] = []
    refused = threading.Event()

    def write() -> None:
        try:
            got.append(ex.call([script], write=True)[0])
        except StoreUnavailable as exc:
            got.append(exc)

    def mid_migration(step: str) -> None:
        if step == "moved":  # TRYAGAIN from here until the slot is handed over
            # The source answers ASK (the key left), the target TRYAGAIN (one key of two).
            probe = NodeExecutor(topology.node(f"{target.host}:{target.port}"), timeout=2.0)
            if isinstance(probe.raw([("ASKING",), script], write=True, until=None)[1],
                          TryAgainError):  # fmt: skip
                refused.set()
            probe.close()
            t = threading.Thread(target=write)
            t.start()
            threads.append(t)
            t.join(0.2)  # the write meets TRYAGAIN for a while, then the hand-over goes on

    threads: list[threading.Thread] = []
    try:
        cluster.migrate_slot(slot_for(moving), target, hook=mid_migration)
        for t in threads:
            t.join()
    finally:
        ex.close()
    assert refused.is_set(), "the slot never answered TRYAGAIN: the test tested nothing"
    return got[0]


def test_a_write_meeting_tryagain_is_sent_again_until_the_migration_ends(
    redis_cluster: ClusterSet,
) -> None:
    assert _write_during_a_migration(redis_cluster) == 2


def test_control_giving_up_at_the_first_tryagain_refuses_the_write(
    redis_cluster: ClusterSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    from syncmap.store import clusterexec

    monkeypatch.setattr(clusterexec, "TRY_AGAIN_ROUNDS", 1)
    assert isinstance(_write_during_a_migration(redis_cluster), StoreUnavailable)


def test_a_master_that_moved_to_another_address_is_found_by_the_very_next_call(
    redis_cluster: ClusterSet,
) -> None:
    """A master that comes back on another address (a restarted pod announcing a new IP or
    port): a call that finds its old address dead reads the slot map again and sends its
    commands to the new one, instead of failing with StoreUnavailable although the cluster is
    healthy; a map opened at that moment opens.  Here the master first announces a proxy's
    port, then its own again, and the proxy is closed: this process's topology still names the
    proxy's port, as nobody told it."""
    cs = redis_cluster
    node = cs.masters()[0]
    cfg = MapConfig()
    layout = Layout("sm", "moved-addr", cfg.buckets)

    def owner(key: str) -> object:
        bucket = bucket_of(encode_key(key, cfg.max_key_bytes), cfg.buckets)
        return cs.master_for_slot(ClusterSet.slot_of(layout.data(bucket)))

    mine = [k for k in (f"k{i}" for i in range(400)) if owner(k) == node][:5]
    assert mine, "no key of the map on the first master"
    with SyncMap("moved-addr", cs.url, config=cfg) as m:
        with FaultProxy(node.host, node.port) as proxy:
            announce(cs, node, proxy.port)  # this process's topology told: through the proxy
            m[mine[0]] = 1
            assert proxy.connections > 0, "the map's writes did not go through the proxy"
            announce(cs, node, 0, tell_topologies=False)
        # The proxy is gone; the topology still names its port.
        m[mine[1]] = 2  # a single write
        m.update({k: 3 for k in mine[2:]})  # a partial call over buckets
        assert len(m) == len(mine)
        with SyncMap("moved-addr", cs.url, config=cfg) as other:  # opens (probe, self-check)
            assert other.get(mine[0]) == 1
