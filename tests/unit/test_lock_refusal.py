"""How long a refused queued waiter waits (``flows.refusal``, every lock kind's acquire reply)."""

from __future__ import annotations

from syncmap.lock import flows

LEASE = 30.0  # entry lease 5 s: refresh every 1,667 ms


def test_the_next_batch_waits_for_the_holders_lease_the_others_for_their_refresh() -> None:
    refresh = flows.refresh_ms(LEASE)
    turn = "the turn of {who}"
    # Lock (no lead flag): the head waits for the holder's lease, capped by its refresh.
    assert flows.refusal([0, 400, b"h", 0, 0], LEASE, turn=turn).wait_ms == 400
    assert flows.refusal([0, 9000, b"h", 0, 0], LEASE, turn=turn).wait_ms == refresh
    assert flows.refusal([0, 400, b"h", 3, 0], LEASE, turn=turn).wait_ms == refresh
    # RWLock: a reader third in the queue but in the next batch (lead) waits for the writer's
    # lease; a writer at the head behind nobody but held up by a turn does not.
    assert flows.refusal([0, 400, b"w", 2, 0, 1], LEASE, turn=turn).wait_ms == 400
    assert flows.refusal([0, 400, b"w", 0, 1, 0], LEASE, turn=turn).wait_ms == refresh
    # Not queued (a single try): the holder's lease, uncapped.
    assert flows.refusal([0, 9000, b"h", -1, 0], LEASE, turn=turn).wait_ms == 9000


def test_the_refusal_says_whose_turn_it_is() -> None:
    got = flows.refusal([0, 120, b"w:me", 2, 1, 0], LEASE, turn="{who} is queued ahead of it")
    assert got.why == "w:me is queued ahead of it (for 120 ms more); 2 waiting ahead of this one"
    held = flows.refusal([0, 120, b"", 0, 0], LEASE, turn="", holder="2 other permit holders")
    assert held.why == "held by 2 other permit holders for up to 120 ms more"
