"""The faults of the Cluster scenarios (``scenarios_cluster``), each a function of a
:class:`~syncmap.testing.clusterload.Run` called while the loads run (``run_load``): it records
what it did in ``run.marks`` (monotonic ns) and ``run.notes`` (figures).

* :func:`kill_master` (S24): SIGKILL a shard's master, its replica promoted, then restart it;
* :func:`migrate` (S25): the slots of some buckets moved between masters, one after another;
* :func:`migrate_atomic` (S25-atomic): the same with Valkey 9's atomic slot migration;
* :func:`kill_feeds` (S28): every subscriber connection of one master cut, master after master.

While a fault lasts, the scenario's writer rewrites the struck buckets' keys (:func:`hammer`,
:func:`kill_feed`), so their change messages are published exactly when a subscriber may miss
them: the guard-off controls then certainly serve stale entries.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .clusterload import Run, bucket_owners, bucket_slot, key_in, keys_in, redirects
from .clusternode import Addr
from .clusterset import AtomicStep
from .faults import kill_subscribers, subscribers

_ns = time.monotonic_ns
Fault = Callable[[Run], None]


# ---- S24 ---------------------------------------------------------------------------------------


def hammer(run: Run, keys: list[str], stop: threading.Event) -> threading.Thread:
    """The scenario's writer rewrites each of ``keys`` until one write of it is acknowledged
    (or ``stop``): started at the kill, those writes land on the promoted replica as soon as
    this process learns of it, which may be before a server process's subscriber has moved
    there: that server then misses their messages.  Each key is written once on the new master
    and left alone, so an entry that missed it stays stale until the load rewrites the key."""

    def rewrite() -> None:
        todo = list(keys)
        while todo and not stop.wait(0.002):  # pacing while the shard refuses every write
            todo = [key for key in todo if not run.writer.write(key)]

    thread = threading.Thread(target=rewrite, name="hammer", daemon=True)
    thread.start()
    return thread


def kill_master(warm: float) -> Fault:
    """After ``warm`` s: SIGKILL the master of bucket 0 (the scenario's writer rewriting its
    buckets' keys meanwhile, :func:`hammer`), wait until its replica serves its slots
    everywhere (``failover_s``), then restart it (it rejoins as the new master's replica, so
    ``wait_replicas=1`` writes can be confirmed again: ``restart_s``)."""

    def fault(run: Run) -> None:
        owners = bucket_owners(run.cs, run.name)
        victim = run.cs.server(owners[0])
        buckets = sorted(b for b, a in owners.items() if a == owners[0])
        run.notes["victim_buckets"] = buckets
        time.sleep(warm)  # the load before the fault: a schedule, not a synchronisation
        stop = threading.Event()
        thread = hammer(run, keys_in(buckets), stop)
        try:
            done = run.cs.kill_master(victim)
            run.marks["failover"] = _ns()
        finally:
            thread.join(5.0)
            stop.set()
        # Failover.seconds runs from the SIGKILL itself (kill_master asks the cluster a few
        # questions before it): the kill's instant, not this thread's.
        run.marks["fault"] = run.marks["failover"] - int(done.seconds * 1e9)
        run.notes["failover_s"] = round(done.seconds, 2)
        if run.stores:
            run.notes["restart_s"] = round(run.cs.restart(done.old), 2)
            run.marks["restarted"] = _ns()

    return fault


# ---- S25 ---------------------------------------------------------------------------------------

MIN_MOVES = 2
"""Migrations :func:`migrate` and :func:`migrate_atomic` make even when the window is over:
on a loaded machine one migration (with its writes) outlasted the 1.5 s window of the short
form, and a run with one migration fails its "the fault was injected" check."""
ASK_HOLD = 0.2  # s each migration holds its ASK window open (keys moved, slot still the source's)


def _buckets_to_migrate(run: Run, warm: float) -> tuple[list[Addr], list[int]]:
    """The masters, and one bucket per master (the lowest it owns), the first two given a key
    with a TTL (so their expiry set exists; see :func:`migrate`); after ``warm`` s of load."""
    masters = [m.addr for m in run.cs.masters()]
    owners = bucket_owners(run.cs, run.name)
    chosen = [min(b for b, a in owners.items() if a == m) for m in masters]
    for bucket in chosen[:2]:
        run.writer.map.set(key_in(bucket, "ttl-"), "expiry set", ttl=3600)
    time.sleep(warm)  # the load before the fault: a schedule, not a synchronisation
    return masters, chosen


def _next_move(run: Run, masters: list[Addr], chosen: list[int], n: int) -> tuple[int, Addr]:
    """The ``n``-th migration's bucket (the chosen ones in turn) and the master after its
    owner now."""
    bucket = chosen[n % len(chosen)]
    owner = bucket_owners(run.cs, run.name)[bucket]
    return bucket, masters[(masters.index(owner) + 1) % len(masters)]


def migrate(warm: float, until: float) -> Fault:
    """From ``warm`` s to ``until`` s into the load (and at least ``MIN_MOVES`` times):
    migrate the slot of one bucket after another (the lowest bucket of each master, in turn)
    to the next master, the classic way (``ClusterSet.migrate_slot``), each with :func:`ask_window`.

    The first two of those buckets get a key with a TTL, so their expiry set exists: a write
    script (it names the bucket's data hash and expiry set) then finds both keys on one side
    and runs, on the target after ``ASK`` once they moved.  The third has no expiry set, and
    Redis refuses its scripts with ``TRYAGAIN`` (a multi-key command with a key missing) for
    the whole migration: both paths are taken."""

    def fault(run: Run) -> None:
        masters, chosen = _buckets_to_migrate(run, warm)
        before, moved, keys, n = redirects(run.cs), set(), 0, 0
        end = run.marks["start"] + int(until * 1e9)
        run.marks["fault"] = _ns()
        while _ns() < end or n < MIN_MOVES:
            bucket, target = _next_move(run, masters, chosen, n)
            hammers: list[threading.Thread] = []
            hook = ask_window(run, bucket, hammers)
            keys += run.cs.migrate_slot(bucket_slot(run.name, bucket), target, hook=hook)
            for thread in hammers:
                thread.join(5.0)
            moved.add(bucket)
            n += 1
        run.marks["fault_end"] = _ns()
        after = redirects(run.cs)
        run.notes.update(
            migrations=n,
            keys_moved=keys,
            victim_buckets=sorted(moved),
            **{f"redirects_{k.lower()}": after[k] - before[k] for k in after},
        )

    return fault


def ask_window(run: Run, bucket: int, hammers: list[threading.Thread]) -> Callable[[str], None]:
    """At the step "moved" (every key on the target, the slot still the source's): start
    :func:`hammer` on the bucket's workload keys and hold the window ``ASK_HOLD`` s.  Its
    writes run on the target (after ``ASK``), whose subscribers of the bucket's channel are
    none yet: every server misses their messages; or, for a bucket without an expiry set, are
    refused (``TRYAGAIN``) until the slot is handed over, and the first that succeed run on
    the new owner, possibly before the server processes' subscribers have moved there."""

    def hook(step: str) -> None:
        if step == "moved":
            hammers.append(hammer(run, keys_in([bucket]), threading.Event()))
            time.sleep(ASK_HOLD)  # the window's length is the fault's shape

    return hook


# ---- S25-atomic ----------------------------------------------------------------------------------


def migrate_atomic(warm: float, until: float) -> Fault:
    """From ``warm`` s to ``until`` s into the load (and at least ``MIN_MOVES`` times):
    migrate the slot of one bucket after another (the lowest bucket of each master, in turn)
    to the next master with Valkey 9's atomic slot migration
    (``ClusterSet.migrate_slot_atomic``: one ``CLUSTER MIGRATESLOTS``).

    The first two of those buckets get a key with a TTL, so their expiry set exists and moves
    with the data hash.  The moment the target claims the slot (step ``taken-over``), this
    process's slot map is told so (as a ``MOVED`` would) and the scenario's writer writes each
    of the bucket's workload keys once (:func:`hammer`), on the target.  Order of events: the
    target takes the slot -> the writer's writes run there and are published there -> the
    source (its writes paused meanwhile) learns of the new owner and pushes ``sunsubscribe`` to
    its sharded subscribers of the slot -> each server process reads the slot map and
    ``SSUBSCRIBE``s on the target.  The server processes miss those messages whenever the
    writes beat the source's word (the observer, in this process, shares the writer's slot map
    and may not), and nothing rewrites the keys but the load: a client that learnt the new
    owner early, as any client refreshing its slot map from the target may."""

    def fault(run: Run) -> None:
        masters, chosen = _buckets_to_migrate(run, warm)
        before, moved, keys, n, early = redirects(run.cs), set(), 0, 0, 0
        handovers: list[float] = []
        durations: list[float] = []
        end = run.marks["start"] + int(until * 1e9)
        run.marks["fault"] = _ns()
        while _ns() < end or n < MIN_MOVES:
            bucket, target = _next_move(run, masters, chosen, n)
            hammers: list[threading.Thread] = []

            slot = bucket_slot(run.name, bucket)

            def hook(step: AtomicStep, bucket: int = bucket, slot: int = slot,
                     target: tuple[str, int] = target,
                     hammers: list[threading.Thread] = hammers) -> None:  # fmt: skip
                if step == "taken-over":
                    run.writer.map._topology.moved(slot, f"{target[0]}:{target[1]}")  # type: ignore[attr-defined]
                    hammers.append(hammer(run, keys_in([bucket]), threading.Event()))

            done = run.cs.migrate_slot_atomic(slot, target, hook=hook)
            for thread in hammers:
                thread.join(5.0)
            keys += done.keys
            early += done.claim_seen
            handovers.append(done.handover_s)
            durations.append(done.seconds)
            moved.add(bucket)
            n += 1
        run.marks["fault_end"] = _ns()
        after = redirects(run.cs)
        run.notes.update(
            migrations=n,
            keys_moved=keys,
            early_claims=early,
            victim_buckets=sorted(moved),
            handover_s_max=round(max(handovers), 3) if handovers else None,
            migration_s_max=round(max(durations), 3) if durations else None,
            **{f"redirects_{k.lower()}": after[k] - before[k] for k in after},
        )

    return fault


# ---- S28 ---------------------------------------------------------------------------------------

FEED_KILL_EVERY = 1.5  # s between two rounds: longer than Δ, so each round's repair is its own


@dataclass(frozen=True, slots=True)
class FeedKill:
    victim: str
    buckets: tuple[int, ...]
    killed: int  # subscriber connections CLIENT KILL cut
    at_ns: int
    back_ns: int | None  # every subscriber of the victim connected again (CLIENT LIST)
    writes: int  # the scenario's writes to the victim's buckets just after the kill


def kill_feeds(warm: float, until: float) -> Fault:
    """From ``warm`` s to ``until`` s into the load, every ``FEED_KILL_EVERY`` s, a round of
    :func:`kill_feed` on one master (each in turn)."""

    def fault(run: Run) -> None:
        time.sleep(warm)  # the load before the fault: a schedule, not a synchronisation
        owners = bucket_owners(run.cs, run.name)
        masters = list(dict.fromkeys(owners.values()))
        end, kills = run.marks["start"] + int(until * 1e9), list[FeedKill]()
        run.marks["fault"] = _ns()
        while _ns() < end:
            victim = masters[len(kills) % len(masters)]
            buckets = tuple(b for b, a in owners.items() if a == victim)
            kills.append(kill_feed(run, victim, buckets))
            time.sleep(max(0.0, FEED_KILL_EVERY - (_ns() - kills[-1].at_ns) / 1e9))  # schedule
        run.notes["kills"] = kills

    return fault


def kill_feed(run: Run, victim: tuple[str, int], buckets: tuple[int, ...]) -> FeedKill:
    """``CLIENT KILL TYPE pubsub`` on the master ``victim`` (which serves ``buckets``), then
    the scenario's writer writes each workload key of those buckets once, at once: the killed
    subscribers take tens of milliseconds to subscribe again, so most of those messages are
    lost to them, and nothing rewrites the keys (an entry that missed its message stays stale
    until the load writes the key).  Then wait (polling, 5 s at most) until the master has as
    many subscriber connections as before."""
    admin = run.cs.node_client(victim, socket_timeout=2.0)
    try:
        before = len(subscribers(admin))
        at = _ns()
        killed = kill_subscribers(admin)
        writes = sum(run.writer.write(key) for key in keys_in(buckets))
        back, give_up = None, time.monotonic() + 5.0
        while back is None and time.monotonic() < give_up:
            if len(subscribers(admin)) >= before:
                back = _ns()
            else:
                time.sleep(0.002)  # polling CLIENT LIST, with a deadline
        return FeedKill(f"{victim[0]}:{victim[1]}", buckets, killed, at, back, writes)
    finally:
        admin.close()


__all__ = [
    "ASK_HOLD",
    "FEED_KILL_EVERY",
    "Fault",
    "FeedKill",
    "hammer",
    "kill_feeds",
    "kill_master",
    "migrate",
    "migrate_atomic",
]  # fmt: skip
