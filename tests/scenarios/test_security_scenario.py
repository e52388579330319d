"""S19 security-forged-messages (TESTPLAN §8, issue 12 §3), short form: a PUBLISH-only ACL user
injects forged, tampered, replayed, old-epoch, oversized and exact-current-sequence messages
while an S04-like load runs, with a signing key and without; a malicious pickle is planted in a
value.  The guard-off controls must fail: without the digest comparison the current-sequence
forgery keeps keys stale (no key), and without the MAC check forged changes are applied (key).
``pytest -s`` prints the figures; ``syncmap torture --only S19`` runs the long form."""

from __future__ import annotations

import os
from typing import Any

import pytest

from syncmap.core.nearcache import Guards
from syncmap.testing import scenarios_security
from syncmap.testing.scenario import Env
from syncmap.testing.scenarios_security import CONTROLS, KINDS, s19

pytestmark = pytest.mark.scenario


@pytest.fixture
def env(redis_binary: str) -> Env:
    return Env(redis_binary=redis_binary)


def test_s19_forged_messages_change_nothing_they_must_not(env: Env) -> None:
    r = s19(env, 5.0)
    print(f"\n{r.summary()}")
    for label in ("key", "no_key"):
        run = r.figures["runs"][label]
        assert set(run["injected"]) == set(KINDS)
        assert run["ops"] > 0 and run["write_errors"] == 0
    assert r.figures["runs"]["key"]["dropped"]["forged_messages"] > 0
    assert r.figures["forged_accepted_without_key"] > 0, "without a key forgeries do apply"
    assert r.passed, r.failures


@pytest.mark.parametrize("control", sorted(CONTROLS))
def test_s19_guard_off_control_fails(env: Env, control: str) -> None:
    r = s19(env, 2.5, control=control)
    print(f"\n{r.summary()}")
    figure = CONTROLS[control][2]
    assert r.figures[f"control_{control}"][figure] > 0, "the oracle caught nothing"
    assert not r.passed


@pytest.mark.parametrize("oracle_told", [True, False], ids=["deletion_known", "control"])
def test_s19_harness_deletion_is_not_staleness(
    env: Env, monkeypatch: pytest.MonkeyPatch, oracle_told: bool
) -> None:
    """The harness deletes ``work[0]``'s bucket (the old-epoch messages' source) before the load
    starts: until the writer writes those keys again, "absent" is the right answer.  Here the
    load starts 2Δ after the deletion (as when the observer missed a message and the harness
    waited its full 5 s for it), so the first reads of ``work[0]`` find it absent while its last
    acknowledged write is older than Δ.  The oracle must not count them as stale (S19 failed
    so in 4 key runs of about 70: 197-2,711 reads each, absent markers answering at hit speed).
    Control: the oracle not told of the deletion (its acknowledgements put back) counts them."""
    real = scenarios_security._old_epoch_messages

    class Unforgetting(dict[str, Any]):
        def pop(self, *args: Any) -> Any:  # the oracle keeps the deleted keys' acknowledgements
            return None

    def late(run: Any) -> None:
        if not oracle_told:
            run.acked = Unforgetting(run.acked)
        real(run)
        run.stop.wait(2 * scenarios_security.DELTA)  # fault schedule: the load starts late

    monkeypatch.setattr(scenarios_security, "_old_epoch_messages", late)
    key = os.urandom(32)
    with scenarios_security._standalone(env, key) as target:
        figures = scenarios_security.attack(target, 1.0, key, Guards())
    print(f"\noracle_told={oracle_told}: {figures[scenarios_security.STALE]} stale reads")
    if oracle_told:
        assert figures[scenarios_security.STALE] == 0
    else:
        assert figures[scenarios_security.STALE] > 0, "the oracle caught nothing"
