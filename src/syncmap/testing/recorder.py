"""The history recorder of TESTPLAN §2.4 for store-level scenarios (S01, S02, S03).

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
feeds.  Either may be a ``syncmap.aio`` map driven through ``testing.drivers.ThreadedAioMap``
(S01a): its workers' calls then run as concurrent tasks on that map's event loop.  Sharing
is safe: a map hands every concurrent call a connection of its own.  One map per thread would
add a subscriber connection and three background threads per worker on a two-core machine,
for nothing: reads go to Redis (``consistent=True``), so the near caches play no part.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from ..errors import StoreUnavailable, WriteOutcomeUnknown
from .drivers import AnyMap
from .history import Op

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


_ABSENT_JSON = {"$absent": True}  # as syncmap.testing.formats writes "absent"


def save_records(records: Iterable[Record], path: str | Path) -> None:
    """JSON lines, one operation a line (TESTPLAN §2.4), for re-checking offline.

    The lines are in ``syncmap check``'s format (docs: ``syncmap.testing.formats``), read there
    as :func:`to_operations` reads them here: ``type`` ``ok`` or ``info`` (indeterminate), an
    absent value as ``{"$absent": true}`` (``null`` would be the value None), and the extra
    fields (``version``, ``server``, ``source``) that :func:`load_records` needs."""
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            d = asdict(r)
            d["type"] = "info" if r.ret_ns is None else "ok"
            if r.ret_ns is not None and r.f in ("get", "swap") and r.output is None:
                d["output"] = _ABSENT_JSON
            fh.write(json.dumps(d) + "\n")


def load_records(path: str | Path) -> list[Record]:
    """The records :func:`save_records` wrote (older files, with ``null`` for absent, too)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                d = json.loads(line)
                d.pop("type", None)
                if d["output"] == _ABSENT_JSON:
                    d["output"] = None
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
    map: AnyMap
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
        maps: Sequence[AnyMap],
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


__all__ = [
    "GROUP_SIZE",
    "MAX_INDETERMINATE",
    "MUTATIONS",
    "OPS_PER_KEY",
    "_UNAVAILABLE_PAUSE_S",
    "History",
    "Record",
    "Recorder",
    "load_records",
    "save_records",
    "to_operations",
    "to_sweep_ops",
]
