"""Model-based test of the near-cache core (``syncmap.core.nearcache``) in simulated time.

Three servers, each its own ``NearCache``, share ONE simulated store that follows the Lua scripts
of ``store/scripts.py`` exactly: per bucket an epoch (created by the bucket's first write after it
had none) and a sequence; every write takes ``seq + 1`` of its bucket as the key's version and
publishes ``ChangeMessage(op, bucket, seq, epoch, origin, fields)`` in the same atomic step.

Each server has its own pub/sub connection, modelled as a FIFO (Redis delivers one channel in
order) that can lose messages silently (A4), deliver one twice, deliver one corrupt (dropped,
repair asked, as ``Engine`` does) or disconnect (everything in flight is lost; ``on_feed_down``
now, ``on_feed_up`` on reconnect).  Timer threads may run late (hits then rely on
``valid_until``).  Reads and writes are split into begin (``begin_fill``, the request is sent) /
exec (the command runs in the store) / finish (the reply arrives), so fills race invalidations
(A2) and own writes (A6) in every order.
Probes are sent (``tops()`` taken), executed (they reap expired keys and read every bucket's
``(epoch, seq)``) and applied, possibly much later.  FLUSHALL wipes data and epochs; a restart
without persistence does the same and also cuts every subscriber.

Oracles, checked after every step (time is the simulated ``now``; Δ = ``max_staleness``):

* C2 bounded staleness: every entry a server would serve now (present in ``core.entries`` while
  ``now < core.valid_until``, the hit path's one clock check) holds a write that was still the
  key's state in the store at some moment at or after ``now - Δ``; and none outlives its TTL.
* A2/A3 (no time needed): no entry is older than a change of its key that the server has already
  processed from its feed (a fill or own write that lost the race must not be installed).
* C3 convergence: ``quiesce`` stops faults and writes, delivers everything, lets > Δ pass while
  probing like the engine does; then every cached entry equals the store's live value.
* C4 monotonic reads and C5 read-your-writes, per (server, key), ordered by a global event
  counter (``gid``) so the order stays meaningful when versions restart after FLUSHALL/restart:
  a read returns a state no older than any read that completed, or any own write/delete/clear
  acknowledged, before the read began.
* C6 no phantom: every value read or cached was written, for that key, at that version.
* ``len(entries) <= capacity``.

``test_oracles_catch_each_guard_switched_off`` runs the model with one ``Guards`` flag off and
requires an oracle to fail: the model's green result only counts because of that.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from syncmap.core.nearcache import INF, FillToken, Guards, NearCache
from syncmap.core.wire import OP_CLEAR, OP_DEL, OP_EXPIRE, OP_SET, ChangeMessage
from syncmap.keys import bucket_of, encode_key

DELTA = 1.0
N_SERVERS = 3
KEYS = ("a", "b", "c")
FIELDS = {k: encode_key(k, 1000) for k in KEYS}
EPS = 1e-9
Order = tuple[int, int]  # (gid of the event that made the state, 1 if "expired after it")


@dataclass
class Write:
    """One acknowledged (store-applied) set of ``key``; ``value`` is unique per write."""

    key: str
    value: int
    version: int
    epoch: int
    gid: int
    at: float
    deadline: float
    end: float = INF  # when it stopped being the key's state (overwritten, deleted, wiped)

    @property
    def gone(self) -> float:
        """The moment this write stopped being the key's live state (expiry included)."""
        return min(self.end, self.deadline)


