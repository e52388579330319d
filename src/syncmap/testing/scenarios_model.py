"""S17 bad-input-model (TESTPLAN §8): the map against a plain dict, with adversarial keys and
values, as a Hypothesis ``RuleBasedStateMachine``; registered for tests and ``syncmap torture``.

Two servers' views of one map on a private redis-server.  Every exception must be one of the
documented types, and a refused input must leave the map unchanged everywhere.

Hypothesis is imported only when the scenario runs: without it the scenario fails with a message
saying how to install it, instead of pretending to pass.  It runs batches of 25 examples (30
steps each, no example database) until ``seconds`` are used, at least one batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..config import MapConfig
from ..errors import InvalidKey, InvalidValue, KeyTypeError
from ..map import SyncMap
from .scenario import ANOMALIES, OPS, Env, ScenarioResult, finish, scenario, timed

MISSING_HYPOTHESIS = "hypothesis is not installed: pip install hypothesis"
BATCH = 25
STEPS = 30


@dataclass(slots=True)
class _Stats:
    examples: int = 0
    steps: int = 0
    errors: set[str] = field(default_factory=set)
    largest_value: int = 0


def normal(value: Any) -> Any:
    """What a value reads back as (MessagePack turns tuples and sets into lists)."""
    return msgspec.msgpack.decode(msgspec.msgpack.encode(value))


def _refused(stats: _Stats, types: tuple[type[Exception], ...], fn: Callable[[], object],
             match: str = "") -> None:  # fmt: skip
    """``fn()`` must raise one of ``types`` (whose message contains ``match``)."""
    try:
        fn()
    except types as exc:
        if match not in str(exc):
            raise AssertionError(f"{type(exc).__name__}({exc}) does not mention {match!r}") from exc
        stats.errors.add(type(exc).__name__)
        return
    raise AssertionError(f"expected one of {[t.__name__ for t in types]}, nothing was raised")


def _machine(url: str, stats: _Stats) -> Any:
    """The state machine class, built on first use so hypothesis is imported only then."""
    from hypothesis import strategies as st  # noqa: PLC0415 - lazy: an optional dependency
    from hypothesis.stateful import (  # noqa: PLC0415
        RuleBasedStateMachine,
        invariant,
        precondition,
        rule,
    )

    # Keys: the traps of TESTPLAN §6.1 that are legal keys, and values that round-trip.
    good_keys = st.one_of(
        st.text(max_size=12),
        st.sampled_from(["", "\x00", ":", "*", "?", "[", "sm:{x}:d", "é", "e\u0301", "1"]),
        st.binary(max_size=12),
        st.integers(min_value=-(2**80), max_value=2**80),
    )
    bad_keys = st.one_of(
        st.floats(allow_nan=True),
        st.none(),
        st.booleans(),
        st.tuples(st.integers()),
        st.just("\ud800"),
        st.lists(st.integers(), max_size=2),
    )
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
        st.floats(allow_nan=False),
        st.text(max_size=20),
        st.binary(max_size=20),
    )
    good_values = st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)
        ),
        max_leaves=12,
    )
    bad_values = st.one_of(
        st.integers(min_value=2**64),
        st.builds(object),
        st.just(complex(1, 2)),
    )

    def handled(value: Any) -> Any:
        stats.largest_value = max(stats.largest_value, len(msgspec.msgpack.encode(value)))
        return normal(value)

    class MapVersusDict(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            stats.examples += 1
            name = f"s17-{stats.examples}"
            cfg = MapConfig(capacity=8, max_value_bytes=4096)
            self.a = SyncMap(name, url, config=cfg)
            self.b = SyncMap(name, url, config=cfg)
            self.model: dict[Any, Any] = {}
            self.checks = 0

        def teardown(self) -> None:
            self.a.close()
            self.b.close()

        @rule(key=good_keys, value=good_values)
        def set(self, key: Any, value: Any) -> None:
            stats.steps += 1
            self.a[key] = value
            self.model[key] = handled(value)

        @rule(key=good_keys)
        def get_on_writer(self, key: Any) -> None:
            stats.steps += 1
            assert self.a.get(key, "<absent>") == self.model.get(key, "<absent>")

        @rule(key=good_keys)
        def get_on_other_server(self, key: Any) -> None:
            stats.steps += 1
            assert self.b.get(key, "<absent>", consistent=True) == self.model.get(key, "<absent>")

        @rule(key=good_keys)
        def pop(self, key: Any) -> None:
            stats.steps += 1
            assert self.a.pop(key, "<absent>") == self.model.pop(key, "<absent>")

        @rule(key=good_keys, value=good_values)
        def setdefault(self, key: Any, value: Any) -> None:
            stats.steps += 1
            expected = normal(self.model.setdefault(key, handled(value)))
            assert self.b.setdefault(key, value) == expected

        @rule(key=good_keys, value=good_values)
        def swap(self, key: Any, value: Any) -> None:
            stats.steps += 1
            assert self.a.swap(key, value, "<absent>") == self.model.get(key, "<absent>")
            self.model[key] = handled(value)

        @rule(key=good_keys, expected=good_values, new=good_values)
        def compare_and_set(self, key: Any, expected: Any, new: Any) -> None:
            stats.steps += 1
            hit = key in self.model and self.model[key] == normal(expected)
            assert self.b.compare_and_set(key, expected, new) == hit
            if hit:
                self.model[key] = handled(new)

        @rule(items=st.dictionaries(good_keys, good_values, max_size=6))
        def update(self, items: dict[Any, Any]) -> None:
            stats.steps += 1
            self.a.update(items)
            self.model.update({k: handled(v) for k, v in items.items()})

        @precondition(lambda self: len(self.model) > 20)
        @rule()
        def clear(self) -> None:
            stats.steps += 1
            self.b.clear()
            self.model.clear()

        @rule(key=bad_keys, value=good_values)
        def bad_key(self, key: Any, value: Any) -> None:
            stats.steps += 1
            _refused(stats, (KeyTypeError, InvalidKey), lambda: self.a.__setitem__(key, value))

        @rule(key=good_keys, value=bad_values)
        def bad_value(self, key: Any, value: Any) -> None:
            stats.steps += 1
            _refused(stats, (InvalidValue,), lambda: self.a.__setitem__(key, value))

        @rule(key=good_keys)
        def oversized_value(self, key: Any) -> None:
            stats.steps += 1
            big = "x" * 5000
            _refused(stats, (InvalidValue,), lambda: self.b.__setitem__(key, big),
                     "max_value_bytes")  # fmt: skip

        @invariant()
        def whole_map_matches(self) -> None:
            # A full comparison costs a round trip per bucket: every third step of an example.
            # Counted per example, not across examples: Hypothesis replays an example and must
            # see it behave the same (a global count made its generation "flaky").
            self.checks += 1
            if self.checks % 3 == 0:
                snapshot = self.b.copy()  # one read of every bucket: exact, unlike a cached read
                assert snapshot == self.model
                # len() may answer from a count within max_staleness (docs/dict.md): a change
                # the other map made a moment ago may not be in it yet, so compare the snapshot.
                assert len(snapshot) == len(self.model)

    return MapVersusDict


def _falsified(exc: BaseException, report: list[str]) -> str:
    """The failure(s) with Hypothesis's falsifying steps (its notes, or what it reported)."""
    parts = []
    for e in exc.exceptions if isinstance(exc, BaseExceptionGroup) else (exc,):
        notes = [n for n in getattr(e, "__notes__", []) if n.strip()]
        parts.append(f"{type(e).__name__}: {e}" + "".join(f"\n  {n}" for n in notes[:40]))
    parts += [line for line in report if line.strip()][:40]
    return "\n".join(parts)[:6000]


