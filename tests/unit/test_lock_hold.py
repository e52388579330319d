"""The hold's lease bookkeeping (lock/lease.py), driven by a fake clock: no Redis, no threads."""

from __future__ import annotations

import pytest

from syncmap import Fence, LockLost, StoreUnavailable
from syncmap.lock.lease import Hold, drift


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(clock: Clock, renew: object) -> tuple[Hold, list[LockLost], list[str]]:
    lost: list[LockLost] = []
    abandoned: list[str] = []

    def do_renew() -> bool:
        if isinstance(renew, Exception):
            raise renew
        return bool(renew() if callable(renew) else renew)

    hold = Hold("lock 'x' (owner o)", 3.0, clock(), do_renew, lambda: abandoned.append("x"),
                lost.append, clock)  # fmt: skip
    return hold, lost, abandoned


def test_a_renewal_extends_from_its_send_time() -> None:
    clock = Clock()
    hold, lost, _ = make(clock, True)
    assert hold.valid_until == 100.0 + 3.0 - drift(3.0)
    clock.now = 101.0
    assert hold.tick() == 102.0  # next renewal a third of the lease later
    assert hold.valid_until == 101.0 + 3.0 - drift(3.0) and hold.valid and not lost


def test_network_failures_retry_until_the_lease_ends_then_the_hold_is_lost() -> None:
    clock = Clock()
    hold, lost, abandoned = make(clock, StoreUnavailable("down"))
    clock.now = 101.0
    again = hold.tick()
    assert again is not None and 101.0 < again <= 101.5 and hold.lost is None
    clock.now = hold.valid_until  # still failing when the lease ends
    assert hold.tick() is None
    assert lost and "ran out before it could be renewed" in str(lost[0]) and abandoned == ["x"]
    assert not hold.valid
    with pytest.raises(LockLost):
        hold.check()


def test_a_renewal_that_finds_the_hold_gone_loses_it_once() -> None:
    clock = Clock()
    hold, lost, _ = make(clock, False)
    assert hold.tick() is None and len(lost) == 1
    assert hold.tick() is None and len(lost) == 1  # told once


def test_a_paused_process_sees_the_loss_before_the_watchdog_runs() -> None:
    clock = Clock()
    hold, lost, abandoned = make(clock, True)
    clock.now = 104.0  # "SIGSTOP" for longer than the lease: no tick ran
    assert not hold.valid
    with pytest.raises(LockLost, match="'x'"):
        hold.check()
    assert len(lost) == 1 and abandoned == ["x"]
    assert hold.tick() is None and len(lost) == 1  # the watchdog does not tell twice


def test_a_released_hold_is_never_reported_lost() -> None:
    clock = Clock()
    hold, lost, _ = make(clock, False)
    hold.released = True
    clock.now = 200.0
    assert hold.tick() is None and not lost and not hold.valid


def test_fence_is_an_int_that_names_its_lock_and_pickles() -> None:
    import pickle

    fence = Fence(7, "orders", "sm:{lock:orders}:fence")
    assert fence == 7 and fence + 1 == 8 and repr(fence) == "Fence(7, lock='orders')"
    back = pickle.loads(pickle.dumps(fence))
    assert isinstance(back, Fence) and back.lock == "orders" and back.key == fence.key
