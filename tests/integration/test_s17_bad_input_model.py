"""S17 bad-input-model: the map against a plain dict, with adversarial keys and values.

The Hypothesis state machine lives in ``syncmap.testing.scenarios_model`` (so ``syncmap torture``
runs it too): two servers' views of one map on a real redis-server; every exception must be one
of the documented types, and a refused input must leave the map unchanged everywhere.
"""

from __future__ import annotations

import sys

import pytest

from syncmap.testing.scenario import Env
from syncmap.testing.scenarios_model import MISSING_HYPOTHESIS, s17

pytestmark = pytest.mark.scenario


def test_s17_bad_input_model(redis_binary: str) -> None:
    r = s17(Env(redis_binary=redis_binary), 0)  # one batch of 25 examples
    print(f"\n{r.summary()}")
    assert r.passed, r.failures
    assert r.figures["examples"] >= 25
    assert {"InvalidKey", "KeyTypeError", "InvalidValue"} <= set(
        r.figures["exception_types"].split(",")
    )


def test_s17_without_hypothesis_fails_and_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "hypothesis", None)  # import hypothesis -> ImportError
    r = s17(Env(), 0)
    assert not r.passed
    assert r.failures == [MISSING_HYPOTHESIS]
    assert "pip install hypothesis" in MISSING_HYPOTHESIS