@scenario("S17", "bad-input-model")
def s17(env: Env, seconds: float = 0.0) -> ScenarioResult:
    """Batches of 25 examples until ``seconds`` are used (at least one batch)."""
    result, started = timed("S17", "bad-input-model")
    try:
        from hypothesis import HealthCheck, settings  # noqa: PLC0415 - lazy: optional
        from hypothesis.reporting import with_reporter  # noqa: PLC0415
        from hypothesis.stateful import run_state_machine_as_test  # noqa: PLC0415
    except ImportError:
        result.require(False, MISSING_HYPOTHESIS)
        return finish(result, started)
    stats = _Stats()
    batches = 0
    with env.server() as server:
        machine = _machine(server.url, stats)
        config = settings(
            max_examples=BATCH,
            stateful_step_count=STEPS,
            deadline=None,
            database=None,  # no .hypothesis directory in the user's working directory
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        end = time.monotonic() + seconds
        report: list[str] = []  # Hypothesis's report (the falsifying steps), not printed
        while True:
            batches += 1
            try:
                with with_reporter(lambda text: report.append(str(text))):
                    run_state_machine_as_test(machine, settings=config)
            except Exception as exc:
                result.require(False, f"falsified: {_falsified(exc, report)}")
                break
            if time.monotonic() >= end:
                break
    f = result.figures
    f[OPS] = stats.steps
    f[ANOMALIES] = len(result.failures)
    f["examples"] = stats.examples
    f["batches"] = batches
    f["exception_types"] = ",".join(sorted(stats.errors))
    f["largest_value_bytes"] = stats.largest_value
    return finish(result, started)


__all__ = ["MISSING_HYPOTHESIS", "normal", "s17"]