class SimStore:
    """The store of one map: a dict per bucket plus the ``m`` hash (epoch, seq), as in Lua."""

    def __init__(self, nb: int) -> None:
        self.nb = nb
        self.epoch: list[int | None] = [None] * nb
        self.seq = [0] * nb
        self.data: list[dict[str, Write]] = [{} for _ in range(nb)]
        self.absent: dict[str, Order] = dict.fromkeys(KEYS, (0, 0))
        self._epochs = itertools.count(1000)

    def bucket(self, key: str) -> int:
        return bucket_of(FIELDS[key], self.nb)

    def next_seq(self, b: int, n: int) -> tuple[int, int]:
        """``next_seq`` of the Lua prelude: the first of n versions, and the bucket's epoch."""
        if self.epoch[b] is None:
            self.epoch[b] = next(self._epochs)
        first = self.seq[b] + 1
        self.seq[b] += n
        ep = self.epoch[b]
        assert ep is not None
        return first, ep

    def hget(self, key: str) -> tuple[str, Any]:
        """Plain HGET: an expired but unreaped value is returned (the driver checks deadlines)."""
        w = self.data[self.bucket(key)].get(key)
        return ("rec", w) if w is not None else ("absent", self.absent[key])

    def wipe(self) -> None:
        self.epoch = [None] * self.nb
        self.seq = [0] * self.nb
        self.data = [{} for _ in range(self.nb)]


@dataclass(eq=False)  # identity: two ops can look alike
class Op:
    """A read or write this server has sent and not yet seen the reply of."""

    kind: str  # "read" | "set" | "del"
    key: str
    token: FillToken
    rfloor: Order
    wfloor: Order
    value: int = 0
    ttl: float | None = None
    executed: bool = False
    result: Any = None


@dataclass(eq=False)
class Probe:
    sent_at: float
    tops: list[int]
    states: list[tuple[int | None, int]] | None = None


class Server:
    def __init__(self, name: str, core: NearCache) -> None:
        self.name = name
        self.core = core
        # In flight to this server: each message with the (key, state order) it announces.
        self.bus: deque[tuple[ChangeMessage, list[tuple[str, Order]]]] = deque()
        self.seen: dict[str, Order] = dict.fromkeys(KEYS, (0, 0))  # newest change processed
        self.up = True
        self.ops: list[Op] = []
        self.probes: list[Probe] = []
        self.rfloor: dict[str, Order] = dict.fromkeys(KEYS, (0, 0))
        self.wfloor: dict[str, Order] = dict.fromkeys(KEYS, (0, 0))


servers_st = st.integers(0, N_SERVERS - 1)
keys_st = st.sampled_from(KEYS)
ttl_st = st.sampled_from([None, None, None, 0.3, 1.5])
idx_st = st.integers(0, 7)


