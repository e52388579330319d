"""S18 codec-and-message-fuzz: the decoders of bytes from the store and the feed let only our own
errors escape, and never hang (time-boxed: a few seconds in all)."""

from __future__ import annotations

import struct
import sys

import pytest

from syncmap.core.wire import decode_message
from syncmap.testing.scenario import Env
from syncmap.testing.scenarios_fuzz import MISSING_HYPOTHESIS, s18


def test_s18_decoders_raise_only_syncmap_errors() -> None:
    r = s18(Env(), 6.0)
    print(f"\n{r.summary()}")
    assert r.passed, r.failures
    assert r.figures["crashes"] == 0
    assert r.figures["examples"] >= 6 * 200
    assert r.figures["accepted"] > 0 and r.figures["refused"] > 0


def test_s18_catches_a_decoder_that_leaks_a_raw_error() -> None:
    """The control: a decoder as wire.py's was before it wrapped struct errors."""

    def leaky(data: bytes) -> object:
        struct.unpack_from(">2sBB", data)  # struct.error on short input
        return decode_message(data)

    r = s18(Env(), 0.0, only={"leaky": leaky})
    assert not r.passed
    assert "struct.error" in r.failures[0] or "error" in r.failures[0]
    assert r.figures["crashes"] == 1


def test_s18_without_hypothesis_fails_and_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    r = s18(Env(), 0)
    assert r.failures == [MISSING_HYPOTHESIS]
