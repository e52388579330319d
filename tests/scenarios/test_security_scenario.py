"""S19 security-forged-messages (TESTPLAN §8, issue 12 §3), short form: a PUBLISH-only ACL user
injects forged, tampered, replayed, old-epoch, oversized and exact-current-sequence messages
while an S04-like load runs, with a signing key and without; a malicious pickle is planted in a
value.  The guard-off controls must fail: without the digest comparison the current-sequence
forgery keeps keys stale (no key), and without the MAC check forged changes are applied (key).
``pytest -s`` prints the figures; ``syncmap torture --only S19`` runs the long form."""

from __future__ import annotations

import pytest

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
