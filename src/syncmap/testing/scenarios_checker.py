"""S22 checker-self-test: the linearizability checker must reach the known verdict on real and
synthetic histories before its verdicts on our own histories mean anything (TESTPLAN §2.3).

Real histories: Porcupine's test data (Jepsen etcd register logs, kv histories), whose verdicts
are known.  Synthetic histories: a simulated linearizable register (every effect applied at a
random instant inside its operation's interval, so the history is linearizable by construction),
the same with one late read changed to a never-written value (not linearizable by construction),
histories with indeterminate writes, and a hard invalid history under a tiny budget, which must
come out "unknown" and never "linearizable".

The test data is not package data (it is sizeable and the package must not depend on the test
tree): ``data_dir`` defaults to ``<repo>/tests/data`` when present, else ``../shared/testdata``
beside the checkout.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .formats import load
from .linearizability import ABSENT, MAP_MODEL, UNKNOWN, Operation, Verdict, check
from .scenario import ANOMALIES, OPS, UNKNOWN_KEYS, Env, ScenarioResult, finish, scenario, timed

__all__ = [
    "Case",
    "corrupt_late_read",
    "default_data_dir",
    "indeterminate_cases",
    "real_cases",
    "run_case",
    "s22",
    "simulate_register",
    "synthetic_cases",
]


# ---- a simulated linearizable register ----------------------------------------------------------


def simulate_register(
    n_ops: int = 200,
    clients: int = 4,
    values: int | None = 5,
    crash_rate: float = 0.0,
    seed: int = 0,
    key: Any = "k",
) -> list[Operation]:
    """A linearizable single-key map history (MAP_MODEL) by construction.

    Each client runs operations one after another with random think times and durations, the mix
    of TESTPLAN §2.5 (get 50 %, set 30 %, cas 10 %, delete 10 %).  Each operation takes effect at a
    uniformly random instant inside its interval, and outputs are computed by applying the effects
    in that order.  ``values``: how many distinct values writes choose from (None: every write
    unique).  ``crash_rate``: the share of mutations that time out.  Those are recorded as
    indeterminate (output UNKNOWN, never returned); half of them take effect, half never do.  The
    client then continues as a new process, as Knossos requires.
    """
    rng = random.Random(seed)
    planned: list[tuple[float, int, dict[str, Any]]] = []  # (effect time, seq, op fields)
    seq = 0
    per_client = [n_ops // clients + (1 if c < n_ops % clients else 0) for c in range(clients)]
    for client, count in enumerate(per_client):
        t = rng.randrange(0, 1_000)
        generation = 0
        for _ in range(count):
            call = t + rng.randrange(0, 300)
            ret = call + rng.randrange(50, 3_000)
            r = rng.random()
            f = "get" if r < 0.5 else "set" if r < 0.8 else "cas" if r < 0.9 else "delete"
            v = f"v{rng.randrange(values)}" if values else f"{client}-{seq}"
            inp: Any = {"get": None, "set": v, "delete": None}.get(f)
            if f == "cas":
                inp = (None, v)  # the expected value is chosen below, when it takes effect
            crashed = f != "get" and rng.random() < crash_rate
            effect = rng.uniform(call, ret) if not crashed or rng.random() < 0.5 else float("inf")
            fields = {"process": f"{client}.{generation}", "f": f, "input": inp,
                      "call": call, "ret": None if crashed else ret}  # fmt: skip
            planned.append((effect, seq, fields))
            seq += 1
            if crashed:
                generation += 1
            t = ret
    planned.sort(key=lambda p: (p[0], p[1]))
    state: Any = ABSENT
    ops: list[tuple[int, Operation]] = []
    for effect, s, fl in planned:
        f, inp = fl["f"], fl["input"]
        if f == "cas":  # half the time the value it will find, so that some succeed
            other = f"v{rng.randrange(values)}" if values else "nope"
            inp = (state if rng.random() < 0.5 and state is not ABSENT else other, inp[1])
        if effect == float("inf"):
            out: Any = UNKNOWN
        else:
            out = state if f == "get" else None
            if f == "delete":
                out, state = state is not ABSENT, ABSENT
            elif f == "set":
                state = inp
            elif f == "cas":
                out = state == inp[0]
                state = inp[1] if out else state
        if fl["ret"] is None:
            out = UNKNOWN
        ops.append((s, Operation(fl["process"], key, f, inp, out, fl["call"], fl["ret"])))
    ops.sort(key=lambda p: p[0])
    return [op for _, op in ops]


def corrupt_late_read(ops: list[Operation], value: Any = "never-written") -> list[Operation]:
    """The same history with its last completed get (by call time) returning ``value``."""
    gets = [i for i, op in enumerate(ops) if op.f == "get" and op.output is not UNKNOWN]
    if not gets:
        raise ValueError("the history has no completed get to corrupt")
    last = max(gets, key=lambda i: ops[i].call_ns)
    out = list(ops)
    out[last] = replace(ops[last], output=value)
    return out


def _op(p: Any, f: str, inp: Any, out: Any, call: int, ret: int | None) -> Operation:
    return Operation(p, "k", f, inp, out, call, ret)


def indeterminate_cases() -> dict[str, tuple[list[Operation], Verdict]]:
    """Small hand-made histories with an indeterminate write, and their verdicts."""
    w1 = _op(1, "set", "a", None, 0, 10)
    w2 = _op(2, "set", "b", UNKNOWN, 20, None)  # timed out: may land at any time after 20
    return {
        "takes effect much later": ([w1, w2, _op(3, "get", None, "a", 100, 110),
                                     _op(3, "get", None, "b", 1_000, 1_010)], "linearizable"),
        "never takes effect": ([w1, w2, _op(3, "get", None, "a", 1_000, 1_010)], "linearizable"),
        "seen, then gone": ([w1, w2, _op(3, "get", None, "b", 100, 110),
                             _op(3, "get", None, "a", 200, 210)], "not linearizable"),
        "read before it was sent": ([w1, _op(3, "get", None, "b", 12, 15), w2],
                                    "not linearizable"),
        "unknown cas": ([w1, _op(2, "cas", ("a", "c"), UNKNOWN, 20, None),
                         _op(3, "get", None, "c", 50, 60), _op(3, "delete", None, True, 70, 80),
                         _op(3, "get", None, ABSENT, 90, 95)], "linearizable"),
        "unknown read dropped": ([w1, _op(4, "get", None, UNKNOWN, 5, None),
                                  _op(3, "get", None, "a", 50, 60)], "linearizable"),
    }  # fmt: skip


# ---- cases --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One history to check and the verdict it must get.  ``source`` is a file path or the
    keyword arguments of :func:`simulate_register` (plus ``corrupt``) or an indeterminate case."""

    name: str
    expected: Verdict
    path: str | None = None
    synth: tuple[tuple[str, Any], ...] = ()
    precheck: bool = True
    budget_s: float = 10.0


