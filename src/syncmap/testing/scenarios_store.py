"""Store-level scenarios of TESTPLAN §8: S01 (linearizable baseline), S02 (linearizable under
connection and server faults), S03 (durability modes).

They test what Redis plus syncmap's scripts and transport promise when the near cache is bypassed
(``get_with_meta(key, consistent=True)``): every key behaves as one linearizable register, and an
acknowledged write survives a crash when Redis runs ``appendfsync always``.

The history recorder follows TESTPLAN §2.4:

* ``call_ns`` is taken immediately before the map call, ``ret_ns`` immediately after it returns
  (one host, one CLOCK_MONOTONIC: real-time order across threads is trustworthy).  Anything else
  inside the interval (encoding, the GIL) only widens it, which can hide a bug but never invents
  one.
* Every write stores a unique value ``f"{process}-{seq}"``.
* ``WriteOutcomeUnknown`` (or any error we cannot classify) on a mutation makes it *indeterminate*:
  ``ret_ns=None``, output unknown (the checker puts its return at infinity).  The logical process
  is then retired: the worker goes on under a new process id (Knossos's rule; a process never has
  two operations pending).
* ``StoreUnavailable`` means nothing was sent (or Redis refused before running anything): the
  operation definitely had no effect and is dropped.  A read that fails is dropped too (a read
  with unknown output says nothing).
* Jepsen's "independent" key generator: workers come in groups of at most 8; a group works on one
  key until it has issued ``ops_per_key`` operations (150 by default) or 3 of them came back
  indeterminate, then moves to a fresh key.  That keeps the per-key search of the WGL checker in
  the range where it is fast (TESTPLAN §2.5).

Workers are threads of this process.  They share two :class:`SyncMap` instances (workers
alternate between them), standing in for two servers with their own node ids, connections and
feeds.  Sharing is safe: a map hands every concurrent call a connection of its own.  One map per
thread would add a subscriber connection and three background threads per worker on a two-core
machine, for nothing: reads go to Redis (``consistent=True``), so the near caches play no part.

Oracles: the per-key WGL search of :mod:`syncmap.testing.linearizability` (primary), the
versioned-register sweep of :mod:`syncmap.testing.history` (secondary, O(n log n)), and for S02 and
S03 "acknowledged writes lost" (C7), defined at :func:`acked_writes_lost`.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import redis

from ..config import MapConfig
from ..embedded import EmbeddedRedis
from ..errors import StoreUnavailable, WriteOutcomeUnknown
from ..keys import Layout
from ..map import SyncMap
from .faults import client_kill, client_pause
from .history import Op, SweepReport, sweep
from .scenario import (
    ACKED_LOST,
    ANOMALIES,
    OPS,
    UNKNOWN_KEYS,
    Env,
    ScenarioResult,
    finish,
    scenario,
    timed,
)

#: Operation kinds and their default weights (TESTPLAN S01: get/set/cas/delete/put_if_absent,
#: plus swap and compare_and_delete).
DEFAULT_MIX: dict[str, int] = {
    "get": 40, "set": 17, "swap": 7, "cas": 15, "cad": 3, "delete": 8, "setdefault": 10,
}  # fmt: skip
MUTATIONS = frozenset({"set", "swap", "cas", "cad", "delete", "setdefault"})
GROUP_SIZE = 8  # at most this many workers (clients) per key at a time
OPS_PER_KEY = 150
MAX_INDETERMINATE = 3  # rotate the key after this many indeterminate operations on it
_UNAVAILABLE_PAUSE_S = 0.005  # after StoreUnavailable: do not spin against a dead server


# ---- the recorded history ------------------------------------------------------------------------


@dataclass(slots=True)
class Record:
    """One operation as recorded.

    ``output``: ``get`` the value read (None = absent); ``set`` None; ``swap`` the previous value
    (None = absent); ``cas`` / ``cad`` / ``delete`` a bool; ``setdefault`` the value it returned.
    ``input``: the value written, ``(expected, new)`` for ``cas``, ``expected`` for ``cad``.
    ``ret_ns`` None: indeterminate (the output is then meaningless).  ``version``: the version a
    ``get`` read (0 = absent) or a ``set`` was given; 0 otherwise (the API does not return it).
    ``source``: "redis" for the workers' operations, "scan" for the snapshot reads of S02.
    """

    process: str
    key: str
    f: str
    input: Any
    output: Any
    call_ns: int
    ret_ns: int | None
    version: int = 0
    server: str = ""
    source: str = "redis"

    @property
    def indeterminate(self) -> bool:
        return self.ret_ns is None

    @property
    def new_value(self) -> str | None:
        """The value this operation stores if it takes effect (None for deletes and reads)."""
        if self.f in ("set", "swap", "setdefault"):
            return str(self.input)
        if self.f == "cas":
            return str(self.input[1])
        return None

    @property
    def removes(self) -> bool:
        return self.f in ("delete", "cad")

    @property
    def effective(self) -> bool:
        """Acknowledged, and it certainly changed the key's state."""
        if self.ret_ns is None or self.f not in MUTATIONS:
            return False
        if self.f in ("set", "swap"):
            return True
        if self.f == "setdefault":  # values are unique: it returned its own value iff it stored it
            return bool(self.output == self.input)
        return bool(self.output)  # cas, cad, delete


