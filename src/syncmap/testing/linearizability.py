"""Per-key linearizability checking: Wing & Gong's search with Lowe's memoisation (TESTPLAN §2.3).

A history is linearizable if every operation can be given one instant inside its own interval
``[call, return]`` such that applying the operations in the order of those instants to the
sequential model reproduces every output that was observed.

**Partition first.**  Operations on different keys of a map never constrain each other (a map is a
product of independent registers), so linearizability of the whole history is the conjunction of
the per-key verdicts (Herlihy & Wing's locality; Horn & Kroening call it P-compositionality).  The
search is exponential in the number of operations pending at once, not in the history length, so
checking keys separately is what keeps it tractable.  Keys can also run in parallel processes.

**The search (Wing & Gong 1993, as refined by Lowe 2017).**  Every operation becomes two events,
CALL and RETURN, sorted by time into a doubly linked list.  The candidates for the next
linearization point are exactly the CALLs that come before the first remaining RETURN: an operation
that returned before another was called must be linearized first, and everything that precedes the
first RETURN is still pending at that instant.  The search takes the first candidate that the model
accepts, unlinks its two events and starts again from the head of the list.  When it reaches a
RETURN instead, no remaining candidate can go next, so it undoes the latest choice (the stack) and
tries the candidate after it.  An empty list means a linearization was found (the stack is the
witness order); a RETURN reached with an empty stack means there is none.

**Lowe's memoisation.**  Before descending, the pair (set of linearized operations, model state)
is looked up in a cache.  Whatever order produced that pair, the remaining problem is the same, so
a pair that was explored once (and, since we are still searching, failed) is never explored again.
This is what turns most histories from factorial into roughly ``n * 2^c * |states|`` work, ``c``
being the number of operations pending at once.  States must therefore be hashable: values read
from a map may be lists or dicts, so every value is *frozen* (tuples, frozensets,
:class:`FrozenDict`) before the search.

**Closed intervals.**  An operation ``[10, 20]`` is concurrent with one ``[20, 30]``: at equal
times the CALL sorts before the RETURN.  Timestamps come from a monotonic clock and can be equal;
treating equal stamps as ordered would invent a real-time order the clock did not observe, and
could call a correct history wrong.  Closed intervals only ever allow *more* orders.

**Indeterminate operations** (timeouts, connection errors after sending) have output
:data:`UNKNOWN` and never return (``ret_ns=None``, treated as +inf): the request may still be in
flight, so its effect may land at any time after the call, or never.  The model applies the effect
"as if now" and accepts any output; "never" is covered because the search can place the operation
after everything else.  A read with an unknown output constrains nothing and is dropped (it would
only add a forever-pending candidate).  A mutation that *certainly* had no effect (output
:data:`FAILED`, e.g. rejected before it was sent) is dropped too.  A timeout is never that.

**Budget.**  Each key gets ``budget_s`` seconds (and a cap on memoised states).  When it runs out
the key's verdict is ``"unknown"``, never ``"linearizable"``: a search that did not finish proves
nothing.

**Witness.**  For a key that is not linearizable the checker reports, as Knossos and Porcupine do,
the longest partial linearization it found, the model state after it, the operation whose RETURN
could not be passed (it had to take effect before returning and no order allows it), and why each
candidate at that point fails.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, Final, Literal, Protocol

__all__ = [
    "ABSENT",
    "FAILED",
    "KV_MODEL",
    "MAP_MODEL",
    "REGISTER_MODEL",
    "UNKNOWN",
    "CheckResult",
    "FrozenDict",
    "KeyResult",
    "Model",
    "Operation",
    "TableModel",
    "check",
    "check_key",
    "describe_op",
    "freeze",
]


class Sentinel(enum.Enum):
    """Markers that are not values.  An Enum so they survive pickling (worker processes) as the
    same objects, and compare by identity."""

    ABSENT = "ABSENT"
    UNKNOWN = "UNKNOWN"
    FAILED = "FAILED"

    def __repr__(self) -> str:
        return self.value


#: The key has no value (a ``get`` of a missing key; ``swap``'s "no previous value").
ABSENT: Final = Sentinel.ABSENT
#: The output is not known: the operation timed out or its connection broke after sending.
UNKNOWN: Final = Sentinel.UNKNOWN
#: The operation certainly had no effect (rejected before sending, or rolled back whole).  Such
#: operations are dropped before the search.  Never use it for a timeout.
FAILED: Final = Sentinel.FAILED

Verdict = Literal["linearizable", "not linearizable", "unknown"]

#: Memoised (set, state) pairs per key before the key is declared "unknown" (memory guard: each
#: costs ~150-250 bytes, so this is about a gigabyte at worst).
MAX_STATES: Final = 4_000_000


@dataclass(frozen=True)
class Operation:
    """One operation of a history.  ``ret_ns=None``: it never returned (timeout, crash)."""

    process: Any
    key: Any
    f: str
    input: Any
    output: Any
    call_ns: int
    ret_ns: int | None


class Model(Protocol):
    """A sequential specification.  ``step`` says whether ``f(input) -> output`` is legal in
    ``state`` and returns the state after it.  States must be hashable (memoisation).  ``output``
    may be :data:`UNKNOWN`: the step must then accept and apply the effect."""

    def init(self) -> Any: ...

    def step(self, state: Any, f: str, input: Any, output: Any) -> tuple[bool, Any]: ...


# ---- values -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FrozenDict:
    """A hashable stand-in for a dict value (equal iff the dicts are equal)."""

    items: frozenset[tuple[Hashable, Hashable]]

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{k!r}: {v!r}" for k, v in self.items) + "}"


_ATOMS = (str, bytes, int, float, type(None), Sentinel)


def freeze(value: Any) -> Hashable:
    """``value`` made hashable with the same equality: lists and tuples become tuples, dicts
    :class:`FrozenDict`, sets frozensets, recursively.  (JSON has no tuples, so a list and a tuple
    with the same items are the same value here.)"""
    if isinstance(value, _ATOMS):
        return value
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    if isinstance(value, Mapping):
        return FrozenDict(frozenset((freeze(k), freeze(v)) for k, v in value.items()))
    if isinstance(value, set | frozenset):
        return frozenset(freeze(v) for v in value)
    try:
        hash(value)
    except TypeError:
        raise TypeError(f"cannot use a {type(value).__name__} as a value in a history") from None
    return value  # type: ignore[no-any-return]


# ---- models -------------------------------------------------------------------------------------

StepFn = Callable[[Any, Any, Any], tuple[bool, Any]]
# (produced, observed) values of an op for the O(n) pre-checks; None: cannot say (e.g. append).
ValuesFn = Callable[[Any, Any], tuple[tuple[Any, ...], tuple[Any, ...]] | None]


class TableModel:
    """A model given as a table ``f -> (step, values)``.

    ``values(input, output)`` feeds the cheap pre-checks: the values the operation may leave in the
    state, and the values it proves the state held.  ``reads`` are the operations without effect
    (dropped when their output is unknown).
    """

    def __init__(self, name: str, initial: Any, table: Mapping[str, tuple[StepFn, ValuesFn]],
                 reads: Iterable[str]) -> None:  # fmt: skip
        self.name = name
        self.initial = initial
        self.table = dict(table)
        self.reads = frozenset(reads)

    def init(self) -> Any:
        return self.initial

    def step(self, state: Any, f: str, input: Any, output: Any) -> tuple[bool, Any]:
        try:
            fn = self.table[f][0]
        except KeyError:
            raise ValueError(f"the {self.name} model has no operation {f!r}") from None
        return fn(state, input, output)

    def values(
        self, f: str, input: Any, output: Any
    ) -> tuple[tuple[Any, ...], tuple[Any, ...]] | None:
        entry = self.table.get(f)
        return None if entry is None else entry[1](input, output)

    def __repr__(self) -> str:
        return f"<{self.name} model>"


def _read(state: Any, _inp: Any, out: Any) -> tuple[bool, Any]:
    return out is UNKNOWN or out == state, state


def _write(_state: Any, inp: Any, _out: Any) -> tuple[bool, Any]:
    return True, inp


def _swap(state: Any, inp: Any, out: Any) -> tuple[bool, Any]:
    return out is UNKNOWN or out == state, inp


def _delete(state: Any, _inp: Any, out: Any) -> tuple[bool, Any]:
    return out is UNKNOWN or out == (state is not ABSENT), ABSENT


def _cas(state: Any, inp: Any, out: Any) -> tuple[bool, Any]:
    expected, new = inp
    match = state == expected
    return out is UNKNOWN or out == match, new if match else state


def _cad(state: Any, inp: Any, out: Any) -> tuple[bool, Any]:
    match = state == inp
    return out is UNKNOWN or out == match, ABSENT if match else state


def _setdefault(state: Any, inp: Any, out: Any) -> tuple[bool, Any]:
    result = inp if state is ABSENT else state
    return out is UNKNOWN or out == result, result


def _append(state: Any, inp: Any, _out: Any) -> tuple[bool, Any]:
    return True, state + inp


def _known(out: Any) -> tuple[Any, ...]:
    return () if out is UNKNOWN else (out,)


def _v_read(_inp: Any, out: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    return (), _known(out)


def _v_write(inp: Any, _out: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    return (inp,), ()


def _v_swap(inp: Any, out: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    return (inp,), _known(out)


def _v_delete(_inp: Any, _out: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    return (ABSENT,), ()


def _v_cas(inp: Any, out: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    expected, new = inp
    maybe, surely = out is UNKNOWN or bool(out), out is not UNKNOWN and bool(out)
    return ((new,) if maybe else ()), ((expected,) if surely else ())


def _v_cad(inp: Any, out: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    maybe, surely = out is UNKNOWN or bool(out), out is not UNKNOWN and bool(out)
    return ((ABSENT,) if maybe else ()), ((inp,) if surely else ())


def _v_setdefault(inp: Any, out: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    if out is UNKNOWN or out == inp:  # installed it, or found the same value there
        return (inp,), ()
    return (), (out,)  # found another value: it was there


def _v_none(_inp: Any, _out: Any) -> None:
    return None


#: One key of a SyncMap.  get: ``None -> value | ABSENT``; set: ``v -> None``; swap:
#: ``v -> previous | ABSENT``; delete: ``None -> existed``; cas: ``(expected, new) -> bool``;
#: cad (compare_and_delete): ``expected -> bool``; setdefault: ``v -> the value returned``.
MAP_MODEL: Final = TableModel(
    "map",
    ABSENT,
    {
        "get": (_read, _v_read),
        "set": (_write, _v_write),
        "swap": (_swap, _v_swap),
        "delete": (_delete, _v_delete),
        "cas": (_cas, _v_cas),
        "cad": (_cad, _v_cad),
        "setdefault": (_setdefault, _v_setdefault),
    },
    reads=("get",),
)

#: Jepsen's etcd register: starts at None (nil); read, write v, cas ``(old, new) -> bool``.
REGISTER_MODEL: Final = TableModel(
    "register",
    None,
    {"read": (_read, _v_read), "write": (_write, _v_write), "cas": (_cas, _v_cas)},
    reads=("read",),
)

#: Porcupine's kv histories, one key: starts at ""; put sets, append concatenates, get returns.
KV_MODEL: Final = TableModel(
    "kv",
    "",
    {"get": (_read, _v_read), "put": (_write, _v_write), "append": (_append, _v_none)},
    reads=("get",),
)


# ---- results ------------------------------------------------------------------------------------


@dataclass
class KeyResult:
    key: Any
    verdict: Verdict
    ops: int  # operations searched (after dropping unknown reads and failed mutations)
    seconds: float
    witness: str = ""
    states: int = 0  # memoised (set, state) pairs


@dataclass
class CheckResult:
    verdict: Verdict
    ops: int
    keys: int
    keys_failed: int
    keys_unknown: int
    seconds: float
    witness: str  # the first failing key's explanation (or, if none failed, the unknown keys)
    failed_keys: list[Any] = field(default_factory=list)
    unknown_keys: list[Any] = field(default_factory=list)
    per_key: list[KeyResult] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.verdict}: {self.ops} ops, {self.keys} keys ({self.keys_failed} not "
            f"linearizable, {self.keys_unknown} unknown), {self.seconds:.3f} s"
        )


# ---- the checker --------------------------------------------------------------------------------


def check(
    ops: Iterable[Operation],
    model: Model = MAP_MODEL,
    *,
    budget_s: float = 10.0,
    workers: int = 1,
    precheck: bool = True,
    max_states: int = MAX_STATES,
) -> CheckResult:
    """Check a history: split it by key, check each key, combine.

    Any key not linearizable makes the history not linearizable; otherwise any key that ran out of
    its budget (``budget_s`` seconds or ``max_states`` memoised states) makes it "unknown".
    ``workers > 1`` checks keys in that many processes.  ``precheck`` runs the O(n) pre-checks
    (see :func:`check_key`) before each search.
    """
    started = time.monotonic()
    by_key: dict[Hashable, list[Operation]] = {}
    total = 0
    for op in ops:
        total += 1
        by_key.setdefault(freeze(op.key), []).append(op)
    keys = list(by_key)
    groups = [by_key[k] for k in keys]
    results: list[KeyResult]
    if workers > 1 and len(keys) > 1:
        n = min(workers, len(keys))
        chunk = max(1, len(keys) // (n * 4))
        with ProcessPoolExecutor(max_workers=n) as pool:
            results = list(
                pool.map(
                    check_key,
                    groups,
                    repeat(model),
                    repeat(budget_s),
                    repeat(precheck),
                    repeat(max_states),
                    chunksize=chunk,
                )
            )
    else:
        results = [check_key(g, model, budget_s, precheck, max_states) for g in groups]
    failed = [r for r in results if r.verdict == "not linearizable"]
    unknown = [r for r in results if r.verdict == "unknown"]
    verdict: Verdict = "not linearizable" if failed else "unknown" if unknown else "linearizable"
    if failed:
        witness = failed[0].witness
    elif unknown:
        witness = "\n".join(r.witness for r in unknown[:10])
        if len(unknown) > 10:
            witness += f"\n... and {len(unknown) - 10} more keys"
    else:
        witness = ""
    return CheckResult(
        verdict=verdict,
        ops=total,
        keys=len(keys),
        keys_failed=len(failed),
        keys_unknown=len(unknown),
        seconds=time.monotonic() - started,
        witness=witness,
        failed_keys=[r.key for r in failed],
        unknown_keys=[r.key for r in unknown],
        per_key=results,
    )


@dataclass(slots=True)
class _Op:
    """An operation prepared for the search: frozen values, ret = +inf when indeterminate."""

    index: int  # its position among the key's operations (shown in witnesses as #index)
    orig: Operation
    f: str
    input: Hashable
    output: Hashable
    call: int
    ret: float | int


def _prepare(ops: list[Operation], model: Model) -> list[_Op]:
    reads: frozenset[str] = getattr(model, "reads", frozenset())
    kept: list[_Op] = []
    for op in ops:
        if op.ret_ns is not None and op.ret_ns < op.call_ns:
            raise ValueError(f"operation returns before it is called: {op}")
        out = op.output
        if out is FAILED or (out is UNKNOWN and op.f in reads):
            continue
        # An unknown outcome may still take effect after the client gave up: never returned.
        ret: float | int = math.inf if op.ret_ns is None or out is UNKNOWN else op.ret_ns
        kept.append(_Op(len(kept), op, op.f, freeze(op.input), freeze(out), op.call_ns, ret))
    return kept


def check_key(
    ops: list[Operation],
    model: Model = MAP_MODEL,
    budget_s: float = 10.0,
    precheck: bool = True,
    max_states: int = MAX_STATES,
) -> KeyResult:
    """Check the operations of one key (all of ``ops`` must have the same key).

    The pre-checks are O(n) and stay sound with indeterminate writes, because those count as
    possible writers: a value that is observed (a get's result, a swap's previous value, a
    successful cas's expected value...) must have been possibly written by *another* operation
    that was called no later than the observer returned, or be the initial state.  This catches a
    read of a never-written value, of a definitely-failed write, or of a write invoked after the
    read returned, without the exponential search that an invalid history otherwise needs.
    Models that cannot list the values an operation writes (kv's append) skip it.
    """
    started = time.monotonic()
    key = ops[0].key if ops else None
    prepared = _prepare(ops, model)
    if precheck:
        problem = _precheck(prepared, model)
        if problem is not None:
            return KeyResult(key, "not linearizable", len(prepared), time.monotonic() - started,
                             _header(key, prepared) + problem)  # fmt: skip
    search = _Search(prepared, model, budget_s, max_states)
    verdict = search.run()
    seconds = time.monotonic() - started
    witness = ""
    if verdict == "not linearizable":
        witness = _header(key, prepared) + search.explain()
    elif verdict == "unknown":
        witness = (
            f"key {key!r}: unknown, the search stopped after {seconds:.2f} s and "
            f"{len(search.seen)} memoised states ({search.why_stopped})"
        )
    return KeyResult(key, verdict, len(prepared), seconds, witness, len(search.seen))


def _precheck(ops: list[_Op], model: Model) -> str | None:
    values_of = getattr(model, "values", None)
    if values_of is None:
        return None
    initial = freeze(model.init())
    # value -> the two earliest (call, index) of operations that may leave it in the state
    writers: dict[Hashable, list[tuple[int, int]]] = {}
    observations: list[tuple[_Op, Hashable]] = []
    for op in ops:
        vals = values_of(op.f, op.input, op.output)
        if vals is None:
            return None
        produced, observed = vals
        for v in produced:
            best = writers.setdefault(v, [])
            best.append((op.call, op.index))
            if len(best) > 2:
                best.sort()
                del best[2:]
        observations.extend((op, v) for v in observed)
    for op, v in observations:
        if v == initial:
            continue
        earliest = [(c, i) for c, i in writers.get(v, ()) if i != op.index]
        if not earliest:
            return (
                f"{_describe(op, ops)}\n  observes {v!r}, a value that no other operation "
                "of this key could have written (a read of a never-written or failed write)\n"
            )
        call, index = min(earliest)
        if call > op.ret:
            return (
                f"{_describe(op, ops)}\n  observes {v!r}, but every operation that could write "
                f"it was called after it returned; the earliest:\n{_describe(ops[index], ops)}\n"
            )
    return None


class _Search:
    """The WGL search of TESTPLAN §2.3 over one key's prepared operations.

    Nodes of the doubly linked list: 0 is the head sentinel, ``2*i + 1`` the CALL of operation
    ``i`` and ``2*i + 2`` its RETURN; -1 is "none".
    """

    def __init__(self, ops: list[_Op], model: Model, budget_s: float, max_states: int) -> None:
        self.ops = ops
        self.model = model
        self.budget_s = budget_s
        self.max_states = max_states
        self.seen: set[tuple[int, Hashable]] = set()
        self.why_stopped = ""
        # deepest dead end: (linearized order with the state after each, blocked op index)
        self.best_depth = -1
        self.best_order: list[tuple[int, Hashable]] = []
        self.best_blocked = -1
        self.best_candidates: list[int] = []
        self.best_state: Hashable = None

    def run(self) -> Verdict:  # noqa: PLR0912, PLR0915 - one tight loop, kept in one piece for speed
        ops = self.ops
        n = len(ops)
        events = sorted(
            [(op.call, 0, 2 * op.index + 1) for op in ops]
            + [(op.ret, 1, 2 * op.index + 2) for op in ops]
        )  # CALL (0) before RETURN (1) at equal times: closed intervals
        nxt = [-1] * (2 * n + 1)
        prv = [-1] * (2 * n + 1)
        last = 0
        for _, _, node in events:
            nxt[last] = node
            prv[node] = last
            last = node
        fs = [op.f for op in ops]
        ins = [op.input for op in ops]
        outs = [op.output for op in ops]
        step = self.model.step
        seen = self.seen
        stack: list[tuple[int, Hashable]] = []  # (op index, state before it)
        state: Hashable = freeze(self.model.init())
        linearized = 0  # bitset of op indexes
        deadline = time.monotonic() + self.budget_s
        max_states = self.max_states
        iterations = 0
        e = nxt[0]
        while nxt[0] != -1:
            iterations += 1
            if not iterations & 0x3FF:
                if time.monotonic() > deadline:
                    self.why_stopped = f"budget of {self.budget_s:g} s ran out"
                    return "unknown"
                if len(seen) > max_states:
                    self.why_stopped = f"more than {max_states} states"
                    return "unknown"
            if e & 1:  # a CALL: a candidate
                i = e >> 1
                legal, s2 = step(state, fs[i], ins[i], outs[i])
                if legal:
                    lin2 = linearized | (1 << i)
                    memo = (lin2, s2)
                    if memo not in seen:
                        seen.add(memo)
                        stack.append((i, state))
                        state = s2
                        linearized = lin2
                        r = e + 1  # unlink the CALL, then its RETURN
                        nxt[prv[e]] = nxt[e]
                        if nxt[e] != -1:
                            prv[nxt[e]] = prv[e]
                        nxt[prv[r]] = nxt[r]
                        if nxt[r] != -1:
                            prv[nxt[r]] = prv[r]
                        e = nxt[0]
                        continue
                e = nxt[e]
            else:  # a RETURN: no candidate before it can go next
                if len(stack) > self.best_depth:
                    self._remember(stack, state, e, nxt)
                if not stack:
                    return "not linearizable"
                i, state = stack.pop()
                linearized &= ~(1 << i)
                c = 2 * i + 1  # relink in reverse order: the RETURN, then the CALL
                r = c + 1
                nxt[prv[r]] = r
                if nxt[r] != -1:
                    prv[nxt[r]] = r
                nxt[prv[c]] = c
                if nxt[c] != -1:
                    prv[nxt[c]] = c
                e = nxt[c]
        return "linearizable"

    def _remember(self, stack: list[tuple[int, Hashable]], state: Hashable, ret_node: int,
                  nxt: list[int]) -> None:  # fmt: skip
        """Keep the deepest dead end for the witness (only when it gets deeper: at most n times)."""
        self.best_depth = len(stack)
        after = [s for _, s in stack[1:]] + [state]
        self.best_order = [(i, s) for (i, _), s in zip(stack, after, strict=True)]
        self.best_blocked = (ret_node - 2) >> 1
        cands = []
        node = nxt[0]
        while node not in (ret_node, -1):
            if node & 1:
                cands.append(node >> 1)
            node = nxt[node]
        self.best_candidates = cands
        self.best_state = state

    def explain(self) -> str:
        ops = self.ops
        state = self.best_state
        lines = [
            f"The longest partial linearization places {len(self.best_order)} of {len(ops)} ops;"
            f" after it the state is {state!r}, and this op cannot be placed before it returns:",
            _describe(ops[self.best_blocked], ops),
            "Ops that could go next at that point (called before it returned), and why not:",
        ]
        for i in self.best_candidates:
            op = ops[i]
            legal, s2 = self.model.step(state, op.f, op.input, op.output)
            why = (f"legal (state would be {s2!r}), but that branch was already explored"
                   if legal else f"not possible in state {state!r}")  # fmt: skip
            lines.append(f"{_describe(op, ops)}   {why}")
        order = self.best_order
        shown = order[-25:]
        lines.append("The partial linearization, in order (state after each op):")
        if len(order) > len(shown):
            lines.append(f"  ... {len(order) - len(shown)} earlier ops")
        lines.extend(f"{_describe(ops[i], ops)}   -> {s!r}" for i, s in shown)
        return "\n".join(lines) + "\n"


def _header(key: Any, ops: list[_Op]) -> str:
    pending = sum(1 for op in ops if op.ret == math.inf)
    return (
        f"key {key!r}: not linearizable ({len(ops)} ops, {pending} never returned; times are "
        "relative to the key's first call, in the history's units)\n"
    )


def _describe(op: _Op, ops: list[_Op]) -> str:
    base = min(o.call for o in ops)
    ret = "never returned" if op.ret == math.inf else f"ret {int(op.ret) - base}"
    return f"  #{op.index} {describe_op(op.orig)}   [call {op.call - base}, {ret}]"


def describe_op(op: Operation) -> str:
    """``p3 cas('a', 'b') -> True`` style text for an operation."""
    if op.input is None:
        args = ""
    elif op.f == "cas" and isinstance(op.input, list | tuple) and len(op.input) == 2:
        args = f"{op.input[0]!r}, {op.input[1]!r}"
    else:
        args = repr(op.input)
    text = f"p{op.process} {op.f}({args})"
    if op.output is UNKNOWN:
        return text + " -> ?"
    if op.output is None and op.f not in ("get", "read"):
        return text
    return f"{text} -> {op.output!r}"