def default_data_dir() -> Path | None:
    """``<repo>/tests/data`` if it exists, else ``../shared/testdata`` beside the repo (or the
    current directory), else None."""
    repo = Path(__file__).resolve().parents[3]
    for base in (repo, Path.cwd()):
        for cand in (base / "tests" / "data", base.parent / "shared" / "testdata"):
            if (cand / "jepsen-etcd" / "EXPECTED.txt").is_file():
                return cand
    return None


def real_cases(data_dir: Path) -> list[Case]:
    """Every etcd log (verdicts from ``EXPECTED.txt``) and every kv file (``-ok`` / ``-bad``)."""
    cases = []
    expected = (data_dir / "jepsen-etcd" / "EXPECTED.txt").read_text(encoding="utf-8")
    for line in expected.splitlines():
        if line.strip():
            name, verdict = line.split()
            v: Verdict = "linearizable" if verdict == "linearizable" else "not linearizable"
            cases.append(Case(f"jepsen-etcd/{name}", v, str(data_dir / "jepsen-etcd" / name)))
    for path in sorted((data_dir / "kv").glob("*.txt")):
        v = "linearizable" if path.stem.endswith("-ok") else "not linearizable"
        cases.append(Case(f"kv/{path.name}", v, str(path)))
    return cases


def synthetic_cases() -> list[Case]:
    """Simulated registers (TESTPLAN §2.5 shapes kept small), indeterminate cases, a budget case."""

    def sim(name: str, expected: Verdict, precheck: bool = True, budget_s: float = 10.0,
            **kw: Any) -> Case:  # fmt: skip
        return Case(f"synthetic/{name}", expected, synth=tuple(sorted(kw.items())),
                    precheck=precheck, budget_s=budget_s)  # fmt: skip

    cases = [
        sim("register-8c-200", "linearizable", n_ops=200, clients=8, seed=1),
        sim("register-8c-200-late-read", "not linearizable", n_ops=200, clients=8, seed=1,
            corrupt=True),
        sim("register-8c-200-late-read-search", "not linearizable", precheck=False, n_ops=200,
            clients=8, seed=1, corrupt=True),
        sim("register-12c-300-unique", "linearizable", n_ops=300, clients=12, values=None,
            seed=2),
        sim("register-12c-300-unique-late-read", "not linearizable", precheck=False,
            n_ops=300, clients=12, values=None, seed=2, corrupt=True),
        sim("crashes-4c-200", "linearizable", n_ops=200, clients=4, crash_rate=0.05, seed=3),
        sim("crashes-4c-200-late-read", "not linearizable", precheck=False, n_ops=200,
            clients=4, crash_rate=0.05, seed=3, corrupt=True),
        sim("many-keys-4c", "linearizable", n_ops=100, clients=4, seed=4, keys=20),
        sim("many-keys-4c-one-late-read", "not linearizable", n_ops=100, clients=4, seed=4,
            keys=20, corrupt=True),
        # 16 clients on one key, invalid, no pre-check: far beyond 0.2 s (TESTPLAN §2.5: > 20 s).
        sim("budget-16c-200-late-read", "unknown", precheck=False, budget_s=0.2, n_ops=200,
            clients=16, seed=5, corrupt=True),
    ]  # fmt: skip
    cases += [Case(f"indeterminate/{name}", v, synth=(("indeterminate", name),))
              for name, (_, v) in indeterminate_cases().items()]  # fmt: skip
    return cases