@dataclass(slots=True)
class History:
    records: list[Record] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # every key used, in order of first use
    ok: int = 0
    failed: int = 0  # definitely not applied (StoreUnavailable), dropped
    info: int = 0  # indeterminate mutations
    reads_dropped: int = 0  # reads that failed (no output: dropped)
    unexpected: Counter[str] = field(default_factory=Counter)  # error types we did not expect

    def extend(self, other: History) -> None:
        self.records += other.records
        self.ok += other.ok
        self.failed += other.failed
        self.info += other.info
        self.reads_dropped += other.reads_dropped
        self.unexpected.update(other.unexpected)


def save_records(records: Iterable[Record], path: str | Path) -> None:
    """JSON lines, one operation a line (TESTPLAN §2.4), for re-checking offline."""
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(asdict(r)) + "\n")


def load_records(path: str | Path) -> list[Record]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                d = json.loads(line)
                if d["f"] == "cas" and isinstance(d["input"], list):
                    d["input"] = tuple(d["input"])
                out.append(Record(**d))
    return out


# ---- the recorder --------------------------------------------------------------------------------


class _Slot:
    """The current key of one group of workers (Jepsen's independent/concurrent-generator)."""

    def __init__(self, recorder: Recorder, group: int) -> None:
        self._rec = recorder
        self._group = group
        self._lock = threading.Lock()
        self._generation = -1
        self._key = ""
        self._issued = 0
        self._indeterminate = 0
        self._spent = not self._rotate()  # the key budget (max_keys) is used up

    def _rotate(self) -> bool:
        if not self._rec._claim_key():
            return False
        self._generation += 1
        self._key = f"{self._rec.key_prefix}g{self._group}k{self._generation}"
        self._issued = self._indeterminate = 0
        self._rec._key_used(self._key)
        return True

    def take(self) -> str | None:
        """The key for one more operation, or None when the key budget is spent."""
        with self._lock:
            if self._spent:
                return None
            if (
                self._issued >= self._rec.ops_per_key
                or self._indeterminate >= self._rec.max_indeterminate
            ) and not self._rotate():
                self._spent = True
                return None
            self._issued += 1
            return self._key

    def indeterminate(self, key: str) -> None:
        with self._lock:
            if key == self._key:
                self._indeterminate += 1


@dataclass(slots=True)
class _Worker:
    name: str
    map: SyncMap
    rng: random.Random
    history: History = field(default_factory=History)
    incarnation: int = 0
    seq: int = 0

    @property
    def process(self) -> str:
        return f"{self.name}.{self.incarnation}"

    def fresh_value(self) -> str:
        self.seq += 1
        return f"{self.process}-{self.seq}"

    def retire(self) -> None:
        """Knossos's rule: after an indeterminate operation, continue as a new process."""
        self.incarnation += 1


