"""S19-cluster ``security-forged-messages-cluster``: S19 (``scenarios_security``) on a Cluster.

On a Cluster (layout 2s) each bucket's change messages travel on its own sharded channel
``sm:{<map>:<b>}:ch``, SPUBLISHed by the write script on the master that owns the bucket's slot
(``feed/shards.py``).  So the attacker here is an ACL user created on *every* master that may
only ``SPUBLISH`` on those channels (``resetchannels &sm:{<map>:*}:ch +spublish``): it cannot read
or write a key.  The map (8 buckets) gets a fresh name whose buckets fall on every master, and
each forged message is SPUBLISHed on its bucket's channel on that bucket's master (replayed,
tampered and old-epoch messages on the channel of the bucket they name).  Everything else is
S19's: the same load, the same kinds, the same oracles and controls (``digest``: no key, digest
comparison off; ``mac``: key, MAC check off), with a signing key and without.

The one difference is ``current_seq``.  S19's version needs a write whose relayed message is
lost (a writer dying between its script and its PUBLISH).  On a Cluster the map's route has no
relayed message: the script SPUBLISHes in the write's own atomic call, so the message cannot be
lost while the subscription holds (and a lost subscription is ``on_down``, not a gap an attacker
can fill).  What an attacker *can* do there is race a write: read the bucket's (epoch, seq) as
any subscriber can follow them, SPUBLISH a forged message with the sequence the next write will
take, naming another key, just before that write.  The forged message arrives first, and the
real one then carries a sequence the cache has already seen.  That duplicate is the tell: on an
ordered feed a sequence never comes twice, so the cache doubts the bucket (no lease renews it
until a probe has, ``nearcache._doubt``) and the reader's next read of the key goes to Redis.
So the race leaves nothing stale even with the digest comparison off, and S19's ``digest``
control (no key, digest comparison off) does not fail here: it guards the lost-message case
only, which this route does not have.  ``guard=False`` runs the ``mac`` control (key, MAC check
off: forged changes applied), which must fail; ``control="digest"`` still runs the other one
for the figure (docs/scenarios.md §S19-cluster).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from ..core.wire import OP_SET, ChangeMessage, encode_message
from ..keys import Layout, bucket_of, encode_key
from .clusterset import ClusterSet
from .faults import delete_matching
from .scenario import Env, ScenarioResult, finish, scenario, timed
from .scenarios_cluster_feed import _cluster
from .scenarios_eviction_cluster import spread_name
from .scenarios_security import BUCKETS, Target, _other, _Run, confirmed, run_s19

USER = "s19-attacker"
#: S19's ``digest`` control does not apply here (see above): its planted bug goes uncaught by
#: the oracles because the duplicate's doubt, not the digest comparison, stops the race.
CLUSTER_CONTROLS = ("mac",)


def _race(run: _Run, key: str, value: int) -> None:
    """The current-sequence forgery on a Cluster: the next write's (epoch, seq), forged first.

    Order of events: the harness reads the bucket's (epoch, seq) -> the attacker's SPUBLISH of
    (epoch, seq + 1) naming another key returns -> the writer's script writes ``key`` as seq + 1
    and SPUBLISHes the real message on the same channel of the same master, so every subscriber
    gets the forged one first.  Only this thread writes the ghost keys' buckets, so seq + 1 is
    the sequence the write takes."""
    b = bucket_of(encode_key(key, 1000), BUCKETS)
    epoch, seq = run.epoch_seq(b)
    forged = ChangeMessage(OP_SET, b, seq + 1, epoch, "attacker", (_other(b),))
    run.publish("current_seq", b, encode_message(forged))
    run.ack(key, value, run.writer.set(key, value))


@contextmanager
def _on_cluster(cs: ClusterSet) -> Iterator[Target]:
    """A fresh map name on every master, the SPUBLISH-only attacker on each, then clean-up: the
    ACL user and the run's keys are deleted (a shared cluster is left as it was found)."""
    name = spread_name(cs, BUCKETS, prefix="s19c")
    layout = Layout("sm", name, BUCKETS)
    secret = os.urandom(8).hex()
    masters = cs.masters()
    admins = {(m.host, m.port): cs.node_client(m) for m in masters}
    for node in admins.values():
        node.execute_command("ACL", "SETUSER", USER, "reset", "on", f">{secret}", "resetchannels",
                             f"&sm:{{{name}:*}}:ch", "+spublish")  # type: ignore[no-untyped-call]  # fmt: skip
    attackers = {
        (m.host, m.port): cs.node_client(m, username=USER, password=secret) for m in masters
    }
    owner = {}
    for b in range(BUCKETS):
        m = cs.master_for_slot(ClusterSet.slot_of(layout.bucket_channel(b)))
        owner[b] = (m.host, m.port)
    admin = cs.client()
    try:
        attackers[owner[0]].hget(layout.data(0), "#e")
        attacker_reads = "allowed"
    except redis.exceptions.NoPermissionError:
        attacker_reads = "refused"

    def send(b: int, data: bytes) -> Any:
        return attackers[owner[b]].execute_command("SPUBLISH", layout.bucket_channel(b), data)  # type: ignore[no-untyped-call]

    def listen() -> list[Any]:
        subs = []
        for addr, node in admins.items():
            sub = node.pubsub()
            n = 0
            for b in range(BUCKETS):
                if owner[b] == addr:  # one SSUBSCRIBE per channel: each names a single slot
                    sub.ssubscribe(layout.bucket_channel(b))
                    n += 1
            subs.append(confirmed(sub, n))
        return subs

    try:
        yield Target(cs.url, layout, admin, send, listen, _race, attacker_reads)
    finally:
        for attacker in attackers.values():
            attacker.close()
        admin.close()
        for node in admins.values():
            node.execute_command("ACL", "DELUSER", USER)  # type: ignore[no-untyped-call]
            node.close()
        delete_matching(cs.url, [f"sm:{{{name}*"])


@scenario("S19-cluster", "security-forged-messages-cluster")
def s19_cluster(env: Env, seconds: float = 8.0, *, guard: bool = True, control: str | None = None,
                cluster: ClusterSet | None = None, **_: Any) -> ScenarioResult:  # fmt: skip
    """S19 on a 3 + 3 cluster: a private one, or ``cluster`` (settled, and only this run's
    clients on it while it runs).  ``control`` / ``guard=False`` as S19's."""
    result, started = timed("S19-cluster", "security-forged-messages-cluster")
    with _cluster(env, cluster) as cs:
        run_s19(result, lambda _key: _on_cluster(cs), seconds, guard=guard, control=control,
                controls=CLUSTER_CONTROLS)  # fmt: skip
    result.figures["topology"] = "cluster"
    return finish(result, started)


__all__ = ["CLUSTER_CONTROLS", "s19_cluster"]
