"""S17 bad-input-model: the map against a plain dict, with adversarial keys and values.

Two servers' views of one map on a real redis-server.  Every exception must be one of the
documented types, and a refused input must leave the map unchanged everywhere.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from syncmap import InvalidKey, InvalidValue, KeyTypeError, MapConfig, SyncMap
from syncmap.embedded import EmbeddedRedis

pytestmark = pytest.mark.scenario

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


def normal(value: Any) -> Any:
    """What a value reads back as (MessagePack turns tuples and sets into lists)."""
    return msgspec.msgpack.decode(msgspec.msgpack.encode(value))


class MapVersusDict(RuleBasedStateMachine):
    url = ""
    counter = 0

    def __init__(self) -> None:
        super().__init__()
        MapVersusDict.counter += 1
        name = f"s17-{MapVersusDict.counter}"
        cfg = MapConfig(capacity=8, max_value_bytes=4096)
        self.a = SyncMap(name, self.url, config=cfg)
        self.b = SyncMap(name, self.url, config=cfg)
        self.model: dict[Any, Any] = {}

    def teardown(self) -> None:
        self.a.close()
        self.b.close()

    @rule(key=good_keys, value=good_values)
    def set(self, key: Any, value: Any) -> None:
        self.a[key] = value
        self.model[key] = normal(value)

    @rule(key=good_keys)
    def get_on_writer(self, key: Any) -> None:
        assert self.a.get(key, "<absent>") == self.model.get(key, "<absent>")

    @rule(key=good_keys)
    def get_on_other_server(self, key: Any) -> None:
        assert self.b.get(key, "<absent>", consistent=True) == self.model.get(key, "<absent>")

    @rule(key=good_keys)
    def pop(self, key: Any) -> None:
        assert self.a.pop(key, "<absent>") == self.model.pop(key, "<absent>")

    @rule(key=good_keys, value=good_values)
    def setdefault(self, key: Any, value: Any) -> None:
        assert self.b.setdefault(key, value) == normal(self.model.setdefault(key, normal(value)))

    @rule(key=good_keys, value=good_values)
    def swap(self, key: Any, value: Any) -> None:
        assert self.a.swap(key, value, "<absent>") == self.model.get(key, "<absent>")
        self.model[key] = normal(value)

    @rule(key=good_keys, expected=good_values, new=good_values)
    def compare_and_set(self, key: Any, expected: Any, new: Any) -> None:
        hit = key in self.model and self.model[key] == normal(expected)
        assert self.b.compare_and_set(key, expected, new) == hit
        if hit:
            self.model[key] = normal(new)

    @rule(items=st.dictionaries(good_keys, good_values, max_size=6))
    def update(self, items: dict[Any, Any]) -> None:
        self.a.update(items)
        self.model.update({k: normal(v) for k, v in items.items()})

    @precondition(lambda self: len(self.model) > 20)
    @rule()
    def clear(self) -> None:
        self.b.clear()
        self.model.clear()

    @rule(key=bad_keys, value=good_values)
    def bad_key(self, key: Any, value: Any) -> None:
        with pytest.raises((KeyTypeError, InvalidKey)):
            self.a[key] = value

    @rule(key=good_keys, value=bad_values)
    def bad_value(self, key: Any, value: Any) -> None:
        with pytest.raises(InvalidValue):
            self.a[key] = value

    @rule(key=good_keys)
    def oversized_value(self, key: Any) -> None:
        with pytest.raises(InvalidValue, match="max_value_bytes"):
            self.b[key] = "x" * 5000

    @invariant()
    def whole_map_matches(self) -> None:
        if MapVersusDict.counter % 3 == 0:  # a full comparison costs a round trip per bucket
            assert dict(self.b.items()) == self.model
            assert len(self.a) == len(self.model)


def test_s17_bad_input_model(redis_server: EmbeddedRedis) -> None:
    MapVersusDict.url = redis_server.url
    run_state_machine_as_test(
        MapVersusDict,
        settings=settings(
            max_examples=25,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )
