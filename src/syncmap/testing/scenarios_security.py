"""S19 security-forged-messages (TESTPLAN §8, issue 12 §3): a publisher without the map's key.

A private redis-server gets an ACL user ``attacker`` that may only PUBLISH on the map's channel.
While a writer and a reader run an S04-like load (the writer sets increasing integers, the reader
reads them, cached, as fast as it can), the attacker publishes:

* ``random``: random bytes;  ``forged``: well-formed messages naming keys never written, at the
  bucket's real epoch and next sequence;  ``oversized``: a message claiming 5,000 keys;
* ``tampered``: an authentic message (seen on the channel) with one byte flipped;
* ``replayed``: authentic old messages;  ``old_epoch``: authentic messages of a bucket's previous
  epoch (the harness deleted that bucket once, as eviction would);
* ``current_seq``: the attack of issue 12: a write whose relayed message is lost (its writer
  "dies" between write and publish: a relay-mode script call whose messages are dropped), then at
  once a forged message with that bucket's epoch and exact current sequence naming another key.
  (The harness reads epoch and sequence for the attacker, as any app credential or a subscriber
  could.)

and a malicious pickle is planted in a value (by a writer of the data, not the attacker, who
cannot write keys): under the default codec it must be refused (``CorruptData``), under
``PickleCodec(signing_key=...)`` refused before ``pickle.loads``; either way a canary file its
payload would create must not appear.

The run is made twice: with a signing key on every server, and without one (the digest chain
alone must keep the staleness bound).  Figures: messages injected per kind, dropped per reason
(the reader's ``forged_messages``, ``corrupt_messages``, ``digest_mismatches``), forged accepted
(events for a (key, version) no real write made; **0** with a key), stale beyond Δ (**0**),
poisoned entries (cache ≠ store after quiescence, **0**), RCE canary hits (**0**).  Controls:
``digest`` (no key, digest comparison off: the current-sequence forgery keeps keys stale) and
``mac`` (key, MAC check off: forged messages are applied).
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis

from ..codec import PickleCodec
from ..config import MapConfig
from ..core.nearcache import Event, Guards
from ..core.wire import OP_PING, OP_SET, ChangeMessage, decode_message, encode_message, pack_value
from ..embedded import HOST
from ..errors import CorruptData, SyncMapError
from ..keys import Layout, bucket_of, encode_key
from ..map import SyncMap
from ..signing import pads
from .rawstore import RawStore
from .scenario import ANOMALIES, OPS, Env, ScenarioResult, finish, scenario, timed

DELTA = 0.5
BUCKETS = 8
NAME = "s19"
CHANNEL = f"sm:{{{NAME}}}:ch"
FORGED_ACCEPTED, STALE, POISONED, CANARY = ("forged_accepted", "stale_beyond_delta",
                                            "poisoned_entries", "rce_canary_hits")  # fmt: skip
CONTROLS: dict[str, tuple[bool, Guards, str]] = {
    "digest": (False, Guards(digest_chain=False), STALE),
    "mac": (True, Guards(message_mac=False), FORGED_ACCEPTED),
}
KINDS = ("random", "forged", "oversized", "tampered", "replayed", "old_epoch", "current_seq")


def _keys(prefix: str, count: int, low: int, high: int) -> list[str]:
    """``count`` key names whose bucket is in [low, high): workload and attacked keys apart."""
    out = []
    for i in range(100_000):
        if low <= bucket_of(encode_key(f"{prefix}{i}", 1000), BUCKETS) < high:
            out.append(f"{prefix}{i}")
            if len(out) == count:
                break
    return out


class _Evil:
    """Unpickling this creates the canary file (what an attacker's payload would run)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (self.path, "w")


@dataclass
class Target:
    """Where a run happens, as the run's functions see it: S19's private server, or a cluster
    (``scenarios_cluster_security``)."""

    url: str
    layout: Layout
    admin: Any  # redis.Redis or RedisCluster: reads (epoch, seq), deletes a bucket, plants values
    send: Callable[[int, bytes], Any]  # the attacker's publish of a message about bucket b
    listen: Callable[[], list[Any]]  # subscribed PubSubs that carry every authentic message
    ghost: Callable[[_Run, str, int], None]  # the current-sequence attack on one key
    attacker_reads: str  # "refused": the attacker's credential cannot read the map's keys


@dataclass
class _Run:
    key: bytes | None
    target: Target
    writer: SyncMap
    reader: SyncMap
    work: list[str]
    ghosts: list[str]
    stop: threading.Event = field(default_factory=threading.Event)
    acked: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    real: set[tuple[str, int]] = field(default_factory=set)
    injected: Counter[str] = field(default_factory=Counter)
    sent: set[bytes] = field(default_factory=set)
    authentic: list[bytes] = field(default_factory=list)
    old_epoch: list[bytes] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    reads: int = 0
    stale: int = 0
    errors: list[str] = field(default_factory=list)

    def ack(self, key: str, value: int, version: int) -> None:
        self.acked.setdefault(key, []).append((time.monotonic(), value))
        self.real.add((key, version))

    def publish(self, kind: str, bucket: int, data: bytes) -> None:
        self.sent.add(data)
        self.target.send(bucket, data)
        self.injected[kind] += 1

    def epoch_seq(self, bucket: int) -> tuple[int, int]:
        e, s = (int(x or 0) for x in self.target.admin.hmget(self.target.layout.data(bucket),
                                                              "#e", "#s"))  # fmt: skip
        return e, s


def _observe(run: _Run) -> threading.Thread:
    """Collect the authentic messages on the channel (everything the attacker did not send)."""
    subs = run.target.listen()

    def loop() -> None:
        while not run.stop.is_set():
            for sub in subs:
                m = sub.get_message(ignore_subscribe_messages=True, timeout=0.05 / len(subs))
                if m is None or m["data"] in run.sent:
                    continue
                try:
                    if decode_message(m["data"]).op != OP_PING:
                        run.authentic.append(m["data"])
                except CorruptData:
                    pass
        for sub in subs:
            sub.close()

    t = threading.Thread(target=loop, name="s19-observer", daemon=True)
    t.start()
    return t


def _write(run: _Run) -> None:
    n = 0
    while not run.stop.is_set():
        n += 1
        key = run.work[n % len(run.work)]
        try:
            run.ack(key, n, run.writer.set(key, n))
        except SyncMapError as exc:
            run.errors.append(repr(exc))
        time.sleep(0.002)  # workload pacing, not synchronisation


def _read(run: _Run) -> None:
    keys = run.work + run.ghosts
    while not run.stop.is_set():
        for key in keys:
            started = time.monotonic()
            value = run.reader.get(key)
            run.reads += 1
            due = [v for t, v in run.acked.get(key, ()) if t < started - DELTA]
            if due and (value is None or value < due[-1]):
                run.stale += 1


def _other(bucket: int) -> bytes:
    """A key never written, in ``bucket``: what the current-sequence forgery names."""
    return encode_key(
        next(
            k
            for k in _keys("x", 50, 0, BUCKETS)
            if bucket_of(encode_key(k, 1000), BUCKETS) == bucket
        ),
        1000,
    )


def _ghost(run: _Run, store: RawStore, key: str, value: int) -> None:
    """The attack: a write whose relayed message is lost, then its exact (epoch, seq) forged."""
    field_ = encode_key(key, 1000)
    b = bucket_of(field_, BUCKETS)
    cmd = store.script("set", b, field_, run.writer._codec.encode(value), 0, "set", "")
    version, _, _, epoch = store.call([cmd], write=True)[0]
    run.ack(key, value, int(version))
    forged = ChangeMessage(OP_SET, b, int(version), int(epoch), "attacker", (_other(b),))
    run.publish("current_seq", b, encode_message(forged))


def _inject(run: _Run) -> None:
    rng = random.Random(19)
    n = 0
    while not run.stop.is_set():
        n += 1
        kind = KINDS[n % len(KINDS)]
        b = rng.randrange(BUCKETS)
        epoch, seq = run.epoch_seq(b)
        if kind == "random":
            run.publish(kind, b, os.urandom(rng.randrange(1, 200)))
        elif kind == "forged":
            fields = (encode_key(f"forged{n}", 1000),)
            message = ChangeMessage(OP_SET, b, seq + 1, epoch, "x", fields)
            run.publish(kind, b, encode_message(message))
        elif kind == "oversized":
            head = encode_message(ChangeMessage(OP_SET, b, seq + 1, epoch, "x", ()))[:-4]
            run.publish(kind, b, head + (5000).to_bytes(4, "big") + b"\0\0\0\1s" * 5000)
        elif kind in ("tampered", "replayed") and run.authentic:
            seen = rng.choice(run.authentic[-50:] if kind == "tampered" else run.authentic)
            data = bytearray(seen)
            if kind == "tampered":
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            # Sent on the original's bucket channel (on a standalone, the map's one channel).
            run.publish(kind, decode_bucket(seen, b), bytes(data))
        elif kind == "old_epoch" and run.old_epoch:
            old = rng.choice(run.old_epoch)
            run.publish(kind, decode_bucket(old, b), old)
        elif kind == "current_seq":
            run.target.ghost(run, run.ghosts[n % len(run.ghosts)], 1000 + n)
        time.sleep(DELTA / 10)  # fault schedule


def _old_epoch_messages(run: _Run) -> None:
    """Authentic messages of a bucket, then the bucket deleted (as eviction would): they are of
    an old epoch from then on."""
    key = run.work[0]
    before = len(run.authentic)
    for v in range(3):
        run.ack(key, -1 - v, run.writer.set(key, -1 - v))
    deadline = time.monotonic() + 5
    while len(run.authentic) < before + 3 and time.monotonic() < deadline:
        time.sleep(0.01)  # the observer's thread receives them
    run.old_epoch = run.authentic[before:]
    bucket = bucket_of(encode_key(key, 1000), BUCKETS)
    run.target.admin.delete(run.target.layout.data(bucket))
    # The oracle learns of the deletion: the bucket's keys are absent until written again, and
    # a read that finds them so is right, not stale.  Before, it still expected ``key``'s last
    # acknowledged value: once that was older than Δ (the wait above ran long, or the writer was
    # slow to write ``key`` again) every read of ``key`` that found it absent counted as stale.
    for k in run.work:
        if bucket_of(encode_key(k, 1000), BUCKETS) == bucket:
            run.acked.pop(k, None)


def confirmed(sub: Any, count: int, timeout: float = 10.0) -> Any:
    """``sub`` once Redis has confirmed its ``count`` subscriptions.  redis-py's ``subscribe``
    only sends the command: a write on another connection may run first, and the observer then
    misses its message (``_old_epoch_messages`` waited its full 5 s for the missed one, 4 runs
    in about 70).  Called before the run writes anything, so what it reads and drops here is
    confirmations, or messages the observer would not keep (PINGs)."""
    deadline = time.monotonic() + timeout
    seen = 0
    while seen < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{seen} of {count} subscriptions confirmed in {timeout} s")
        m = sub.get_message(timeout=min(left, 0.1))
        if m is not None and m["type"] in ("subscribe", "ssubscribe"):
            seen += 1
    return sub


def decode_bucket(data: bytes, default: int) -> int:
    """The bucket a message names (``default`` for one that does not decode): a replayed or
    tampered message goes to its own bucket's channel, as a real one would."""
    try:
        return decode_message(data).bucket
    except CorruptData:
        return default


def _pickles(url: str, admin: Any, key: bytes | None, prefix: str = NAME) -> dict[str, Any]:
    """Plant a malicious pickle under the default codec and under PickleCodec(signing_key)."""
    out = Counter[str]()
    with tempfile.TemporaryDirectory() as tmp:
        canary = os.path.join(tmp, "canary")
        evil = pickle.dumps(_Evil(canary))
        cfg = MapConfig(buckets=1, presence=False)
        for name, codec, payload in (
            (f"{prefix}p-msgpack", None, evil),
            (f"{prefix}p-pickle", PickleCodec(key or os.urandom(32)), evil),
            (f"{prefix}p-pickle-forged-mac", PickleCodec(key or os.urandom(32)),
             os.urandom(32) + evil),
        ):  # fmt: skip
            with SyncMap(name, url, codec=codec, config=cfg, signing_key=key or ()) as m:
                m["ok"] = 1
                admin.hset(
                    Layout("sm", name, 1).data(0), encode_key("evil", 1000),
                    pack_value(1, 0, payload, 1),
                )  # fmt: skip
                try:
                    value = m.get("evil")
                    out["poisoned_entries"] += 1 if value is not None else 0
                except CorruptData:
                    out["pickles_refused"] += 1
        out[CANARY] = int(os.path.exists(canary))
    return dict(out)


#: Opens a run's :class:`Target` for a signing key (None: none); closed after the run.
OpenTarget = Callable[[bytes | None], AbstractContextManager[Target]]


@contextmanager
def _standalone(env: Env, key: bytes | None) -> Iterator[Target]:
    """S19's target: a private redis-server, the attacker a PUBLISH-only ACL user on the map's
    channel; the lost relayed message of the current-sequence attack is a RawStore in relay
    mode whose messages are dropped."""
    with env.server() as server:
        admin = server.client()
        secret = os.urandom(8).hex()
        admin.execute_command("ACL", "SETUSER", "attacker", "on", f">{secret}", "resetchannels",
                              f"&{CHANNEL}", "+publish")  # type: ignore[no-untyped-call]  # fmt: skip
        attacker = redis.Redis(host=HOST, port=server.port, username="attacker", password=secret)
        try:
            attacker.hget(f"sm:{{{NAME}:0}}:d", "#e")
            attacker_reads = "allowed"
        except redis.exceptions.NoPermissionError:
            attacker_reads = "refused"
        layout = Layout("sm", NAME, BUCKETS)
        # The writer dies before publishing: RawStore drops the relayed messages.
        store = RawStore(server.client(), layout, "ghost:1", "", codec="msgpack",
                         pads=pads(key) if key else b"")  # fmt: skip

        def listen() -> list[Any]:
            sub = admin.pubsub()
            sub.subscribe(CHANNEL)
            return [confirmed(sub, 1)]

        try:
            yield Target(
                server.url, layout, admin, lambda _b, data: attacker.publish(CHANNEL, data),
                listen, lambda run, k, v: _ghost(run, store, k, v), attacker_reads,
            )  # fmt: skip
        finally:
            store.close()
            attacker.close()
            admin.close()


def attack(target: Target, seconds: float, key: bytes | None, guards: Guards) -> dict[str, Any]:
    """One run on ``target``: the load, the attacker's messages, the oracles' figures."""
    url, name = target.url, target.layout.name
    cfg = MapConfig(buckets=BUCKETS, max_staleness=DELTA, presence=False, guards=guards)
    sk = key or ()
    with SyncMap(name, url, config=cfg, signing_key=sk) as writer, \
         SyncMap(name, url, config=cfg, signing_key=sk) as reader:  # fmt: skip
        run = _Run(key, target, writer, reader, _keys("w", 8, 0, BUCKETS // 2),
                   _keys("g", 8, BUCKETS // 2, BUCKETS))  # fmt: skip
        reader.subscribe(run.events.append, inline=True)
        for g in run.ghosts:
            run.ack(g, 0, writer.set(g, 0))
        observer = _observe(run)
        _old_epoch_messages(run)
        jobs: list[tuple[Any, tuple[Any, ...]]] = [(_write, (run,)), (_read, (run,)),
                                                   (_inject, (run,))]  # fmt: skip
        threads = [threading.Thread(target=f, args=a, daemon=True) for f, a in jobs]
        for t in threads:
            t.start()
        run.stop.wait(seconds)
        run.stop.set()
        for t in [*threads, observer]:
            t.join(10)
        time.sleep(2 * DELTA)  # quiescence: the contract gives every cache Δ
        poisoned = sum(reader.get(k) != writer.get(k, consistent=True)
                       for k in run.work + run.ghosts)  # fmt: skip
        s = reader.statistics()
        # Duplicates of a sequence already applied (on an ordered feed, a forgery took the real
        # message's place): no lease renews their bucket until a probe has (nearcache._doubt).
        doubts = reader._core.counters.doubts
    figures = _pickles(url, target.admin, key, prefix=name)
    accepted = sum(
        1 for e in run.events if e.key is not None and (e.key, e.version) not in run.real
    )
    figures[POISONED] = figures.get(POISONED, 0) + poisoned
    figures.update({
        OPS: run.reads, STALE: run.stale, FORGED_ACCEPTED: accepted, "signing_key": key is not None,
        "attacker_reads": target.attacker_reads, "injected": dict(run.injected),
        "dropped": {"forged_messages": s.forged_messages, "corrupt_messages": s.corrupt_messages},
        "digest_mismatches": s.digest_mismatches, "lost_detected": s.lost_detected,
        "doubts": doubts, "write_errors": len(run.errors),
    })  # fmt: skip
    return figures


def run_s19(result: ScenarioResult, open_target: OpenTarget, seconds: float, *,
            guard: bool = True, control: str | None = None,
            controls: tuple[str, ...] = tuple(sorted(CONTROLS))) -> None:  # fmt: skip
    """S19's runs and oracles on the targets ``open_target`` opens (S19, S19-cluster);
    ``guard=False`` runs the ``controls`` that apply to that target."""

    def one(key: bytes | None, guards: Guards, share: float) -> dict[str, Any]:
        with open_target(key) as target:
            return attack(target, share, key, guards)

    if not guard or control is not None:
        chosen = list(controls) if control is None else [control]
        for name in chosen:
            keyed, guards, figure = CONTROLS[name]
            r = one(os.urandom(32) if keyed else None, guards, max(seconds / len(chosen), 2.5))
            result.figures[f"control_{name}"] = {
                figure: r[figure], STALE: r[STALE], "injected": r["injected"],
                "lost_detected": r["lost_detected"], "doubts": r["doubts"], "dropped": r["dropped"],
            }  # fmt: skip
            result.require(r[figure] == 0, f"control {name!r} (guard off): {figure} = {r[figure]}")
        result.figures["control"] = ",".join(chosen)
        return
    runs = {"key": one(os.urandom(32), Guards(), seconds / 2),
            "no_key": one(None, Guards(), seconds / 2)}  # fmt: skip
    f = result.figures
    for name in (OPS, STALE, POISONED, CANARY):
        f[name] = sum(r[name] for r in runs.values())
    f[FORGED_ACCEPTED] = runs["key"][FORGED_ACCEPTED]
    f["forged_accepted_without_key"] = runs["no_key"][FORGED_ACCEPTED]
    f[ANOMALIES] = f[STALE] + f[POISONED] + f[CANARY] + f[FORGED_ACCEPTED]
    f["runs"] = runs
    for label, r in runs.items():
        for name in (STALE, POISONED, CANARY):
            result.require(r[name] == 0, f"{label}: {name} must be 0, got {r[name]}")
        result.require(r["attacker_reads"] == "refused", f"{label}: the attacker could read keys")
        result.require(set(r["injected"]) == set(KINDS), f"{label}: injected only {r['injected']}")
        result.require(
            r["pickles_refused"] == 3, f"{label}: pickles refused {r['pickles_refused']}/3"
        )
    result.require(
        f[FORGED_ACCEPTED] == 0, f"with a key, {f[FORGED_ACCEPTED]} forged changes applied"
    )
    result.require(runs["key"]["dropped"]["forged_messages"] > 0, "with a key, nothing was dropped")
    result.require(
        runs["no_key"]["digest_mismatches"] > 0, "without a key, no digest mismatch seen"
    )


@scenario("S19", "security-forged-messages")
def s19(env: Env, seconds: float = 8.0, *, guard: bool = True,
        control: str | None = None) -> ScenarioResult:  # fmt: skip
    """With a key, then without (``seconds`` split).  ``control`` (``digest``, ``mac``) runs that
    guard-off control instead; ``guard=False`` runs both.  A control *fails* when its oracle
    caught the planted bug."""
    result, started = timed("S19", "security-forged-messages")
    run_s19(result, lambda key: _standalone(env, key), seconds, guard=guard, control=control)
    return finish(result, started)


__all__ = ["CONTROLS", "KINDS", "OpenTarget", "Target", "attack", "confirmed", "run_s19", "s19"]