class CoreModel(RuleBasedStateMachine):
    """Three servers, one store, lossy FIFO buses, simulated time.  See the module docstring."""

    WIPES = True  # FLUSHALL and store restarts
    LOSS = True  # silent message loss and disconnects
    EXTRAS = True  # update, clear, failed requests, duplicates, corrupt messages, delayed probes
    GUARDS: Guards | None = None  # all on; tests switch one off to prove the oracles notice
    ORDERED = True  # False: a relayed feed, whose buses may also deliver out of order

    # ---- set-up ------------------------------------------------------------------------------

    @initialize(nb=st.integers(2, 4), capacity=st.integers(2, 5))
    def setup(self, nb: int, capacity: int) -> None:
        self.now = 0.0
        self.store = SimStore(nb)
        self.gids = itertools.count(1)
        self.values = itertools.count(1)
        self.writes: dict[int, Write] = {}
        self.orphans: list[Op] = []  # writes whose outcome was unknown and that may still run
        self.servers = [
            Server(
                f"s{i}",
                NearCache(
                    nb,
                    capacity=capacity,
                    max_staleness=DELTA,
                    guards=self.GUARDS,
                    ordered=self.ORDERED,
                ),
            )
            for i in range(N_SERVERS)
        ]
        for s in self.servers:  # Engine.start: subscribed and confirmed, then a baseline probe
            s.core.on_feed_up()
            self._probe_now(s)

    # ---- the store, as the Lua scripts run it ------------------------------------------------

    def _publish(self, msg: ChangeMessage, meta: list[tuple[str, Order]]) -> None:
        for s in self.servers:
            if s.up:
                s.bus.append((msg, meta))

    def _end_state(self, key: str) -> None:
        w = self.store.data[self.store.bucket(key)].get(key)
        if w is not None and w.end == INF:
            w.end = self.now

    def _store_set(self, key: str, value: int, ttl: float | None, origin: str) -> Write:
        b = self.store.bucket(key)
        self._end_state(key)
        version, ep = self.store.next_seq(b, 1)
        deadline = self.now + ttl if ttl else INF
        w = Write(key, value, version, ep, next(self.gids), self.now, deadline)
        self.store.data[b][key] = w
        self.writes[value] = w
        self._publish(
            ChangeMessage(OP_SET, b, version, ep, origin, (FIELDS[key],)), [(key, (w.gid, 0))]
        )
        return w

    def _store_delete(self, key: str, origin: str) -> tuple[int, int, int] | None:
        """DELETE mode 'del': (version, gid, epoch) or None when not live (expired: HDELed)."""
        b = self.store.bucket(key)
        w = self.store.data[b].get(key)
        if w is None:
            return None
        if w.deadline <= self.now:
            del self.store.data[b][key]
            self.store.absent[key] = (w.gid, 1)
            return None
        self._end_state(key)
        del self.store.data[b][key]
        version, ep = self.store.next_seq(b, 1)
        gid = next(self.gids)
        self.store.absent[key] = (gid, 0)
        self._publish(
            ChangeMessage(OP_DEL, b, version, ep, origin, (FIELDS[key],)), [(key, (gid, 0))]
        )
        return version, gid, ep

    def _store_mset(self, b: int, items: list[tuple[str, int]], origin: str) -> list[Write]:
        first, ep = self.store.next_seq(b, len(items))
        out = []
        for i, (key, value) in enumerate(items):
            self._end_state(key)
            w = Write(key, value, first + i, ep, next(self.gids), self.now, INF)
            self.store.data[b][key] = w
            self.writes[value] = w
            out.append(w)
        fields = tuple(FIELDS[k] for k, _ in items)
        self._publish(
            ChangeMessage(OP_SET, b, first, ep, origin, fields), [(w.key, (w.gid, 0)) for w in out]
        )
        return out

    def _store_clear(self, b: int, origin: str) -> tuple[int, int, int] | None:
        """CLEAR of one bucket: (version, gid, epoch), or None when the bucket held nothing."""
        if not self.store.data[b]:
            return None
        gid = next(self.gids)
        keys = [k for k in KEYS if self.store.bucket(k) == b]
        for key in keys:
            self._end_state(key)
            self.store.absent[key] = (gid, 0)
        self.store.data[b] = {}
        version, ep = self.store.next_seq(b, 1)
        self._publish(
            ChangeMessage(OP_CLEAR, b, version, ep, origin, ()), [(k, (gid, 0)) for k in keys]
        )
        return version, gid, ep

    def _store_probe(self, origin: str) -> list[tuple[int | None, int]]:
        """PROBE on every bucket: reap due expiries (one 'expire' message), read (epoch, seq)."""
        states: list[tuple[int | None, int]] = []
        for b in range(self.store.nb):
            data = self.store.data[b]
            due = sorted(
                (w.deadline, FIELDS[k], k) for k, w in data.items() if w.deadline <= self.now
            )
            if due:
                for _, _, k in due:
                    self.store.absent[k] = (data.pop(k).gid, 1)
                first, ep = self.store.next_seq(b, len(due))
                fields = tuple(f for _, f, _ in due)
                meta = [(k, self.store.absent[k]) for _, _, k in due]
                self._publish(ChangeMessage(OP_EXPIRE, b, first, ep, origin, fields), meta)
            states.append((self.store.epoch[b], self.store.seq[b]))
        return states

    def _wipe(self) -> None:
        gid = next(self.gids)
        for key in KEYS:
            self._end_state(key)
            self.store.absent[key] = (gid, 0)
        self.store.wipe()

    # ---- the driver's side (map.py / engine.py), per server ----------------------------------

    def _probe_now(self, s: Server) -> None:
        tops = s.core.tops()
        s.core.on_probe(self._store_probe(s.name), self.now, self.now, tops)

    def _observe(
        self, s: Server, op: str, key: str, state: Order, rfloor: Order, wfloor: Order
    ) -> None:
        """A read of ``key`` on ``s`` returned ``state``: C4 and C5 against floors at its start."""
        assert state >= rfloor, (
            f"C4 monotonic reads: {s.name} {op}({key!r}) returned state {state} older than "
            f"{rfloor}, returned by a read that completed before this one began (now={self.now})"
        )
        assert state >= wfloor, (
            f"C5 read-your-writes: {s.name} {op}({key!r}) returned state {state} older than its "
            f"own acknowledged write {wfloor} (now={self.now})"
        )
        s.rfloor[key] = max(s.rfloor[key], state)

    def _check_value(self, key: str, value: Any, version: int, where: str) -> Write:
        w = self.writes.get(value)
        assert w is not None, f"C6 phantom: {where} holds {value!r} for {key!r}, never written"
        assert w.key == key, f"C6 phantom: {where} holds {key!r}={value!r}, written to {w.key!r}"
        assert w.version == version, (
            f"C6: {where} holds {key!r}={value!r} at version {version}, written at {w.version}"
        )
        return w

    def _begin(
        self, s: Server, kind: str, key: str, value: int = 0, ttl: float | None = None
    ) -> Op:
        token = s.core.begin_fill(key, self.store.bucket(key))
        op = Op(kind, key, token, s.rfloor[key], s.wfloor[key], value, ttl)
        s.ops.append(op)
        return op

    def _exec(self, s: Server, op: Op) -> None:
        if op.kind == "read":
            op.result = self.store.hget(op.key)
        elif op.kind == "set":
            op.result = self._store_set(op.key, op.value, op.ttl, s.name)
        else:
            op.result = self._store_delete(op.key, s.name)
        op.executed = True

    def _finish(self, s: Server, op: Op) -> None:
        """The reply arrives: what ``SyncMap._settle_read`` / ``_install`` / ``_delete`` do."""
        s.ops.remove(op)
        core, key, token = s.core, op.key, op.token
        if op.kind == "read":
            tag, got = op.result
            if tag == "rec" and got.deadline > self.now:
                core.complete_fill(
                    token, self.now, got.version, got.value, None, got.deadline, got.epoch
                )
                self._check_value(key, got.value, got.version, f"{s.name} read-through")
                state = (got.gid, 0)
            else:
                core.fill_absent(token)
                state = (got.gid, 1) if tag == "rec" else got
            self._observe(s, "read-through", key, state, op.rfloor, op.wfloor)
        elif op.kind == "set":
            w = op.result
            core.wrote(token, self.now, w.version, w.value, None, w.deadline, epoch=w.epoch)
            s.wfloor[key] = max(s.wfloor[key], (w.gid, 0))
        elif op.result is None:
            core.fill_absent(token)  # nothing deleted: the reply said the key is absent
        else:
            version, gid, ep = op.result
            core.wrote(token, self.now, version, deleted=True, epoch=ep)
            s.wfloor[key] = max(s.wfloor[key], (gid, 0))

    def _deliver(self, s: Server, keep: bool = False) -> None:
        msg, meta = s.bus[0] if keep else s.bus.popleft()
        s.core.on_message(msg, self.now)
        for key, order in meta:
            s.seen[key] = max(s.seen[key], order)

    # ---- rules: client operations ------------------------------------------------------------

    @rule(i=servers_st, key=keys_st)
    def read(self, i: int, key: str) -> None:
        """``SyncMap.get``: a hit while ``now < valid_until``, else (tick if due) a read-through."""
        s = self.servers[i]
        e = s.core.entries.get(key)
        if e is not None and self.now < s.core.valid_until:
            e.hits += 1
            w = self._check_value(key, e.value, e.version, f"{s.name} hit")
            self._observe(s, "hit", key, (w.gid, 0), s.rfloor[key], s.wfloor[key])
            return
        if self.now >= s.core.valid_until:
            s.core.tick(self.now)  # _fetch does not wait for a late timer thread
        op = self._begin(s, "read", key)
        self._exec(s, op)
        self._finish(s, op)

    @rule(i=servers_st, key=keys_st, ttl=ttl_st)
    def write(self, i: int, key: str, ttl: float | None) -> None:
        s = self.servers[i]
        op = self._begin(s, "set", key, next(self.values), ttl)
        self._exec(s, op)
        self._finish(s, op)

    @rule(i=servers_st, key=keys_st)
    def delete(self, i: int, key: str) -> None:
        s = self.servers[i]
        op = self._begin(s, "del", key)
        self._exec(s, op)
        self._finish(s, op)

    @rule(
        i=servers_st, key=keys_st, kind=st.sampled_from(["read", "read", "set", "del"]), ttl=ttl_st
    )
    def begin_op(self, i: int, key: str, kind: str, ttl: float | None) -> None:
        """Send a read or write; its command runs and its reply arrives in later steps."""
        value = next(self.values) if kind == "set" else 0
        self._begin(self.servers[i], kind, key, value, ttl)

    @rule(i=servers_st, key=keys_st, n=st.integers(2, 3))
    def read_burst(self, i: int, key: str, n: int) -> None:
        """Several threads miss on the same key at once; their HGETs run now, replies come later."""
        s = self.servers[i]
        for _ in range(n):
            self._exec(s, self._begin(s, "read", key))

    @precondition(lambda self: any(op for s in self.servers for op in s.ops if not op.executed))
    @rule(i=servers_st, j=idx_st)
    def exec_op(self, i: int, j: int) -> None:
        """The command of a request in flight runs in the store now (HGET, or the write)."""
        todo = [op for op in self.servers[i].ops if not op.executed]
        if todo:
            self._exec(self.servers[i], todo[j % len(todo)])

    @precondition(lambda self: any(s.ops for s in self.servers))
    @rule(i=servers_st, j=idx_st)
    def finish_op(self, i: int, j: int) -> None:
        """A reply arrives (any order: requests go over a pool of connections)."""
        s = self.servers[i]
        if s.ops:
            op = s.ops[j % len(s.ops)]
            if not op.executed:
                self._exec(s, op)
            self._finish(s, op)

    # The next two are ``write``/``delete``/``read`` with their arguments aimed at a key that has a
    # request in flight: the interesting races need several steps on one (server, key) in a row.

    def _pending(self, j: int) -> tuple[Server, Op]:
        ops = [(s, op) for s in self.servers for op in s.ops]
        return ops[j % len(ops)]

    @precondition(lambda self: any(s.ops for s in self.servers))
    @rule(j=idx_st, other=st.integers(1, N_SERVERS - 1), kind=st.sampled_from(["set", "del"]))
    def change_pending_key(self, j: int, other: int, kind: str) -> None:
        """Another server writes or deletes the key of a request in flight."""
        s, op = self._pending(j)
        i = (self.servers.index(s) + other) % N_SERVERS
        if kind == "set":
            self.write(i, op.key, None)
        else:
            self.delete(i, op.key)

    @precondition(lambda self: any(s.ops for s in self.servers))
    @rule(j=idx_st)
    def read_pending_key(self, j: int) -> None:
        """Another thread of the same server reads the key of a request in flight."""
        s, op = self._pending(j)
        self.read(self.servers.index(s), op.key)

    @precondition(lambda self: self.EXTRAS and any(s.ops for s in self.servers))
    @rule(i=servers_st, j=idx_st)
    def fail_op(self, i: int, j: int) -> None:
        """A request times out: a read is aborted; a write's outcome is unknown (``drop``)."""
        s = self.servers[i]
        if not s.ops:
            return
        op = s.ops.pop(j % len(s.ops))
        s.core.abort_fill(op.token)
        if op.kind != "read":
            s.core.drop(op.key)
            if not op.executed:
                self.orphans.append(op)  # the command may still run later, or never

    @precondition(lambda self: self.orphans)
    @rule(j=idx_st)
    def exec_orphan(self, j: int) -> None:
        op = self.orphans.pop(j % len(self.orphans))
        if op.kind == "set":
            self._store_set(op.key, op.value, op.ttl, "orphan")
        else:
            self._store_delete(op.key, "orphan")

    @precondition(lambda self: self.EXTRAS)
    @rule(i=servers_st, keys=st.lists(keys_st, min_size=1, max_size=3, unique=True))
    def update(self, i: int, keys: list[str]) -> None:
        """``SyncMap.update``: one MSET per bucket, then ``note_write`` for every key."""
        s = self.servers[i]
        per_bucket: dict[int, list[tuple[str, int]]] = {}
        for key in keys:
            per_bucket.setdefault(self.store.bucket(key), []).append((key, next(self.values)))
        for b, items in per_bucket.items():
            written = self._store_mset(b, items, s.name)
            s.core.learn_epoch(b, written[0].epoch, written[0].version, self.now)
            for w in written:
                s.core.note_write(w.key, w.version)
                s.wfloor[w.key] = max(s.wfloor[w.key], (w.gid, 0))

    @precondition(lambda self: self.EXTRAS)
    @rule(i=servers_st)
    def clear(self, i: int) -> None:
        """``SyncMap.clear``: one CLEAR per bucket, then ``cleared`` for each that was not empty."""
        s = self.servers[i]
        for b in range(self.store.nb):
            got = self._store_clear(b, s.name)
            if got is not None:
                version, gid, ep = got
                s.core.learn_epoch(b, ep, version, self.now)
                s.core.cleared(b, version)
                for key in KEYS:
                    if self.store.bucket(key) == b:
                        s.wfloor[key] = max(s.wfloor[key], (gid, 0))

    # ---- rules: the feed ---------------------------------------------------------------------

    @precondition(lambda self: any(s.bus for s in self.servers))
    @rule(i=servers_st, n=st.integers(1, 4))
    def deliver(self, i: int, n: int) -> None:
        s = self.servers[i]
        for _ in range(min(n, len(s.bus))):
            self._deliver(s)

    @precondition(lambda self: not self.ORDERED and any(len(s.bus) > 1 for s in self.servers))
    @rule(i=servers_st, k=st.integers(1, 3))
    def deliver_out_of_order(self, i: int, k: int) -> None:
        """A relayed feed: a later message (another writer's) overtakes the first one."""
        s = self.servers[i]
        if len(s.bus) > 1:
            s.bus.rotate(-min(k, len(s.bus) - 1))
            self._deliver(s)
            s.bus.rotate(min(k, len(s.bus)))

    @precondition(lambda self: self.EXTRAS and any(s.bus for s in self.servers))
    @rule(i=servers_st)
    def deliver_twice(self, i: int) -> None:
        s = self.servers[i]
        if s.bus:
            self._deliver(s, keep=True)
            self._deliver(s)

    @precondition(lambda self: self.LOSS and any(s.bus for s in self.servers))
    @rule(i=servers_st)
    def lose_message(self, i: int) -> None:
        """A4: a message counted as delivered never arrives (the subscriber notices nothing yet)."""
        s = self.servers[i]
        if s.bus:
            s.bus.popleft()

    @precondition(lambda self: self.LOSS and any(s.bus for s in self.servers))
    @rule(i=servers_st)
    def corrupt_message(self, i: int) -> None:
        """A malformed message: ``Engine.on_feed_message`` drops it and asks for a repair."""
        s = self.servers[i]
        if s.bus:
            s.bus.popleft()
            s.core.on_feed_up()

    @precondition(lambda self: self.LOSS)
    @rule(i=servers_st)
    def disconnect(self, i: int) -> None:
        s = self.servers[i]
        if s.up:
            s.bus.clear()
            s.up = False
            s.core.on_feed_down()

    @precondition(lambda self: any(not s.up for s in self.servers))
    @rule(i=servers_st)
    def reconnect(self, i: int) -> None:
        s = self.servers[i]
        if not s.up:
            s.up = True
            s.core.on_feed_up()

    # ---- rules: probes and time --------------------------------------------------------------

    @rule(i=servers_st)
    def probe(self, i: int) -> None:
        self._probe_now(self.servers[i])

    @precondition(lambda self: self.EXTRAS)
    @rule(i=servers_st)
    def probe_send(self, i: int) -> None:
        s = self.servers[i]
        s.probes.append(Probe(self.now, s.core.tops()))

    @precondition(lambda self: any(p.states is None for s in self.servers for p in s.probes))
    @rule(i=servers_st, j=idx_st)
    def probe_exec(self, i: int, j: int) -> None:
        todo = [p for p in self.servers[i].probes if p.states is None]
        if todo:
            todo[j % len(todo)].states = self._store_probe(self.servers[i].name)

    @precondition(lambda self: any(p.states is not None for s in self.servers for p in s.probes))
    @rule(i=servers_st, j=idx_st)
    def probe_apply(self, i: int, j: int) -> None:
        s = self.servers[i]
        done = [p for p in s.probes if p.states is not None]
        if done:
            p = done[j % len(done)]
            s.probes.remove(p)
            assert p.states is not None
            s.core.on_probe(p.states, p.sent_at, self.now, p.tops)

    @rule(dt=st.floats(0.0, 0.6, allow_nan=False), timer=st.booleans())
    def advance(self, dt: float, timer: bool) -> None:
        """Time passes; every server's timer thread ticks, unless it is late (GIL, pause)."""
        self.now += dt
        if timer:
            for s in self.servers:
                s.core.tick(self.now)

    # ---- rules: the store misbehaves ---------------------------------------------------------

    @precondition(lambda self: self.WIPES)
    @rule()
    def flushall(self) -> None:
        """FLUSHALL: data and epochs gone, no message, subscribers stay connected."""
        self._wipe()

    @precondition(lambda self: self.WIPES)
    @rule()
    def restart_store(self) -> None:
        """Redis restarts without persistence: FLUSHALL plus every subscriber cut and back."""
        self._wipe()
        for s in self.servers:
            s.bus.clear()
            s.core.on_feed_down()
        for s in self.servers:
            s.up = True
            s.core.on_feed_up()

    # ---- C3 ----------------------------------------------------------------------------------

    @rule()
    def quiesce(self) -> None:
        """C3: no writes, no faults; probe every Δ/4 for 1.5 Δ: then caches equal the store."""
        for s in self.servers:
            if not s.up:
                s.up = True
                s.core.on_feed_up()
        for _ in range(6):
            for s in self.servers:
                while s.bus:
                    self._deliver(s)
            self.now += DELTA / 4
            for s in self.servers:
                s.core.tick(self.now)
            for s in self.servers:
                self._probe_now(s)
            for s in self.servers:
                while s.bus:
                    self._deliver(s)
        for s in self.servers:
            s.core.tick(self.now)
            for key, e in s.core.entries.items():
                b = self.store.bucket(key)
                live = self.store.data[b].get(key)
                assert live is not None and live.deadline > self.now, (
                    f"C3: after quiescence {s.name} caches {key!r}={e.value!r}@{e.version} "
                    f"but the store has no live value (now={self.now})"
                )
                assert (e.value, e.version) == (live.value, live.version), (
                    f"C3: after quiescence {s.name} caches {key!r}={e.value!r}@{e.version}, "
                    f"the store has {live.value!r}@{live.version} (now={self.now})"
                )

    # ---- invariants --------------------------------------------------------------------------

    @invariant()
    def entries_are_fresh(self) -> None:
        """C2 (bounded staleness), C6 and TTL for everything a hit could return right now."""
        if not hasattr(self, "servers"):
            return
        for s in self.servers:
            assert len(s.core.entries) <= s.core.capacity, f"{s.name} exceeds its capacity"
            servable = self.now < s.core.valid_until  # what the hit path checks
            for key, e in s.core.entries.items():
                w = self._check_value(key, e.value, e.version, f"{s.name} cache")
                assert (w.gid, 0) >= s.seen[key], (
                    f"A2 stale entry: {s.name} holds {key!r}={w.value}@{w.version} although it "
                    f"already processed the change {s.seen[key]} that superseded it "
                    f"(now={self.now})"
                )
                if not servable:
                    continue
                assert w.deadline > self.now, (
                    f"TTL: {s.name} serves {key!r}={w.value} whose TTL ended at {w.deadline} "
                    f"(now={self.now})"
                )
                # The next read of key on s begins after every read and write completed so far,
                # and would be served this entry: C4 and C5 must already hold for it.
                assert (w.gid, 0) >= s.rfloor[key], (
                    f"C4 monotonic reads: {s.name} would serve {key!r}={w.value}@{w.version}, "
                    f"older than state {s.rfloor[key]} that a completed read returned "
                    f"(now={self.now})"
                )
                assert (w.gid, 0) >= s.wfloor[key], (
                    f"C5 read-your-writes: {s.name} would serve {key!r}={w.value}@{w.version}, "
                    f"older than its own acknowledged write {s.wfloor[key]} (now={self.now})"
                )
                assert w.gone >= self.now - DELTA - EPS, (
                    f"C2 bounded staleness: {s.name} serves {key!r}={w.value}@{w.version} "
                    f"(written at {w.at:.3f}), superseded in the store at {w.end:.3f} < "
                    f"now - Δ = {self.now - DELTA:.3f}"
                )


