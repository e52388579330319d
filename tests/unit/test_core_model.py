"""Model-based test of the near cache and the real flows, in simulated time.

Three servers share ONE in-memory store (``syncmap.store.memory``) that runs the five map scripts'
semantics (the store conformance suite holds it to a real Redis).  Each server is a real
:class:`~syncmap.flows.state.MapState` (its own ``NearCache``, guard, ``MapCommands`` with its
origin) and runs the REAL flows (``syncmap.flows``): an operation is a flow generator the model
starts (``effect = next(flow)``: the request is sent, a fill begun), executes in the store later
(``replies = executor.call(effect.commands, ...)``) and finishes later still
(``flow.send(replies)``: the reply arrives), so fills race invalidations (A2) and own writes (A6)
in every order, and the model can never drift from the code it checks.  The operations: get,
set, delete, swap, setdefault, compare_and_set and compare_and_delete (with their 'ver' retry:
every third value is stored as a float, equal to the int another server expects but other
bytes), transform (its read, then its 'ver' write) and preload; a flow that sends several
requests has each one executed and answered in later steps.  Every server's clocks (monotonic
and wall) are the model's ``now``, as is the store's.  Probes are
``flows.admin.probe`` split the same way: sent (``tops()`` taken), executed (expired keys reaped,
every bucket's ``(epoch, seq, digest)`` read) and applied, possibly much later.

Each server has its own pub/sub connection, modelled as a FIFO (Redis delivers one channel in
order) that can lose messages silently (A4), deliver one twice, deliver one corrupt (dropped,
repair asked, as ``Engine`` does) or disconnect (everything in flight is lost; ``on_feed_down``
now, ``on_feed_up`` on reconnect).  On a relayed feed (``UnorderedModel``: the scripts return
their messages and the flow publishes them after the write) the FIFOs also reorder.  Timer
threads may run late (hits then rely on ``valid_until``).  A request may time out: a read is
aborted, a write's outcome is unknown (``WriteOutcomeUnknown`` thrown into its flow) and, if it
had not run yet, it may still run later.  FLUSHALL wipes data and epochs; a restart without
persistence does the same, forgets the loaded scripts and cuts every subscriber.

The model's bookkeeping (which write each value is, when it stopped being the key's state) comes
from the store's ``monitor``: every change message a script makes, whatever its route.

Oracles, checked after every step (time is the simulated ``now``; Δ = ``max_staleness``):

* C2 bounded staleness: every entry a server would serve now (present in ``core.entries`` while
  ``now < core.valid_until``, the hit path's one clock check, or returned by ``core.cached``, the
  slow path's) holds a write that was still the key's state in the store at some moment at or
  after ``now - Δ``; and none outlives its TTL.  An entry of a *held* bucket (its lease lapsed,
  kept for a probe to revalidate) is served by neither path.  Pauses are the ``advance`` rule
  with the timer late, probes that stop, or a probe whose reply comes back much later.
  Server s0 detaches every flushed bucket and its timer frees one key per tick
  (``NearCache.sweep``): a detached entry is served by neither path, and the per-bucket index
  names exactly the live entries.
* A2/A3 (no time needed): no entry is older than a change of its key that the server has already
  processed from its feed (a fill or own write that lost the race must not be installed).
* C3 convergence: ``quiesce`` stops faults and writes, delivers everything, lets > Δ pass while
  probing like the engine does; then every cached entry equals the store's live value.
* C4 monotonic reads and C5 read-your-writes, per (server, key), ordered by a global event
  counter (``gid``) so the order stays meaningful when versions restart after FLUSHALL/restart:
  a read returns a state no older than any read that completed, or any own write/delete/clear
  acknowledged, before the read began.
* C6 no phantom: every value read or cached was written, for that key, at that version; the
  previous value swap, setdefault and delete return was the key's live write when their script
  ran (none if it had none); compare-and-X returns True exactly when the key held an equal value
  as its last request ran; transform's ``fn`` was given the value the key held when its write
  ran (its atomicity).  C4/C5 hold for those previous values too.
* ``len(entries) <= capacity``.
* Absent markers (a read that found no field caches "absent": ``NearCache.fill_absent``) are
  checked as entries are: each carries the state its read observed (``Server.markers``); A2
  (not older than a change the server processed), C2 (the absence ended - the key was set -
  no earlier than ``now - Δ``), C4/C5 when servable, C3 (after quiescence the key has no live
  value), and ``NearCache.absent`` counts exactly the markers in ``entries``.

``test_oracles_catch_each_guard_switched_off`` runs the model with one ``Guards`` flag off and
requires an oracle to fail: the model's green result only counts because of that.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
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

from syncmap.codec import make_codec
from syncmap.config import MapConfig
from syncmap.core.nearcache import INF, Entry, Guards, NearCache, is_absent
from syncmap.core.wire import OP_CLEAR, OP_DEL, OP_EXPIRE, OP_SET, decode_message, unpack_value
from syncmap.errors import ConflictError, StoreUnavailable, WriteOutcomeUnknown
from syncmap.flows import admin, bulk, reads, writes
from syncmap.flows.effects import Apply, Call, Flow, Publish
from syncmap.flows.reads import MISSING
from syncmap.flows.state import MapState
from syncmap.keys import Layout, bucket_of, decode_key, encode_key
from syncmap.store.commands import MapCommands
from syncmap.store.memory import MemoryExecutor, MemoryStore

DELTA = 1.0
N_SERVERS = 3
KEYS = ("a", "b", "c")
FIELDS = {k: encode_key(k, 1000) for k in KEYS}
EPS = 1e-9
Order = tuple[int, int]  # (gid of the event that made the state, 1 if "expired after it")
Meta = list[tuple[str, Order]]  # what a change message announces: (key, state order) each
CODEC = make_codec(None, None)
PONG = b"\x00pong:"  # VouchModel's bus items: a PING's reply (with its send time) ...
FLUSHED = b"\x00flushed"  # ... and CLIENT TRACKING's null invalidation (FLUSHALL)
SLOW_PROBE = 5 * DELTA  # VouchModel: the probe nothing asked for comes this often


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


@dataclass(eq=False)  # identity: two ops can look alike
class Op:
    """An operation this server has started (its flow waits at ``call``) and not yet finished.

    A flow may send several requests one after another (a compare-and-X's 'ver' retry, a
    transform's read then write, a preload's second round): ``call`` is the current one, and
    ``before``/``pre``/``observed``/``made`` describe the last one that ran."""

    kind: str  # read | set | swap | nx | del | cas | cad | transform | preload
    key: str
    flow: Flow[Any]
    call: Call
    rfloor: Order
    wfloor: Order
    value: Any = 0  # what a set-like write stores (unique: it names the write)
    expected: Any = None  # cas / cad: the value compared with
    executed: bool = False
    replies: Any = None
    before: Write | None = None  # the key's live write just before the request ran
    pre: Order = (0, 0)  # the key's state just before it ran
    observed: Order = (0, 0)  # ... and just after (a read's HGET: what it found)
    made: Meta = field(default_factory=list)  # what the command changed, as the monitor saw
    inputs: list[Any] = field(default_factory=list)  # transform: every value fn was given


@dataclass(eq=False)
class Probe:
    flow: Flow[Any]
    call: Call
    replies: list[Any] | None = None


class Server:
    def __init__(self, name: str, state: MapState, executor: MemoryExecutor) -> None:
        self.name = name
        self.state = state
        self.executor = executor
        # In flight to this server: each message with the (key, state order) it announces.
        self.bus: deque[tuple[bytes, Meta]] = deque()
        self.seen: dict[str, Order] = dict.fromkeys(KEYS, (0, 0))  # newest change processed
        self.up = True
        self.ops: list[Op] = []
        self.probes: list[Probe] = []
        self.rfloor: dict[str, Order] = dict.fromkeys(KEYS, (0, 0))
        self.wfloor: dict[str, Order] = dict.fromkeys(KEYS, (0, 0))
        self.wants_probe = True  # VouchModel: the engine would probe now (see CoreModel.probe)
        # Absent markers: the marker entry of each key and the state its read observed.
        self.markers: dict[str, tuple[Entry, Order]] = {}
        self.last_probe = 0.0

    @property
    def core(self) -> NearCache:
        return self.state.core


servers_st = st.integers(0, N_SERVERS - 1)
keys_st = st.sampled_from(KEYS)
ttl_st = st.sampled_from([None, None, None, 0.3, 1.5])
idx_st = st.integers(0, 7)
pick_st = st.integers(0, 3)  # what a compare-and-X expects (CoreModel._expected)
WRITES = ("set", "swap", "nx", "cas", "transform")  # the kinds that store a new value
OTHERS = ("swap", "nx", "cas", "cad", "transform", "preload")
KINDS = ("read", "read", "set", "del", *OTHERS)


class CoreModel(RuleBasedStateMachine):
    """Three servers, one store, lossy FIFO buses, simulated time.  See the module docstring."""

    WIPES = True  # FLUSHALL and store restarts
    LOSS = True  # silent message loss and disconnects
    EXTRAS = True  # update, clear, failed requests, duplicates, corrupt messages, delayed probes
    GUARDS: Guards | None = None  # all on; tests switch one off to prove the oracles notice
    ORDERED = True  # False: a relayed feed, whose buses may also deliver out of order
    VOUCH = False  # True: PING leases (subscriber PINGs renew leases; probes still come)

    # ---- set-up ------------------------------------------------------------------------------

    @initialize(nb=st.integers(2, 4), capacity=st.integers(2, 5))
    def setup(self, nb: int, capacity: int) -> None:
        self.now_ms = 0
        self.store = MemoryStore(lambda: self.now_ms)
        self.store.monitors.append(self._on_change)
        self.layout = Layout("model", "m", nb)
        self.gids = itertools.count(1)
        self.values = itertools.count(1)
        self.writes: dict[int, Write] = {}
        self.live: dict[str, Write] = {}  # the store's record of each key (expired or not)
        self.absent: dict[str, Order] = dict.fromkeys(KEYS, (0, 0))
        self.absent_until: dict[str, float] = dict.fromkeys(KEYS, 0.0)  # last absent (then set)
        self.meta: dict[bytes, Meta] = {}  # every change message made, with what it announces
        self.made: Meta = []  # what the command being executed changed
        self.orphans: list[Call] = []  # writes whose outcome was unknown and that may still run
        self.servers = [self._server(f"s{i}", nb, capacity) for i in range(N_SERVERS)]
        for s in self.servers:  # Engine.start: subscribed and confirmed, then a baseline probe
            s.core.on_feed_up()
            self._probe_now(s)

    def _server(self, name: str, nb: int, capacity: int) -> Server:
        guards = self.GUARDS or Guards()
        # s0 detaches every flushed bucket and frees it one key per timer tick (NearCache.sweep),
        # so fills, hits, invalidations and probes race the deferred free; the others free at once.
        core = NearCache(nb, capacity=capacity, max_staleness=DELTA, guards=self.GUARDS,
                         ordered=self.ORDERED, sweep_above=0 if name == "s0" else None)  # fmt: skip
        cmds = MapCommands(self.layout, name, None if self.ORDERED else "",
                           flags=guards.script_flags())  # fmt: skip
        # Both clocks are the model's: the wall clock only relates Redis's clock (the store's,
        # also the model's) to ours, through the offset each probe measures.
        state = MapState(name, core, cmds, CODEC, MapConfig(), clock=lambda: self.now,
                         wall=lambda: self.now)  # fmt: skip
        s = Server(name, state, MemoryExecutor(self.store, f"store (from {name})"))
        self.store.subscribe(self.layout.channel, lambda msg: self._arrive(s, msg))
        return s

    @property
    def now(self) -> float:
        return self.now_ms / 1000

    def bucket(self, key: str) -> int:
        return bucket_of(FIELDS[key], self.layout.buckets)

    def ref(self, key: str) -> writes.Ref:
        return writes.Ref(FIELDS[key], key, self.bucket(key))

    # ---- the store's side: what its scripts changed (the monitor), and its faults -------------

    def _on_change(self, data: bytes) -> None:
        """A script made a change message: record which write each key's state now is."""
        msg = decode_message(data)
        meta: Meta = []
        if msg.op == OP_SET:
            for i, f in enumerate(msg.fields):
                key = str(decode_key(f))
                raw = self.store.hget(self.layout.data(msg.bucket).encode(), f)
                assert raw is not None
                version, deadline_ms, payload = unpack_value(raw)
                assert version == msg.seq + i
                was = self.live.get(key)
                if was is None or was.deadline <= self.now:  # absent (or expired) until now
                    self.absent_until[key] = self.now
                self._end_state(key)
                w = Write(key, CODEC.decode(payload), version, msg.epoch, next(self.gids),
                          self.now, deadline_ms / 1000 if deadline_ms else INF)  # fmt: skip
                self.live[key] = self.writes[w.value] = w
                meta.append((key, (w.gid, 0)))
        elif msg.op == OP_EXPIRE:  # reaped by a probe, or an expired leftover deleted
            for f in msg.fields:
                key = str(decode_key(f))
                self.absent[key] = (self.live.pop(key).gid, 1)
                meta.append((key, self.absent[key]))
        else:  # OP_DEL names its key; OP_CLEAR empties the whole bucket
            assert msg.op in (OP_DEL, OP_CLEAR)
            gid = next(self.gids)
            names = [str(decode_key(f)) for f in msg.fields]
            keys = names if msg.op == OP_DEL else [k for k in KEYS if self.bucket(k) == msg.bucket]
            for key in keys:
                self._end_state(key)
                self.live.pop(key, None)
                self.absent[key] = (gid, 0)
                meta.append((key, (gid, 0)))
        self.meta[data] = meta
        self.made.extend(meta)

    def _end_state(self, key: str) -> None:
        w = self.live.get(key)
        if w is not None and w.end == INF:
            w.end = self.now

    def _arrive(self, s: Server, data: bytes) -> None:
        """The store published ``data`` on the channel: in flight to ``s`` if connected."""
        if s.up:
            s.bus.append((data, self.meta[data]))

    def _state_of(self, key: str) -> Order:
        """The key's state in the store now, as a plain HGET would find it (expired unreaped:
        the write, "expired after it")."""
        w = self.live.get(key)
        if w is None:
            return self.absent[key]
        return (w.gid, 0) if w.deadline > self.now else (w.gid, 1)

    def _wipe(self) -> None:
        gid = next(self.gids)
        for key in KEYS:
            self._end_state(key)
            self.absent[key] = (gid, 0)
        self.live.clear()

    # ---- the driver's side (sync/run.py), step by step ---------------------------------------

    def _execute(self, s: Server, call: Call) -> tuple[Any, Meta]:
        """Run one batch in the store now: its replies (or the error), and what it changed."""
        self.made = []
        try:
            replies: Any = s.executor.call(call.commands, write=call.write, partial=call.partial)
        except StoreUnavailable as exc:
            replies = exc
        return replies, self.made

    def _resume(self, flow: Flow[Any], reply: Any) -> tuple[Call | None, Any]:
        """Resume ``flow`` with ``reply`` (an error is thrown in) up to its next request, doing a
        ``Publish`` (a relayed feed: right after the write) or ``Pause`` (simulated time does
        not move for it) at once: (the request, None), or (None, what the flow returned or
        the ``ConflictError``/``KeyError`` a compare or transform ended with)."""
        while True:
            try:
                effect = flow.throw(reply) if isinstance(reply, Exception) else flow.send(reply)
            except StopIteration as stop:
                return None, stop.value
            except (ConflictError, KeyError) as exc:
                return None, exc
            if isinstance(effect, Call):
                return effect, None
            reply = None
            if isinstance(effect, Publish):
                for data in effect.messages:
                    self.store.publish(self.layout.channel.encode(), data)
            elif isinstance(effect, Apply):  # transform's function, at once
                reply = effect.fn(effect.arg)

    def _drive(self, s: Server, flow: Flow[Any], reply: Any) -> Any:
        """Resume ``flow`` with ``reply`` and run it to its end, every further request at once
        (what ``syncmap.sync.run.run`` does); returns the flow's value."""
        while True:
            call, value = self._resume(flow, reply)
            if call is None:
                return value
            reply = self._execute(s, call)[0]

    def _run(self, s: Server, flow: Flow[Any]) -> Any:
        return self._drive(s, flow, None)

    def _probe_now(self, s: Server) -> None:
        self._run(s, admin.probe(s.state))

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

    def _marker(self, s: Server, key: str) -> Order:
        """The state the absent marker ``s`` caches for ``key`` was read at."""
        e = s.core.entries[key]
        got = s.markers.get(key)
        assert got is not None and got[0] is e, f"{s.name}: a marker for {key!r} no read made"
        return got[1]

    def _check_value(self, key: str, value: Any, version: int, where: str) -> Write:
        w = self.writes.get(value)
        assert w is not None, f"C6 phantom: {where} holds {value!r} for {key!r}, never written"
        assert w.key == key, f"C6 phantom: {where} holds {key!r}={value!r}, written to {w.key!r}"
        assert w.version == version, (
            f"C6: {where} holds {key!r}={value!r} at version {version}, written at {w.version}"
        )
        return w

    def _begin(self, s: Server, kind: str, key: str, ttl: float | None = None, pick: int = 0
               ) -> Op | None:  # fmt: skip
        """Start the operation's flow up to its first request: fills begun, the command built.
        None: a read the slow path served from the cache, without a request (checked here)."""
        op = Op(kind, key, None, None, s.rfloor[key], s.wfloor[key])  # type: ignore[arg-type]
        if kind in WRITES:
            op.value = self._new_value()
        if kind in ("cas", "cad"):
            op.expected = self._expected(key, pick)
        op.flow = self._flow(s, op, round(ttl * 1000) if ttl else 0)
        try:
            call = next(op.flow)
        except StopIteration as done:
            # reads.read served a live entry under its bucket's lease while valid_until was in
            # the past (a flushed bucket's entries await their sweep): a hit, checked as one.
            assert op.kind == "read", f"{op.kind} finished without a request"
            value, version, _ = done.value
            if value is MISSING:  # an absent marker
                self._observe(s, "hit", key, self._marker(s, key), op.rfloor, op.wfloor)
                return None
            w = self._check_value(key, value, version, f"{s.name} slow-path hit")
            self._observe(s, "hit", key, (w.gid, 0), op.rfloor, op.wfloor)
            return None
        assert isinstance(call, Call), call
        op.call = call
        s.ops.append(op)
        return op

    def _new_value(self) -> Any:
        """A value no write used: every third one a float, so an equal int compares equal but
        is other bytes (what sends a compare-and-X down its 'ver' retry)."""
        n = next(self.values)
        return float(n) if n % 3 == 0 else n

    def _expected(self, key: str, pick: int) -> Any:
        """What a compare-and-X expects: the key's value now (as an int, or as stored), one it
        held before, or one it never held."""
        w = self.live.get(key)
        older = [w for w in self.writes.values() if w.key == key]
        if pick == 2 and older:
            return older[len(older) // 2].value
        if w is None or pick == 3:
            return -1
        return int(w.value) if pick == 0 else w.value

    def _flow(self, s: Server, op: Op, ttl_ms: int) -> Flow[Any]:
        """The flow the map's method of ``op.kind`` runs (map.py), on this server's state."""
        st_, ref = s.state, self.ref(op.key)
        if op.kind == "read":
            return reads.read(st_, ref.field, ref.key, ref.bucket, consistent=False)
        if op.kind == "preload":
            # As after Engine.start's baseline probe: a bucket installs only values of an epoch
            # the server knows, under a live lease; the race is with what happens from here on.
            self._probe_now(s)
            return bulk.preload(st_, s.core.capacity, retries=1)
        if op.kind == "transform":
            return writes.transform(st_, ref, op.key, lambda v: op.inputs.append(v) or op.value,
                                    0, ttl_ms=ttl_ms, fence=None)  # fmt: skip
        return self._write_flow(st_, ref, op, ttl_ms)

    @staticmethod
    def _write_flow(st_: MapState, ref: writes.Ref, op: Op, ttl_ms: int) -> Flow[Any]:
        if op.kind == "del":
            return writes.delete(st_, ref)
        if op.kind == "cad":
            return writes.compare(st_, op.key, op.expected, "cad", lambda m, e: writes.delete(
                st_, ref, mode=m, expected=e))  # fmt: skip
        data = writes.payload(st_, op.value)
        if op.kind == "cas":
            return writes.compare(st_, op.key, op.expected, "cas", lambda m, e: writes.set_value(
                st_, ref, data, ttl_ms=ttl_ms, mode=m, expected=e))  # fmt: skip
        value = op.value if op.kind == "set" else MISSING  # as map.py passes it
        return writes.set_value(st_, ref, data, ttl_ms=ttl_ms, mode=op.kind, value=value)

    def _live_write(self, key: str) -> Write | None:
        w = self.live.get(key)
        return w if w is not None and w.deadline > self.now else None

    def _exec(self, s: Server, op: Op) -> None:
        op.before, op.pre = self._live_write(op.key), self._state_of(op.key)
        op.replies, op.made = self._execute(s, op.call)
        op.observed = self._state_of(op.key)
        op.executed = True

    def _reply(self, s: Server, op: Op) -> None:
        """The reply arrives: the flow settles it (install, refuse, drop) under its guard, and
        either sends its next request or ends."""
        call, result = self._resume(op.flow, op.replies)
        if call is not None:
            op.call, op.executed, op.replies = call, False, None
            return
        s.ops.remove(op)
        e = s.core.entries.get(op.key)
        if e is not None and is_absent(e) and s.markers.get(op.key, (None,))[0] is not e:
            s.markers[op.key] = (e, op.observed)  # this reply installed it: what it found
        applied = self._check_result(s, op, result)
        if applied:  # C5 from now on: this server's own write is acknowledged
            for k, order in op.made:
                if k == op.key:
                    s.wfloor[k] = max(s.wfloor[k], order)

    def _complete(self, s: Server, op: Op | None) -> None:
        """Run ``op`` to its end now: each request executed, each reply handled."""
        while op in s.ops:
            if not op.executed:
                self._exec(s, op)
            self._reply(s, op)

    def _check_result(self, s: Server, op: Op, result: Any) -> bool:
        """C4/C5/C6 for what the operation returned; whether it changed the key."""
        key, before = op.key, op.before
        if op.kind == "read":
            value, version, _ = result
            state = op.observed
            if value is not MISSING:
                state = (self._check_value(key, value, version, f"{s.name} read-through").gid, 0)
            self._observe(s, "read-through", key, state, op.rfloor, op.wfloor)
            return False
        if op.kind == "preload":  # what it installed is checked by the invariants
            return False
        if op.kind in ("cas", "cad", "transform"):
            return self._check_conditional(s, op, result)
        version, old = result
        if old is not None:  # the key's live value when the script ran (C6, and a read: C4/C5)
            w = self._check_stored(key, old, f"{s.name} {op.kind} (old value)")
            assert w is before, (
                f"C6: {s.name} {op.kind}({key!r}) returned {w.value!r} as the value it found, "
                f"the key held {before and before.value!r} when it ran (now={self.now})"
            )
            self._observe(s, op.kind, key, op.pre, op.rfloor, op.wfloor)
        elif op.kind != "set":
            assert before is None, (
                f"C6: {s.name} {op.kind}({key!r}) found no value, the key held "
                f"{before.value!r} when it ran (now={self.now})"
            )
        if op.kind == "nx":
            assert bool(version) == (before is None), f"nx: applied={version}, found {before}"
        return bool(version)

    def _check_conditional(self, s: Server, op: Op, result: Any) -> bool:
        """cas/cad: True exactly when the key held an equal value as the last request ran;
        transform: ``fn`` was given the value the key held when its write ran (atomic)."""
        key, before = op.key, op.before
        if isinstance(result, ConflictError):
            return False
        if op.kind == "transform":
            for v in op.inputs:
                assert v == 0 or (v in self.writes and self.writes[v].key == key), (
                    f"C6 phantom: transform({key!r}) was given {v!r}, never written to it"
                )
            assert op.inputs[-1] == (0 if before is None else before.value), (
                f"transform({key!r}) wrote fn({op.inputs[-1]!r}), but the key held "
                f"{before and before.value!r} when the write ran (now={self.now})"
            )
            self._observe(s, "transform", key, op.pre, op.rfloor, op.wfloor)
            return True
        equal = before is not None and before.value == op.expected
        assert result is equal, (
            f"{op.kind}({key!r}, expected={op.expected!r}) returned {result}, the key held "
            f"{before and before.value!r} when it ran (now={self.now})"
        )
        return bool(result)

    def _check_stored(self, key: str, raw: bytes, where: str) -> Write:
        version, _, payload = unpack_value(raw)
        return self._check_value(key, CODEC.decode(payload), version, where)

    def _deliver(self, s: Server, keep: bool = False) -> None:
        data, meta = s.bus[0] if keep else s.bus.popleft()
        if data.startswith(PONG):  # VouchModel: a PING's reply, after the messages before it
            s.wants_probe |= s.core.on_vouch(float(data[len(PONG) :]))
            return
        if data == FLUSHED:  # VouchModel: the tracking invalidation of a FLUSHALL
            s.core.on_touched(None)
            s.wants_probe = True
            return
        s.core.on_message(decode_message(data), self.now)
        for key, order in meta:
            s.seen[key] = max(s.seen[key], order)

    # ---- rules: client operations ------------------------------------------------------------

    @rule(i=servers_st, key=keys_st)
    def read(self, i: int, key: str) -> None:
        """``SyncMap.get``: a hit while ``now < valid_until`` (map.py), else the read flow."""
        s = self.servers[i]
        e = s.core.entries.get(key)
        if e is not None and self.now < s.core.valid_until:
            e.hits += 1
            if is_absent(e):
                self._observe(s, "hit", key, self._marker(s, key), s.rfloor[key], s.wfloor[key])
                return
            w = self._check_value(key, e.value, e.version, f"{s.name} hit")
            self._observe(s, "hit", key, (w.gid, 0), s.rfloor[key], s.wfloor[key])
            return
        self._complete(s, self._begin(s, "read", key))

    @rule(i=servers_st, key=keys_st, ttl=ttl_st)
    def write(self, i: int, key: str, ttl: float | None) -> None:
        s = self.servers[i]
        self._complete(s, self._begin(s, "set", key, ttl))

    @rule(i=servers_st, key=keys_st)
    def delete(self, i: int, key: str) -> None:
        s = self.servers[i]
        self._complete(s, self._begin(s, "del", key))

    @rule(i=servers_st, key=keys_st, kind=st.sampled_from(OTHERS[:-1]), ttl=ttl_st,
          pick=pick_st)  # fmt: skip
    def other_write(self, i: int, key: str, kind: str, ttl: float | None, pick: int) -> None:
        """``swap``, ``setdefault``, ``compare_and_set``, ``compare_and_delete`` or
        ``transform``, run to its end at once."""
        s = self.servers[i]
        self._complete(s, self._begin(s, kind, key, ttl, pick))

    @rule(i=servers_st, key=keys_st, kind=st.sampled_from(["cas", "cad", "transform"]),
          other=st.integers(1, N_SERVERS - 1), pick=pick_st)  # fmt: skip
    def conditional_race(self, i: int, key: str, kind: str, other: int, pick: int) -> None:
        """Another server writes the key between a conditional write's first request (the
        transform's read, the compare's first try) and its next one (the write, the 'ver'
        retry): what the 'ver' condition is there for."""
        s = self.servers[i]
        op = self._begin(s, kind, key, None, pick)
        self._exec(s, op)
        self._reply(s, op)
        if op in s.ops:
            self.write((i + other) % N_SERVERS, key, None)
            self._complete(s, op)

    @rule(i=servers_st)
    def preload(self, i: int) -> None:
        """``SyncMap.preload``, run to its end at once."""
        s = self.servers[i]
        self._complete(s, self._begin(s, "preload", KEYS[0]))

    @rule(i=servers_st, key=keys_st, kind=st.sampled_from(KINDS), ttl=ttl_st, pick=pick_st)
    def begin_op(self, i: int, key: str, kind: str, ttl: float | None, pick: int) -> None:
        """Start any operation; its requests run and their replies arrive in later steps."""
        self._begin(self.servers[i], kind, key, ttl, pick)

    @rule(i=servers_st, key=keys_st, n=st.integers(2, 3))
    def read_burst(self, i: int, key: str, n: int) -> None:
        """Several threads miss on the same key at once; their HGETs run now, replies come later."""
        s = self.servers[i]
        for _ in range(n):
            op = self._begin(s, "read", key)
            if op is not None:
                self._exec(s, op)

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
            self._reply(s, op)

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
        """A request times out: the executor's error is thrown into its flow, which aborts a
        read's fill and drops a write's key (outcome unknown); a write not run yet may still run
        later, or never."""
        s = self.servers[i]
        if not s.ops:
            return
        op = s.ops.pop(j % len(s.ops))
        write = op.call.write
        error = WriteOutcomeUnknown("?") if write else StoreUnavailable("timed out")
        with pytest.raises(type(error)):
            op.flow.throw(error)
        if write and not op.executed:
            self.orphans.append(op.call)

    @precondition(lambda self: self.orphans)
    @rule(j=idx_st)
    def exec_orphan(self, j: int) -> None:
        """A write whose writer gave up runs now (on a relayed feed its messages are lost with
        the writer: only the probes tell the others)."""
        call = self.orphans.pop(j % len(self.orphans))
        self._execute(self.servers[0], call)

    @precondition(lambda self: self.EXTRAS)
    @rule(i=servers_st, keys=st.lists(keys_st, min_size=1, max_size=3, unique=True))
    def update(self, i: int, keys: list[str]) -> None:
        """``SyncMap.update``: the update flow (one MSET per bucket), run at once."""
        s = self.servers[i]
        items = writes.items_of([(k, self._new_value()) for k in keys], s.state)
        self.made = []
        self._run(s, writes.update(s.state, items, ttl_ms=0, fence=None))
        for key, order in self.made:
            s.wfloor[key] = max(s.wfloor[key], order)

    @precondition(lambda self: self.EXTRAS)
    @rule(i=servers_st)
    def clear(self, i: int) -> None:
        """``SyncMap.clear``: the clear flow (one CLEAR per bucket), run at once."""
        s = self.servers[i]
        self.made = []
        self._run(s, writes.clear(s.state, fence=None))
        for key, order in self.made:
            s.wfloor[key] = max(s.wfloor[key], order)

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
        """A4: a message counted as delivered never arrives (the subscriber notices nothing yet).
        With PING leases (in-script routes over one TCP connection) a message can only be lost
        with the connection: what follows it on the bus is lost too, and the feed is down."""
        s = self.servers[i]
        if s.bus:
            s.bus.popleft()
            if self.VOUCH:
                self.disconnect(i)

    @precondition(lambda self: self.LOSS and any(s.bus for s in self.servers))
    @rule(i=servers_st)
    def corrupt_message(self, i: int) -> None:
        """A malformed message: ``Engine.on_feed_message`` drops it and asks for a repair."""
        s = self.servers[i]
        if s.bus:
            s.bus.popleft()
            s.core.on_feed_up()
            s.wants_probe = True

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
            s.wants_probe = True

    # ---- rules: probes and time --------------------------------------------------------------

    @rule(i=servers_st)
    def probe(self, i: int) -> None:
        if self._probes_now(self.servers[i]):
            self._probe_now(self.servers[i])

    def _probes_now(self, s: Server) -> bool:
        """Whether the engine would send a probe now.  Without PING leases: at any time (every
        Δ/4, or sooner for a repair).  With them (``Engine``'s policy): when the core asked for
        one (a vouch left a bucket out, a flush notice, a repair) or the slow probe is due."""
        if not self.VOUCH:
            return True
        if not (s.wants_probe or self.now - s.last_probe >= SLOW_PROBE):
            return False
        s.wants_probe, s.last_probe = False, self.now
        return True

    @precondition(lambda self: self.EXTRAS)
    @rule(i=servers_st)
    def probe_send(self, i: int) -> None:
        """The probe flow takes ``tops()`` and its send time and sends its batch."""
        s = self.servers[i]
        if not self._probes_now(s):
            return
        flow = admin.probe(s.state)
        call = next(flow)
        assert isinstance(call, Call), call
        s.probes.append(Probe(flow, call))

    @precondition(lambda self: any(p.replies is None for s in self.servers for p in s.probes))
    @rule(i=servers_st, j=idx_st)
    def probe_exec(self, i: int, j: int) -> None:
        """The probe runs in the store: it reaps due expiries and reads every bucket."""
        s = self.servers[i]
        todo = [p for p in s.probes if p.replies is None]
        if todo:
            p = todo[j % len(todo)]
            p.replies = self._execute(s, p.call)[0]

    @precondition(lambda self: any(p.replies is not None for s in self.servers for p in s.probes))
    @rule(i=servers_st, j=idx_st)
    def probe_apply(self, i: int, j: int) -> None:
        """Its reply arrives, possibly much later: the flow applies it (``on_probe``)."""
        s = self.servers[i]
        done = [p for p in s.probes if p.replies is not None]
        if done:
            p = done[j % len(done)]
            s.probes.remove(p)
            self._drive(s, p.flow, p.replies)

    @rule(dt=st.integers(0, 600), timer=st.booleans())
    def advance(self, dt: int, timer: bool) -> None:
        """Time passes (ms); every server's timer thread ticks, unless it is late (GIL, pause)."""
        self.now_ms += dt
        if timer:
            for s in self.servers:
                s.core.tick(self.now)
                s.core.sweep(1)  # the timer thread frees a flushed bucket a chunk at a time

    # ---- rules: the store misbehaves ---------------------------------------------------------

    @precondition(lambda self: self.WIPES)
    @rule()
    def flushall(self) -> None:
        """FLUSHALL: data and epochs gone, no message, subscribers stay connected (with PING
        leases, tracking tells each connected subscriber, in order with its messages)."""
        self.store.flushall()
        self._wipe()
        if self.VOUCH:
            for s in self.servers:
                if s.up:
                    s.bus.append((FLUSHED, []))

    # ---- rules: PING leases (VouchModel) -----------------------------------------------------

    @precondition(lambda self: self.VOUCH)
    @rule(i=servers_st)
    def ping(self, i: int) -> None:
        """The subscriber sends a PING now: its reply queues behind every message published so
        far, and renews leases to now + Δ when delivered (``deliver``).  A PING of a connection
        that is down, or one never delivered (a silent feed), renews nothing."""
        s = self.servers[i]
        if s.up:
            s.bus.append((PONG + repr(self.now).encode(), []))

    @precondition(lambda self: self.WIPES)
    @rule()
    def restart_store(self) -> None:
        """Redis restarts without persistence: data, epochs and loaded scripts gone, every
        subscriber cut and back."""
        self.store.restart()
        self._wipe()
        for s in self.servers:
            s.bus.clear()
            s.core.on_feed_down()
        for s in self.servers:
            s.up = True
            s.core.on_feed_up()
            s.wants_probe = True

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
            self.now_ms += round(DELTA * 1000 / 4)
            for s in self.servers:
                s.core.tick(self.now)
                s.core.sweep()
            for s in self.servers:
                self._probe_now(s)
            for s in self.servers:
                while s.bus:
                    self._deliver(s)
        for s in self.servers:
            s.core.tick(self.now)
            s.core.sweep(1 << 30)  # the timer frees what is left of flushed buckets
            for key, e in s.core.entries.items():
                self._check_quiet(s, key, e)
        for key in KEYS:  # the model's bookkeeping agrees with the store itself
            raw = self.store.hget(self.layout.data(self.bucket(key)).encode(), FIELDS[key])
            live = self.live.get(key)
            got = None if raw is None else (CODEC.decode(unpack_value(raw)[2]), raw[:8])
            want = None if live is None else (live.value, live.version.to_bytes(8, "big"))
            assert got == want, f"model bookkeeping: {key!r} is {got} in the store, not {want}"

    def _check_quiet(self, s: Server, key: str, e: Entry) -> None:
        """C3 for one cached entry (or absent marker) after quiescence."""
        live = self.live.get(key)
        if is_absent(e):
            assert live is None or live.deadline <= self.now, (
                f"C3: after quiescence {s.name} caches {key!r} as absent, the store "
                f"has {live.value!r}@{live.version} (now={self.now})"
            )
            return
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
            by_bucket = {b: s.core.held(b) for b in range(len(s.core.buckets))}
            live = {k: e for k, e in s.core.entries.items() if k in by_bucket[e.bucket]}
            assert {k: e.bucket for k, e in live.items()} == {
                k: b for b, keys in by_bucket.items() for k in keys
            }, f"{s.name}: the per-bucket index disagrees with the entries"
            hit = self.now < s.core.valid_until  # what the hit path checks
            for key, e in s.core.entries.items():
                if key in live:
                    continue
                # Detached (its bucket flushed, the sweep not done): served by neither path.
                assert s.core.sweeping and not hit and s.core.cached(key, self.now) is None, (
                    f"detached: {s.name} would serve {key!r}@{e.version} of flushed bucket "
                    f"{e.bucket} (sweeping={s.core.sweeping}, now={self.now})"
                )
            assert s.core.absent == sum(map(is_absent, s.core.entries.values())), (
                f"{s.name}: NearCache.absent={s.core.absent} miscounts the markers"
            )
            for key, e in live.items():
                if is_absent(e):
                    self._check_marker(s, key, e, hit)
                    continue
                w = self._check_value(key, e.value, e.version, f"{s.name} cache")
                assert (w.gid, 0) >= s.seen[key], (
                    f"A2 stale entry: {s.name} holds {key!r}={w.value}@{w.version} although it "
                    f"already processed the change {s.seen[key]} that superseded it "
                    f"(now={self.now})"
                )
                # ... or the slow path (reads.read) serves without I/O: under its own
                # bucket's lease, never while the bucket is held (lapsed, kept unserved).
                slow = s.core.cached(key, self.now) is not None
                if s.core.buckets[e.bucket].held_since != -INF:
                    assert not slow and not hit, (
                        f"held: {s.name} would serve {key!r} from bucket {e.bucket}, held since "
                        f"{s.core.buckets[e.bucket].held_since} (now={self.now})"
                    )
                if not (hit or slow):
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

    def _check_marker(self, s: Server, key: str, e: Entry, hit: bool) -> None:
        """The invariants of an entry, for an absent marker (the state its read observed)."""
        order = self._marker(s, key)
        assert order >= s.seen[key], (
            f"A2 stale absent marker: {s.name} holds {key!r} as absent (state {order}) although "
            f"it already processed the change {s.seen[key]} that superseded it (now={self.now})"
        )
        slow = s.core.cached(key, self.now) is not None
        if s.core.buckets[e.bucket].held_since != -INF:
            assert not slow and not hit, f"held: {s.name} would serve {key!r}'s marker"
        if not (hit or slow):
            return
        assert order >= s.rfloor[key], (
            f"C4 monotonic reads: {s.name} would serve {key!r} as absent (state {order}), older "
            f"than state {s.rfloor[key]} that a completed read returned (now={self.now})"
        )
        assert order >= s.wfloor[key], (
            f"C5 read-your-writes: {s.name} would serve {key!r} as absent (state {order}), "
            f"older than its own acknowledged write {s.wfloor[key]} (now={self.now})"
        )
        # "Absent" is one content whatever made it (a delete, a wipe, never written): it
        # reflects the store at some moment at or after now - Δ if the key is absent now or
        # was at that moment.
        w = self.live.get(key)
        if w is not None and w.deadline > self.now:
            end = self.absent_until[key]
            assert end >= self.now - DELTA - EPS, (
                f"C2 bounded staleness: {s.name} serves {key!r} as absent (state {order}), "
                f"set in the store at {end:.3f} < now - Δ = {self.now - DELTA:.3f}"
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


class VouchModel(CoreModel):
    """Every fault of CoreModel with PING leases: PINGs whose replies renew leases travel the
    bus behind the messages, FLUSHALL's tracking invalidation too (in-script route)."""

    VOUCH = True


VouchModel.TestCase.settings = settings(_SETTINGS, max_examples=150)
TestVouchModel = VouchModel.TestCase


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


def _ver_as_set(orig: Any) -> Any:
    def set_value(*args: Any, mode: str, **kwargs: Any) -> Any:
        return orig(*args, mode="set" if mode == "ver" else mode, **kwargs)

    return set_value


def _swap_forgets_old(orig: Any) -> Any:
    def set_value(*args: Any, **kwargs: Any) -> Any:
        version, old = yield from orig(*args, **kwargs)
        return version, None if kwargs.get("mode") == "swap" else old

    return set_value


def _compare_lies(orig: Any) -> Any:
    def compare(*args: Any) -> Any:
        return not (yield from orig(*args))

    return compare


@pytest.mark.parametrize(
    ("name", "planted"),
    [("set_value", _ver_as_set), ("set_value", _swap_forgets_old), ("compare", _compare_lies)],
    ids=["transform_and_cas_without_ver", "swap_forgets_old", "compare_lies"],
)
def test_oracles_catch_a_broken_conditional_write(
    name: str, planted: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The oracles on what swap, compare-and-X and transform return, with one planted bug."""
    monkeypatch.setattr(writes, name, planted(getattr(writes, name)))
    with pytest.raises(AssertionError, match=r"^(C[4-6][: ]|cas|cad|transform)"):
        run_state_machine_as_test(
            CoreModel,
            settings=settings(_SETTINGS, max_examples=300, derandomize=True, database=None,
                              phases=[Phase.generate], print_blob=False,
                              report_multiple_bugs=False),
        )  # fmt: skip


def _renews_held_blindly(orig: Any) -> Any:
    """A broken revalidation: a held bucket adopts the probe's sequence and digest without
    comparing them with its own (the writes made during the pause are never invalidated)."""

    def on_probe(self: NearCache, states: Any, sent_at: float, now: float, tops: Any = None
                 ) -> None:  # fmt: skip
        for b, state in zip(self.buckets, states, strict=True):
            if state is not None and b.held_since != -INF and state[0] == b.epoch:
                b.seq = max(b.seq, state[1])
                b.digest = state[2] if len(state) == 3 else None
        orig(self, states, sent_at, now, tops)

    return on_probe


def _hit_while_held(orig: Any) -> Any:
    """A broken hold: a lapsed bucket's entries stay servable (valid_until ignores it)."""

    def revalidate(self: NearCache) -> float:
        held = [b.held_since for b in self.buckets]
        for b in self.buckets:
            b.held_since = -INF
        try:
            return orig(self)  # type: ignore[no-any-return]
        finally:
            for b, since in zip(self.buckets, held, strict=True):
                b.held_since = since

    return revalidate


@pytest.mark.parametrize(
    ("name", "planted"),
    # "renew_held_without_comparing_seq" (_renews_held_blindly) is proven by an exact order of
    # events instead: test_core_revalidate.py::test_control_renewing_a_held_bucket_without_
    # comparing_serves_the_stale_entry.  This derandomized search found it or not depending on
    # which test modules were loaded before it (Hypothesis seeds generation with their
    # constants): caught alone, missed after the rest of this file.
    [("_revalidate", _hit_while_held)],
    ids=["serve_held_entries"],
)
def test_oracles_catch_a_broken_revalidation(
    name: str, planted: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Revalidation's controls: each planted bug in the held-bucket path is caught."""
    monkeypatch.setattr(NearCache, name, planted(getattr(NearCache, name)))
    with pytest.raises(AssertionError, match=r"^(A2 |C[2-6][: ]|TTL|held)"):
        run_state_machine_as_test(
            CoreModel,
            settings=settings(_SETTINGS, max_examples=1000, derandomize=True, database=None,
                              phases=[Phase.generate], print_blob=False,
                              report_multiple_bugs=False),
        )  # fmt: skip


def _hit_while_detached(orig: Any) -> Any:
    """A broken detach: hits resume while a flushed bucket's entries await their sweep."""

    def revalidate(self: NearCache) -> float:
        detached, self._detached = self._detached, []
        try:
            return orig(self)  # type: ignore[no-any-return]
        finally:
            self._detached = detached

    return revalidate


def _detached_counts_as_live(orig: Any) -> Any:
    """A broken liveness check: a detached entry is served by the slow path (``cached``) and
    taken for the key's newest version by fills, as if its bucket had not been flushed."""

    def live(self: NearCache, key: Any, e: Any) -> bool:
        return True

    return live


def _sweep_blindly(orig: Any) -> Any:
    """The free without its check (``NearCache.sweep``, step 3): it removes whatever entry the
    key has now, also one a fill installed after the flush."""

    def sweep(self: NearCache, limit: int = 4096) -> list[object]:
        out: list[object] = []
        while self._detached and limit > 0:
            keys = self._detached[-1]
            while keys and limit > 0:
                k = keys.pop()
                e = self.entries.pop(k, None)
                if e is not None and is_absent(e):  # the count, as the real sweep keeps it
                    self.absent -= 1
                out.append(e)
                limit -= 1
            if not keys:
                self._detached.pop()
        if not self._detached:
            self._revalidate()
        return out

    return sweep


@pytest.mark.parametrize(
    ("name", "planted"),
    [("_revalidate", _hit_while_detached), ("_live", _detached_counts_as_live),
     ("sweep", _sweep_blindly)],
    ids=["hit_while_detached", "detached_counts_as_live", "sweep_without_the_check"],
)  # fmt: skip
def test_oracles_catch_a_broken_deferred_flush(
    name: str, planted: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deferred flush's controls (server s0 detaches every flushed bucket): each planted
    bug is caught, by a stale read or by the index/detached checks of the invariant."""
    monkeypatch.setattr(NearCache, name, planted(getattr(NearCache, name)))
    with pytest.raises(AssertionError, match=r"^(A2 |C[2-6][: ]|TTL|detached|s0: the per-bucket)"):
        run_state_machine_as_test(
            CoreModel,
            settings=settings(_SETTINGS, max_examples=1000, derandomize=True, database=None,
                              phases=[Phase.generate], print_blob=False,
                              report_multiple_bugs=False),
        )  # fmt: skip


def _absent_ignores_noted_versions(orig: Any) -> Any:
    """A broken absent fill: the marker is installed whatever changes of the key were applied
    while its read was out (what ``Guards(fill_race=False)`` does, for markers alone)."""

    def fill_absent(self: NearCache, token: Any, now: float | None = None) -> bool:
        token.max_seen = 0
        return orig(self, token, now)  # type: ignore[no-any-return]

    return fill_absent


def _marker_outlives_messages(orig: Any) -> Any:
    """A broken marker: a change message of its key leaves it cached (as if its version were
    newer than every message)."""

    def invalidate(self: NearCache, key: Any, version: int) -> None:
        e = self.entries.get(key)
        if e is not None and is_absent(e):
            return
        orig(self, key, version)

    return invalidate


@pytest.mark.parametrize(
    ("name", "planted"),
    [("fill_absent", _absent_ignores_noted_versions), ("_invalidate", _marker_outlives_messages)],
    ids=["absent_fill_race", "marker_survives_message"],
)
def test_oracles_catch_a_broken_absent_marker(
    monkeypatch: pytest.MonkeyPatch, name: str, planted: Any
) -> None:
    """The model's absent-marker oracles, each with one planted bug."""
    monkeypatch.setattr(NearCache, name, planted(getattr(NearCache, name)))
    # Caught by an absent-marker oracle (A2, C2-C5, or "a marker ... no read made"); which one
    # comes first depends on the examples Hypothesis draws.
    with pytest.raises(AssertionError, match=r"^(A2 |C[2-5][: ]|s\d+: a marker for )"):
        run_state_machine_as_test(
            FeedRaces,
            settings=settings(_SETTINGS, max_examples=1000, derandomize=True, database=None,
                              phases=[Phase.generate], print_blob=False,
                              report_multiple_bugs=False),
        )  # fmt: skip