class Recorder:
    """Runs ``threads`` workers over ``maps`` and records a history (see the module docstring)."""

    def __init__(
        self,
        maps: Sequence[SyncMap],
        *,
        threads: int = 16,
        group_size: int = GROUP_SIZE,
        ops_per_key: int = OPS_PER_KEY,
        max_indeterminate: int = MAX_INDETERMINATE,
        max_keys: int | None = None,
        mix: dict[str, int] | None = None,
        seed: int | None = None,
        key_prefix: str = "",
    ) -> None:
        if not 1 <= group_size <= GROUP_SIZE:
            raise ValueError(f"group_size must be 1..{GROUP_SIZE} (WGL's practical limit)")
        self.maps = list(maps)
        self.threads = threads
        self.group_size = group_size
        self.ops_per_key = ops_per_key
        self.max_indeterminate = max_indeterminate
        self.max_keys = max_keys
        mix = mix or DEFAULT_MIX
        self._kinds = list(mix)
        self._weights = [mix[k] for k in self._kinds]
        self.seed = random.randrange(2**32) if seed is None else seed
        self.key_prefix = key_prefix
        self.stop = threading.Event()
        self._keys_lock = threading.Lock()
        self._keys: list[str] = []
        self._claimed = 0
        # The newest value seen per key (read or written), for cas/cad "expected": plain dict
        # stores and loads are atomic under the GIL, and a stale guess only makes a cas fail.
        self._seen: dict[str, str] = {}

    def _claim_key(self) -> bool:
        with self._keys_lock:
            if self.max_keys is not None and self._claimed >= self.max_keys:
                return False
            self._claimed += 1
            return True

    def _key_used(self, key: str) -> None:
        with self._keys_lock:
            self._keys.append(key)

    def run(self, seconds: float) -> History:
        """Record for ``seconds`` (or until :attr:`stop` is set, or the key budget is spent)."""
        if not self.maps:
            raise ValueError("need at least one map")
        groups = max(1, -(-self.threads // self.group_size))
        slots = [_Slot(self, g) for g in range(groups)]
        workers = [
            _Worker(f"w{i}", self.maps[i % len(self.maps)], random.Random(self.seed * 1000 + i))
            for i in range(self.threads)
        ]
        deadline = time.monotonic() + seconds
        threads = [
            threading.Thread(
                target=self._loop, args=(w, slots[i // self.group_size], deadline),
                name=f"s-worker-{i}", daemon=True,
            )
            for i, w in enumerate(workers)
        ]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out = History(keys=list(self._keys))
        for w in workers:
            out.extend(w.history)
        out.records.sort(key=lambda r: r.call_ns)
        return out

    def _loop(self, w: _Worker, slot: _Slot, deadline: float) -> None:
        while not self.stop.is_set() and time.monotonic() < deadline:
            key = slot.take()
            if key is None:
                return
            if self._step(w, key):
                slot.indeterminate(key)

    def _prepare(self, w: _Worker, key: str, kind: str) -> tuple[Any, Callable[[], Any]]:
        """(input, the call to time) of one operation of ``kind``."""
        m = w.map
        if kind == "get":
            return None, partial(m.get_with_meta, key, consistent=True)
        if kind == "delete":
            return None, partial(m.delete, key)
        if kind in ("cas", "cad"):
            seen = self._seen.get(key)
            # Mostly the newest value seen (so some succeed), sometimes one never written.
            exp = seen if seen is not None and w.rng.random() < 0.85 else f"x{w.process}-{w.seq}"
            if kind == "cad":
                return exp, partial(m.compare_and_delete, key, exp)
            new = w.fresh_value()
            return (exp, new), partial(m.compare_and_set, key, exp, new)
        value = w.fresh_value()
        writers: dict[str, Callable[[str, str], Any]] = {
            "set": m.set, "swap": m.swap, "setdefault": m.setdefault
        }  # fmt: skip
        return value, partial(writers[kind], key, value)

    def _step(self, w: _Worker, key: str) -> bool:
        """One operation; True if it came back indeterminate."""
        kind = w.rng.choices(self._kinds, self._weights)[0]
        m, h = w.map, w.history
        inp, fn = self._prepare(w, key, kind)
        process = w.process
        call = time.monotonic_ns()
        try:
            out = fn()
            ret = time.monotonic_ns()
        except StoreUnavailable:
            # Nothing was sent, or Redis refused before running anything (LOADING, BUSY...).
            if kind == "get":
                h.reads_dropped += 1
            else:
                h.failed += 1
            time.sleep(_UNAVAILABLE_PAUSE_S)
            return False
        except Exception as exc:  # WriteOutcomeUnknown, or anything we cannot classify
            if not isinstance(exc, WriteOutcomeUnknown):
                h.unexpected[type(exc).__name__] += 1
            if kind == "get":
                h.reads_dropped += 1
                return False
            h.records.append(Record(process, key, kind, inp, None, call, None, server=m.node_id))
            h.info += 1
            w.retire()
            return True
        h.ok += 1
        version = 0
        output: Any = None
        if kind == "get":
            output, version, _ = out
        elif kind == "set":
            version = int(out)
        else:
            output = out
        rec = Record(process, key, kind, inp, output, call, ret, version, m.node_id)
        h.records.append(rec)
        self._note(rec)
        return False

    def _note(self, rec: Record) -> None:
        """Remember the newest value seen on the key, for later cas/cad guesses."""
        if rec.f == "get" and rec.output is not None:
            self._seen[rec.key] = rec.output
        elif rec.effective:
            if rec.removes:
                self._seen.pop(rec.key, None)
            elif rec.new_value is not None:
                self._seen[rec.key] = rec.new_value


# ---- oracles -------------------------------------------------------------------------------------


def to_operations(records: Iterable[Record]) -> list[Any]:
    """The history in the linearizability checker's terms (MAP_MODEL)."""
    from .linearizability import ABSENT, UNKNOWN, Operation  # noqa: PLC0415 - lazy: optional

    ops = []
    for r in records:
        if r.ret_ns is None:
            if r.f == "get":
                continue  # a read with unknown output is dropped (TESTPLAN §2.3)
            ops.append(Operation(r.process, r.key, r.f, r.input, UNKNOWN, r.call_ns, None))
            continue
        out: Any = r.output
        if r.f in ("get", "swap") and out is None:
            out = ABSENT
        elif r.f in ("cas", "cad", "delete"):
            out = bool(out)
        inp: Any = tuple(r.input) if r.f == "cas" else r.input
        ops.append(Operation(r.process, r.key, r.f, inp, out, r.call_ns, r.ret_ns))
    return ops


def to_sweep_ops(records: Iterable[Record]) -> list[Op]:
    """The history for the versioned-register sweep (TESTPLAN §2.6 A), which knows reads and sets.

    * reads of a value -> "read" with their version.  Reads of *absent* are left out: they carry
      version 0, which the sweep would take for "older than every write", and a delete is newer.
      (WGL checks them.)  Scan reads carry no version and are left out too.
    * acknowledged ``set`` -> "write" with its version.
    * any other mutation that stored or may have stored a value (swap, cas, setdefault, and every
      indeterminate one) -> "info": the API does not return their version, so the sweep only uses
      them to tell a read of their value from a phantom.
    Versions only grow per bucket (the sequence survives restarts with AOF), and absent reads are
    out, so "a read's version >= every set acknowledged before it was called" holds for a
    linearizable store even with deletes in between.
    """
    ops: list[Op] = []
    for r in records:
        if r.source != "redis":
            continue
        if r.f == "get":
            if r.ret_ns is not None and r.output is not None:
                ops.append(Op(r.process, "read", r.key, r.output, r.version, r.call_ns, r.ret_ns,
                              "redis"))  # fmt: skip
            continue
        value = r.new_value
        if value is None:
            continue
        if r.f == "set" and r.ret_ns is not None:
            ops.append(Op(r.process, "write", r.key, value, r.version, r.call_ns, r.ret_ns))
        elif r.ret_ns is None or r.effective:
            ops.append(Op(r.process, "info", r.key, value, -1, r.call_ns, r.ret_ns or r.call_ns))
    return ops


@dataclass(slots=True)
class Checked:
    """What the oracles said about one history."""

    verdict: str
    ops: int
    keys: int
    keys_failed: int
    keys_unknown: int
    seconds: float
    witness: str
    sweep: SweepReport

    @property
    def anomalies(self) -> int:
        return self.keys_failed + self.sweep.anomalies

    def figures(self) -> dict[str, Any]:
        return {
            OPS: self.ops,
            "keys_checked": self.keys,
            "keys_nonlinearizable": self.keys_failed,
            UNKNOWN_KEYS: self.keys_unknown,
            "checker_s": round(self.seconds, 2),
            "sweep_reads": self.sweep.reads,
            "sweep_anomalies": self.sweep.anomalies,
            "phantom_reads": self.sweep.phantom_reads,
        }


def check_records(records: Sequence[Record], *, budget_s: float = 10.0, workers: int = 2
                  ) -> Checked:  # fmt: skip
    """WGL per key (indeterminate mutations return at infinity) + the version sweep (Δ = 0)."""
    from .linearizability import MAP_MODEL, check  # noqa: PLC0415

    result = check(to_operations(records), MAP_MODEL, budget_s=budget_s, workers=workers)
    report = sweep(to_sweep_ops(records), delta_s=0.0)
    return Checked(
        verdict=str(result.verdict),
        ops=result.ops,
        keys=result.keys,
        keys_failed=result.keys_failed,
        keys_unknown=result.keys_unknown,
        seconds=float(result.seconds),
        witness=result.witness,
        sweep=report,
    )


def plant_stale_read(records: Sequence[Record]) -> tuple[list[Record], str]:
    """A copy of ``records`` with one read changed to a stale value: certainly not linearizable.

    It picks the earliest read R of a key with acknowledged sets S1, S2 such that S1 returned
    before S2 was called and S2 returned before R was called, and makes R return S1's value (and
    version).  Only S1 ever wrote that value (values are unique) and S2 must take effect after S1
    and before R, so no linearization lets R see it.  Without such a read, R returns a value no
    one wrote (a phantom), equally impossible.
    """
    by_key: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_key[r.key].append(r)
    best: tuple[int, int, Record] | None = None  # (call_ns of R, index of R, S1)
    for ops in by_key.values():
        sets = sorted((r for r in ops if r.f == "set" and r.ret_ns is not None),
                      key=lambda r: r.call_ns)  # fmt: skip
        for r in ops:
            if r.f != "get" or r.ret_ns is None or r.source != "redis":
                continue
            if best is not None and r.call_ns >= best[0]:
                break
            s2 = max((s for s in sets if s.ret_ns is not None and s.ret_ns < r.call_ns),
                     key=lambda s: s.call_ns, default=None)  # fmt: skip
            if s2 is None:
                continue
            s1 = next((s for s in sets if s.ret_ns is not None and s.ret_ns < s2.call_ns
                       and s.input != r.output), None)  # fmt: skip
            if s1 is not None:
                best = (r.call_ns, records.index(r), s1)
                break
    out = list(records)
    if best is not None:
        _, i, s1 = best
        old = out[i]
        out[i] = Record(old.process, old.key, "get", None, s1.input, old.call_ns, old.ret_ns,
                        s1.version, old.server, old.source)  # fmt: skip
        return out, f"read of {old.key!r} by {old.process} now returns stale {s1.input!r}"
    for i, old in enumerate(out):
        if old.f == "get" and old.ret_ns is not None:
            out[i] = Record(old.process, old.key, "get", None, "never-written", old.call_ns,
                            old.ret_ns, 1, old.server, old.source)  # fmt: skip
            return out, f"read of {old.key!r} by {old.process} now returns a phantom"
    raise ValueError("the history has no completed read to corrupt")


@dataclass(slots=True)
class LostReport:
    lost: int = 0
    phantom_keys: int = 0  # final value that no write (acked or indeterminate) stored
    witnesses: list[str] = field(default_factory=list)


_INF, _NEG_INF = 2**63, -(2**63)


def _latest_producer(ops: Iterable[Record], final: str | None, end_ns: int) -> int | None:
    """The latest return time of a mutation that may have produced ``final`` (+inf for an
    indeterminate one, -inf for the initial state), or None if nothing could have."""
    latest: int | None = _NEG_INF if final is None else None  # absent: the initial state
    for p in ops:
        if p.call_ns > end_ns or not (p.indeterminate or p.effective):
            continue
        if p.removes if final is None else p.new_value == final:
            ret = _INF if p.ret_ns is None else p.ret_ns
            latest = ret if latest is None else max(latest, ret)
    return latest


def acked_writes_lost(records: Iterable[Record], snapshot: dict[str, str | None], start_ns: int,
                      end_ns: int) -> LostReport:  # fmt: skip
    """C7: acknowledged writes a snapshot of the keys, read during [start_ns, end_ns], has lost.

    The value F a key holds in the snapshot was produced by some mutation P: the write of F (values
    are unique), or for F = absent a delete (or the initial state, which "returned" at -inf).  P
    counts as a producer if it was acknowledged or indeterminate (never a definitely failed one)
    and was called before the snapshot read ended.  Then an acknowledged mutation W that certainly
    changed the key is *lost* when

        W returned before the snapshot started, and every producer P of F returned before W was
        called (so F's producer precedes W in real time: the snapshot should show W or newer).

    That is sound for a linearizable, durable store: the snapshot shows the last mutation
    linearized before it, and one linearized after W cannot have returned before W was called.
    Indeterminate producers return at +inf, so they never make W lost (conservative).  Every
    acknowledged write after the surviving one counts, as in TESTPLAN §5.5's "2,740 of 3,188".
    """
    by_key: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        if r.f in MUTATIONS and r.source == "redis":
            by_key[r.key].append(r)
    report = LostReport()
    for key, ops in by_key.items():
        if key not in snapshot:
            continue
        final = snapshot[key]
        latest = _latest_producer(ops, final, end_ns)
        if latest is None:
            report.phantom_keys += 1
            latest = _NEG_INF
            if len(report.witnesses) < 10:
                report.witnesses.append(f"{key!r} holds {final!r}, which no write stored")
        for w in ops:
            if w.effective and w.ret_ns is not None and w.ret_ns < start_ns and w.call_ns > latest:
                report.lost += 1
                if len(report.witnesses) < 10:
                    report.witnesses.append(
                        f"{key!r}: acked {w.f}({w.input!r}) by {w.process} lost; holds {final!r}"
                    )
    return report


# ---- helpers shared by the scenarios -------------------------------------------------------------


@contextlib.contextmanager
def _redis_for(env: Env, **server: Any) -> Iterator[tuple[str, EmbeddedRedis | None]]:
    """The user's Redis (``env.url``) or a private server."""
    if env.url:
        yield env.url, None
    else:
        with env.server(**server) as srv:
            yield srv.url, srv


def _open_maps(url: str, name: str, count: int, config: MapConfig) -> list[SyncMap]:
    maps: list[SyncMap] = []
    try:
        for i in range(count):
            maps.append(SyncMap(name, url, config=config, node_id=f"{name}-n{i}"))
    except BaseException:
        for m in maps:
            m.close()
        raise
    return maps


def delete_map_keys(url: str, name: str, namespace: str, buckets: int) -> int:
    """Delete every Redis key of map ``name`` (its meta hash and each bucket's three keys)."""
    layout = Layout(namespace, name, buckets)
    names = [layout.meta, *(k for b in range(buckets) for k in layout.bucket_keys(b))]
    client = redis.Redis.from_url(url)
    try:
        stray = [k.decode() for k in client.scan_iter(match=f"{namespace}:{{{name}*", count=1000)]
        return int(client.delete(*{*names, *stray}))
    finally:
        client.close()


def _items(m: SyncMap, timeout: float = 10.0) -> list[tuple[Any, Any]]:
    """``m.items()``, retried while the server does not answer (it may be loading)."""
    return _snapshot_items(m, timeout)[0]


def _wait_loaded(server: EmbeddedRedis, timeout: float = 10.0) -> None:
    """Until a restarted server has loaded its data (``restart()`` returns once INFO answers, and
    INFO answers while Redis still refuses other commands with LOADING)."""
    give_up = time.monotonic() + timeout
    client = server.client(socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        while True:
            try:
                if not int(client.info("persistence").get("loading", 0)):
                    return
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > give_up:
                raise TimeoutError(f"{server!r} still loading after {timeout} s")
            time.sleep(0.005)
    finally:
        client.close()


def _snapshot_items(m: SyncMap, timeout: float) -> tuple[list[tuple[Any, Any]], int, int]:
    give_up = time.monotonic() + timeout
    while True:
        start = time.monotonic_ns()
        try:
            items = m.items()
        except StoreUnavailable:
            if time.monotonic() > give_up:
                raise
            time.sleep(0.01)
            continue
        return items, start, time.monotonic_ns()


def _snapshot(m: SyncMap, keys: Iterable[str], timeout: float = 10.0
              ) -> tuple[dict[str, str | None], int, int]:  # fmt: skip
    """Every key's value, read in one round trip during [start_ns, end_ns] (each bucket's read is
    atomic, so each key's value is its value at some instant of that interval)."""
    items, start, end = _snapshot_items(m, timeout)
    have = {str(k): v for k, v in items}
    return {k: have.get(k) for k in keys}, start, end


def _scan_records(snapshot: dict[str, str | None], start: int, end: int, tag: str
                  ) -> list[Record]:  # fmt: skip
    return [Record(tag, k, "get", None, v, start, end, source="scan") for k, v in snapshot.items()]


def _short(text: str, lines: int = 6) -> str:
    """The head of a checker witness, for a one-line failure (the full text is in Checked)."""
    head = text.splitlines()[:lines]
    return " | ".join(head) + (" | ..." if len(text.splitlines()) > lines else "")


def _history_figures(h: History) -> dict[str, Any]:
    return {
        "ops_recorded": len(h.records),
        "ops_ok": h.ok,
        "ops_fail": h.failed,
        "ops_info": h.info,
        "reads_dropped": h.reads_dropped,
        "keys_used": len(h.keys),
        # The slowest acknowledged write: S02's CLIENT PAUSE WRITE shows up here (>= the pause).
        "write_latency_max_ms": round(
            max(
                (
                    r.ret_ns - r.call_ns
                    for r in h.records
                    if r.ret_ns is not None and r.f in MUTATIONS
                ),
                default=0,
            )
            / 1e6,
            1,
        ),
    }


# ---- S01 -----------------------------------------------------------------------------------------


@scenario("S01", "auth-linearizable-baseline", faults_server=False)
def s01(
    env: Env,
    seconds: float,
    *,
    threads: int = 16,
    ops_per_key: int = OPS_PER_KEY,
    max_keys: int | None = None,
    budget_s: float = 10.0,
    workers: int = 2,
    seed: int | None = None,
    plant: bool = False,
    history_path: str | Path | None = None,
    **_: Any,
) -> ScenarioResult:
    """Concurrent get/set/swap/cas/cad/delete/setdefault with the cache bypassed, no faults.

    With ``env.url`` it runs on that Redis under a map of its own and deletes every key it made.
    ``plant=True`` corrupts one read before checking (the oracle's negative control: must fail).
    """
    result, started = timed("S01", "auth-linearizable-baseline")
    name = f"s01-{uuid.uuid4().hex[:10]}"
    config = MapConfig(namespace=env.namespace)
    rec = Recorder([], threads=threads, ops_per_key=ops_per_key, max_keys=max_keys, seed=seed)
    with _redis_for(env) as (url, _server):
        try:  # on the user's Redis, every key the map made is deleted, whatever happens
            rec.maps = maps = _open_maps(url, name, 2, config)
            try:
                history = rec.run(seconds)
            finally:
                for m in maps:
                    m.close()
        finally:
            deleted = delete_map_keys(url, name, env.namespace, config.buckets)
    records = history.records
    if history_path is not None:
        save_records(records, history_path)
    result.figures.update(_history_figures(history))
    result.figures["seed"] = rec.seed
    if plant:
        records, what = plant_stale_read(records)
        result.figures["planted"] = what
    checked = check_records(records, budget_s=budget_s, workers=workers)
    result.figures.update(checked.figures())
    result.figures[ANOMALIES] = checked.anomalies
    result.figures["redis_keys_deleted"] = deleted
    result.require(
        checked.keys_failed == 0,
        f"{checked.keys_failed} keys not linearizable (first: {_short(checked.witness)})",
    )
    result.require(
        checked.sweep.anomalies == 0,
        f"version sweep: {checked.sweep.summary()} {checked.sweep.witnesses[:3]}",
    )
    result.require(
        checked.ops > 0 and checked.keys > checked.keys_unknown,
        "nothing was checked: no operations, or every key ran out of budget",
    )
    result.require(not history.unexpected, f"unexpected errors: {dict(history.unexpected)}")
    return finish(result, started)


# ---- S02 -----------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Nemesis:
    """S02's faults, on a thread: CLIENT KILL TYPE normal every ``kill_every`` s, one CLIENT PAUSE
    WRITE at 30 % of the run, one kill -9 + restart at 55 %, then a snapshot of every key."""

    server: EmbeddedRedis
    recorder: Recorder
    snap_map: SyncMap
    seconds: float
    kill_every: float = 0.3
    pause_ms: int = 300
    kills: int = 0
    clients_killed: int = 0
    pauses: int = 0
    restarts: int = 0
    downtime_ms: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)
    snapshot: tuple[dict[str, str | None], int, int] | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        start = time.monotonic()
        pause_at, crash_at = start + 0.30 * self.seconds, start + 0.55 * self.seconds
        end = start + self.seconds
        admin = self.server.client(socket_timeout=2.0, socket_connect_timeout=2.0)
        try:
            while not self.recorder.stop.is_set() and time.monotonic() < end:
                now = time.monotonic()
                try:
                    if self.pauses == 0 and now >= pause_at:
                        client_pause(admin, self.pause_ms, "WRITE")
                        self.pauses += 1
                        # No CLIENT KILL until the pause is over: it would turn every paused
                        # write into an indeterminate one and hide the pause itself.
                        time.sleep(self.pause_ms / 1000)
                    elif self.restarts == 0 and now >= crash_at:
                        self._crash()
                    else:
                        self.clients_killed += client_kill(admin, "normal")
                        self.kills += 1
                except Exception as exc:  # counted and reported; the run goes on
                    self.errors[type(exc).__name__] += 1
                time.sleep(self.kill_every)
        finally:
            admin.close()
            self.done.set()

    def _crash(self) -> None:
        down = time.monotonic()
        self.server.kill()
        self.server.restart()
        self.restarts += 1
        self.downtime_ms = (time.monotonic() - down) * 1000
        with self.recorder._keys_lock:
            keys = list(self.recorder._keys)
        self.snapshot = _snapshot(self.snap_map, keys)


def _judge_s02(result: ScenarioResult, history: History, checked: Checked, nemesis: _Nemesis,
               lost_mid: LostReport, lost_end: LostReport) -> None:  # fmt: skip
    fig = result.figures
    fig.update(_history_figures(history))
    fig.update(checked.figures())
    fig.update(client_kills=nemesis.kills, clients_killed=nemesis.clients_killed,
               pauses=nemesis.pauses, restarts=nemesis.restarts,
               restart_downtime_ms=round(nemesis.downtime_ms, 1))  # fmt: skip
    fig["acked_lost_at_restart"] = lost_mid.lost
    fig["acked_lost_final"] = lost_end.lost
    fig[ACKED_LOST] = lost_mid.lost + lost_end.lost
    phantoms = lost_mid.phantom_keys + lost_end.phantom_keys
    fig[ANOMALIES] = checked.anomalies + phantoms
    if history.unexpected:
        fig["unexpected_errors"] = dict(history.unexpected)
    if nemesis.errors:
        fig["nemesis_errors"] = dict(nemesis.errors)
    result.require(
        checked.keys_failed == 0,
        f"{checked.keys_failed} keys not linearizable (first: {_short(checked.witness)})",
    )
    result.require(
        checked.sweep.anomalies == 0,
        f"version sweep: {checked.sweep.summary()} {checked.sweep.witnesses[:3]}",
    )
    result.require(phantoms == 0, f"snapshot values no write stored: {lost_mid.witnesses[:3]}"
                   f" {lost_end.witnesses[:3]}")  # fmt: skip
    result.require(
        fig[ACKED_LOST] == 0,
        f"{fig[ACKED_LOST]} acknowledged writes lost with "
        f"appendfsync always: {(lost_mid.witnesses + lost_end.witnesses)[:5]}",
    )
    result.require(
        nemesis.restarts == 1 and nemesis.snapshot is not None,
        "the kill -9 + restart did not happen (run too short?)",
    )
    result.require(nemesis.clients_killed > 0, "CLIENT KILL never disconnected a client")
    result.require(
        checked.ops > 0 and checked.keys > checked.keys_unknown,
        "nothing was checked: no operations, or every key ran out of budget",
    )


@scenario("S02", "auth-linearizable-conn-faults", faults_server=True)
def s02(
    env: Env,
    seconds: float,
    *,
    threads: int = 16,
    ops_per_key: int = OPS_PER_KEY,
    budget_s: float = 10.0,
    workers: int = 2,
    seed: int | None = None,
    socket_timeout: float = 1.0,
    kill_every: float = 0.3,
    pause_ms: int = 300,
    guard: bool = True,
    history_path: str | Path | None = None,
    **_: Any,
) -> ScenarioResult:
    """S01's workload on a private Redis (AOF, fsync always) under connection kills, a write
    pause and a kill -9 + restart.  Must: no anomaly, no acknowledged write lost.

    ``guard=False`` is the negative control: Redis without persistence (the protection switched
    off), so the restart loses every acknowledged write and the run must fail (C7 and WGL).
    """
    result, started = timed("S02", "auth-linearizable-conn-faults")
    name = f"s02-{uuid.uuid4().hex[:10]}"
    # socket_timeout (1 s) is longer than the write pause, which shows up as latency; a client
    # timeout would be one more source of indeterminate operations, handled like the others.
    config = MapConfig(namespace=env.namespace, socket_timeout=socket_timeout)
    persistence: dict[str, Any] = {"appendonly": True, "appendfsync": "always"} if guard else {}
    with env.server(**persistence) as server:
        maps = _open_maps(server.url, name, 3, config)
        try:
            rec = Recorder(maps[:2], threads=threads, ops_per_key=ops_per_key, seed=seed)
            nemesis = _Nemesis(server, rec, maps[2], seconds, kill_every=kill_every,
                               pause_ms=pause_ms)  # fmt: skip
            nt = threading.Thread(target=nemesis.run, name="s02-nemesis", daemon=True)
            nt.start()
            try:
                history = rec.run(seconds)
            finally:
                rec.stop.set()
                nt.join()
            final = _snapshot(maps[2], history.keys)
        finally:
            for m in maps:
                m.close()
    records = list(history.records)
    lost_mid = LostReport()
    if nemesis.snapshot is not None:
        lost_mid = acked_writes_lost(records, *nemesis.snapshot)
        records += _scan_records(*nemesis.snapshot, "scan-restart")
    lost_end = acked_writes_lost(records, *final)
    records += _scan_records(*final, "scan-final")
    records.sort(key=lambda r: r.call_ns)
    if history_path is not None:  # with the snapshot reads (source "scan"), for re-checking
        save_records(records, history_path)
    checked = check_records(records, budget_s=budget_s, workers=workers)
    _judge_s02(result, history, checked, nemesis, lost_mid, lost_end)
    result.figures["seed"] = rec.seed
    result.figures["aof"] = "always" if guard else "off"
    return finish(result, started)


# ---- S03 -----------------------------------------------------------------------------------------

#: name -> EmbeddedRedis options.  "none" is ``--save ''`` without AOF (EmbeddedRedis's default).
DURABILITY_MODES: dict[str, dict[str, Any]] = {
    "none": {"extra_args": ("--save", "")},
    "everysec": {"appendonly": True, "appendfsync": "everysec"},
    "always": {"appendonly": True, "appendfsync": "always"},
}


@dataclass(slots=True)
class Durability:
    mode: str
    acked: int = 0
    lost: int = 0
    unknown: int = 0  # writes of unknown outcome (in flight at the kill)
    unknown_applied: int = 0  # ... of which the restarted server has
    downtime_ms: float = 0.0


def durability_run(env: Env, mode: str, seconds: float, *, writers: int = 4) -> Durability:
    """Steady writes (each to a key of its own) for ``seconds``, kill -9 while they run, restart,
    then compare a scan of the map with every acknowledged write."""
    name = f"s03-{mode}-{uuid.uuid4().hex[:8]}"
    config = MapConfig(namespace=env.namespace, socket_timeout=2.0)
    out = Durability(mode)
    acked: list[list[str]] = [[] for _ in range(writers)]
    unknown: list[list[str]] = [[] for _ in range(writers)]
    stop = threading.Event()

    def write(i: int, m: SyncMap) -> None:
        seq = 0
        while not stop.is_set():
            seq += 1
            value = f"w{i}-{seq}"  # key = value: one key per write, so nothing overwrites it
            try:
                m.set(value, value)
            except WriteOutcomeUnknown:
                unknown[i].append(value)
            except StoreUnavailable:
                time.sleep(_UNAVAILABLE_PAUSE_S)
            else:
                acked[i].append(value)

    with env.server(**DURABILITY_MODES[mode]) as server:
        m = SyncMap(name, server.url, config=config, node_id=f"{name}-w")
        try:
            threads = [threading.Thread(target=write, args=(i, m), daemon=True)
                       for i in range(writers)]  # fmt: skip
            for t in threads:
                t.start()
            time.sleep(seconds)
            server.kill()  # while the writers run: some writes are in flight
            stop.set()
            for t in threads:
                t.join()
            down = time.monotonic()
            server.restart()
            _wait_loaded(server)
            out.downtime_ms = (time.monotonic() - down) * 1000
        finally:
            m.close()
        with SyncMap(name, server.url, config=config, node_id=f"{name}-scan") as scan:
            have = {str(k): v for k, v in _items(scan)}
    for values in acked:
        out.acked += len(values)
        out.lost += sum(1 for v in values if have.get(v) != v)
    for values in unknown:
        out.unknown += len(values)
        out.unknown_applied += sum(1 for v in values if have.get(v) == v)
    return out


@scenario("S03", "durability-modes", faults_server=True)
def s03(
    env: Env,
    seconds: float,
    *,
    modes: Sequence[str] = ("none", "everysec", "always"),
    writers: int = 4,
    **_: Any,
) -> ScenarioResult:
    """Acknowledged writes lost to a kill -9 per persistence mode.  Only ``always`` has a must (0).

    kill -9 kills the process, not the machine: what Redis has write()n to the AOF is in the
    kernel's page cache and survives, so ``everysec`` is expected to lose (almost) nothing here.
    Its up-to-1 s window is about an OS crash or power loss, which this scenario does not cause.
    """
    result, started = timed("S03", "durability-modes")
    per_mode = max(0.3, seconds / max(1, len(modes)))
    for mode in modes:
        d = durability_run(env, mode, per_mode, writers=writers)
        result.figures[f"acked_{mode}"] = d.acked
        result.figures[f"lost_{mode}"] = d.lost
        result.figures[f"in_flight_{mode}"] = f"{d.unknown_applied}/{d.unknown} applied"
        result.require(d.acked > 0, f"{mode}: no write was acknowledged")
        if mode == "always":
            result.figures[ACKED_LOST] = d.lost
            result.require(d.lost == 0, f"appendfsync always lost {d.lost} of {d.acked} "
                           "acknowledged writes")  # fmt: skip
    return finish(result, started)


__all__ = [
    "DEFAULT_MIX",
    "DURABILITY_MODES",
    "Checked",
    "Durability",
    "History",
    "LostReport",
    "Record",
    "Recorder",
    "acked_writes_lost",
    "check_records",
    "delete_map_keys",
    "durability_run",
    "load_records",
    "plant_stale_read",
    "s01",
    "s02",
    "s03",
    "save_records",
    "to_operations",
    "to_sweep_ops",
]