class FeedRaces(CoreModel):
    """Only reads, writes, replies, delivery, probes and time: more examples land on the races."""

    WIPES = False
    LOSS = False
    EXTRAS = False


_SETTINGS = settings(
    max_examples=200,
    stateful_step_count=60,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
CoreModel.TestCase.settings = _SETTINGS
TestCoreModel = CoreModel.TestCase
FeedRaces.TestCase.settings = settings(_SETTINGS, max_examples=150, stateful_step_count=40)
TestFeedRaces = FeedRaces.TestCase


class UnorderedModel(CoreModel):
    """Every fault of CoreModel, on a relayed feed: messages also overtake each other."""

    ORDERED = False


UnorderedModel.TestCase.settings = settings(_SETTINGS, max_examples=150)
TestUnorderedModel = UnorderedModel.TestCase


@pytest.mark.parametrize(
    ("flag", "machine"),
    # "gaps" is proven by test_core_guards.py::test_gap_without_the_guard_leaves_the_stale_entry
    # (an exact order of events) and by S09's guard-off run: since refused fills also drop
    # entries of another epoch, this derandomized search no longer reaches a gap-only failure.
    # "fill_race" likewise, by test_fill_race_without_the_guard_installs_a_stale_value_for_good
    # and S05's guard-off run: Hypothesis seeds its generation with constants from every loaded
    # module, so whether this search found the fill race depended on which other tests were
    # collected in the same run (it failed when tests/feeds was collected too).
    [("probe", CoreModel), ("epoch", CoreModel)],
)
def test_oracles_catch_each_guard_switched_off(flag: str, machine: type[CoreModel]) -> None:
    """The model only counts if it fails without the protection it is meant to check."""
    broken = type(
        f"{machine.__name__}Without_{flag}", (machine,), {"GUARDS": Guards(**{flag: False})}
    )
    with pytest.raises(AssertionError, match=r"^(A2 |C[2-6][: ]|TTL)"):
        run_state_machine_as_test(
            broken,
            settings=settings(
                _SETTINGS,
                max_examples=1000,
                derandomize=True,
                database=None,
                phases=[Phase.generate],
                print_blob=False,
                report_multiple_bugs=False,
            ),
        )
