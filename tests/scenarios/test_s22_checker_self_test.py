"""S22 checker-self-test (TESTPLAN §2.3): the linearizability checker reaches the known verdict on
every real history of ``tests/data`` (Jepsen etcd logs, Porcupine's kv histories) and on synthetic
ones: a simulated linearizable register, the same with a late read of a never-written value,
indeterminate writes, and a hard history under a tiny budget ("unknown", never "linearizable").
``pytest -s`` prints the figures.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from syncmap.testing.linearizability import check
from syncmap.testing.scenario import REGISTRY, Env
from syncmap.testing.scenarios_checker import (
    corrupt_late_read,
    indeterminate_cases,
    real_cases,
    run_cases,
    s22,
    simulate_register,
)

pytestmark = pytest.mark.scenario
DATA = Path(__file__).resolve().parents[1] / "data"


def test_every_real_history_reaches_its_known_verdict() -> None:
    cases = real_cases(DATA)
    assert len([c for c in cases if c.name.startswith("jepsen-etcd/")]) == 69
    assert len([c for c in cases if c.name.startswith("kv/")]) == 4
    results = list(run_cases(cases, workers=2))
    wrong = [r for r in results if not r.agrees]
    slowest = max(results, key=lambda r: r.seconds)
    total = sum(r.seconds for r in results)
    print(
        f"\nS22 real histories: {len(results)} checked, agree={len(results) - len(wrong)} "
        f"disagree={sum(r.verdict != 'unknown' for r in wrong)} "
        f"unknown={sum(r.verdict == 'unknown' for r in wrong)} checker={total:.2f} s "
        f"(slowest {slowest.case.name} {slowest.seconds:.3f} s)"
    )
    for r in wrong:
        print(f"  {r.case.name}: {r.verdict}, expected {r.case.expected}\n{r.witness}")
    assert not wrong, [r.case.name for r in wrong]


@pytest.mark.parametrize(("clients", "values"), [(4, 5), (8, 5), (12, None)])
def test_simulated_register_is_linearizable_and_a_late_read_is_not(
    clients: int, values: int | None
) -> None:
    ops = simulate_register(300, clients, values=values, seed=clients)
    valid = check(ops, budget_s=10)
    bad_ops = corrupt_late_read(ops)
    caught = check(bad_ops, budget_s=10)
    searched = check(bad_ops, budget_s=10, precheck=False)  # the search alone must find it too
    print(
        f"\nS22 simulated register {clients} clients, values={values}: valid "
        f"{valid.verdict} {valid.seconds:.3f} s; late read: pre-check {caught.verdict} "
        f"{caught.seconds:.4f} s, search {searched.verdict} {searched.seconds:.3f} s"
    )
    assert valid.verdict == "linearizable"
    assert caught.verdict == "not linearizable"
    assert "observes 'never-written'" in caught.witness
    assert searched.verdict == "not linearizable"
    assert "get() -> 'never-written'" in searched.witness


def test_indeterminate_writes() -> None:
    for name, (ops, expected) in indeterminate_cases().items():
        assert check(ops).verdict == expected, name
        assert check(ops, precheck=False).verdict == expected, name
    # Crashed mutations (5 %) stay pending forever: still linearizable, and a late read of a
    # never-written value is still found by the search.
    ops = simulate_register(200, 4, crash_rate=0.05, seed=11)
    crashed = sum(op.ret_ns is None for op in ops)
    valid = check(ops)
    invalid = check(corrupt_late_read(ops), precheck=False)
    print(
        f"\nS22 indeterminate: {crashed} crashed mutations; valid {valid.verdict} "
        f"{valid.seconds:.3f} s, late read {invalid.verdict} {invalid.seconds:.3f} s"
    )
    assert crashed >= 3
    assert valid.verdict == "linearizable"
    assert invalid.verdict == "not linearizable"


def test_budget_exhaustion_is_unknown_never_linearizable() -> None:
    """16 clients on one key, invalid, no pre-check: TESTPLAN §2.5 measured > 20 s.  With 0.2 s
    the answer must be "unknown", and it must come back about when the budget ends."""
    hard = corrupt_late_read(simulate_register(200, 16, seed=5))
    result = check(hard, budget_s=0.2, precheck=False)
    print(f"\nS22 budget: {result.verdict} after {result.seconds:.3f} s: {result.witness}")
    assert result.verdict == "unknown"
    assert result.keys_unknown == 1
    assert result.seconds < 1.5
    # The same key next to a valid one: the map's verdict is still unknown, not linearizable.
    mixed = check(hard + simulate_register(100, 4, seed=6, key="other"), budget_s=0.2,
                  precheck=False)  # fmt: skip
    assert (mixed.verdict, mixed.keys, mixed.keys_unknown, mixed.unknown_keys) == (
        "unknown", 2, 1, ["k"])  # fmt: skip


def test_s22_scenario() -> None:
    assert REGISTRY["S22"].run is s22
    assert REGISTRY["S22"].faults_server is False
    lines: list[str] = []
    result = s22(Env(), 0, data_dir=DATA, workers=2, log=lines.append)
    print(f"\n{result.summary()}")
    for line in lines:
        print(line)
    assert result.passed, result.failures
    f = result.figures
    assert f["disagree"] == 0 and f["anomalies"] == 0 and f["unknown"] == 0
    assert f["agree"] == f["histories"] >= 73 + 10
    assert f["ops"] > 10_000


def test_s22_without_test_data_fails_clearly(tmp_path: Path) -> None:
    result = s22(Env(), 0, data_dir=tmp_path)
    assert not result.passed
    assert result.failures[0].startswith("test data not found")