def case_history(case: Case) -> tuple[list[Operation], Any]:
    """The operations and model of a case."""
    if case.path is not None:
        return load(case.path)
    kw = dict(case.synth)
    if "indeterminate" in kw:
        return indeterminate_cases()[kw["indeterminate"]][0], MAP_MODEL
    corrupt = kw.pop("corrupt", False)
    keys = kw.pop("keys", 1)
    seed = kw.pop("seed", 0)
    ops: list[Operation] = []
    for k in range(keys):
        hist = simulate_register(**kw, seed=seed * 1000 + k, key=f"k{k}")
        if corrupt and k == keys // 2:
            hist = corrupt_late_read(hist)
        ops += hist
    return ops, MAP_MODEL


@dataclass(frozen=True)
class CaseResult:
    case: Case
    verdict: Verdict
    ops: int
    seconds: float  # checker time (parsing excluded)
    keys_unknown: int
    witness: str

    @property
    def agrees(self) -> bool:
        return self.verdict == self.case.expected


def run_case(case: Case) -> CaseResult:
    ops, model = case_history(case)
    r = check(ops, model, budget_s=case.budget_s, precheck=case.precheck)
    return CaseResult(case, r.verdict, r.ops, r.seconds, r.keys_unknown, r.witness)


def run_cases(cases: list[Case], workers: int = 2) -> Iterator[CaseResult]:
    if workers > 1 and len(cases) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            yield from pool.map(run_case, cases)
    else:
        yield from map(run_case, cases)


# ---- the scenario -------------------------------------------------------------------------------


@scenario("S22", "checker-self-test", faults_server=False)
def s22(env: Env, seconds: float, **options: Any) -> ScenarioResult:
    """Every known verdict reached (must 0 disagreements), the budget case "unknown".

    Options: ``data_dir`` (default: :func:`default_data_dir`), ``workers`` (processes, default 2),
    ``synthetic`` (default True), ``log`` (a callable given one line per disagreement).  Needs no
    Redis; ``seconds`` is not used (the run takes as long as the histories need: a few seconds).
    """
    result, started = timed("S22", "checker-self-test")
    log: Callable[[str], None] = options.get("log") or (lambda _line: None)
    data_dir = options.get("data_dir")
    data = Path(data_dir) if data_dir is not None else default_data_dir()
    if data is None or not (data / "jepsen-etcd" / "EXPECTED.txt").is_file():
        result.require(False, f"test data not found ({data or 'tests/data, ../shared/testdata'})")
        return finish(result, started)
    cases = real_cases(data)
    if options.get("synthetic", True):
        cases += synthetic_cases()
    agree = disagree = unknown = ops = 0
    checker_s = 0.0
    slowest: CaseResult | None = None
    for r in run_cases(cases, int(options.get("workers", 2))):
        ops += r.ops
        checker_s += r.seconds
        if slowest is None or r.seconds > slowest.seconds:
            slowest = r
        if r.agrees:
            agree += 1
        elif r.verdict == "unknown":
            unknown += 1
            log(f"{r.case.name}: unknown, expected {r.case.expected}")
        else:
            disagree += 1
            log(f"{r.case.name}: {r.verdict}, expected {r.case.expected}\n{r.witness}")
    result.figures.update({
        "histories": len(cases), "agree": agree, "disagree": disagree, "unknown": unknown,
        "checker_seconds": round(checker_s, 3), OPS: ops, ANOMALIES: disagree,
        UNKNOWN_KEYS: unknown,
        "slowest": f"{slowest.case.name} {slowest.seconds:.3f} s" if slowest else "",
    })  # fmt: skip
    result.require(disagree == 0, f"{disagree} histories got the wrong verdict (must 0)")
    result.require(unknown == 0, f"{unknown} histories ran out of budget (must 0)")
    return finish(result, started)
