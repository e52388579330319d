"""Scenario S16 (TESTPLAN §8, issue 12 §2): real eviction under ``maxmemory``, every policy.

A private redis-server gets a small ``maxmemory`` (a few MB above what it uses) and one of the
policies ``allkeys-lru``, ``allkeys-random``, ``volatile-lru``, ``noeviction``.  A filler thread
writes 16 KiB keys (with a TTL, so ``volatile-*`` can evict them) fast enough to replace the
headroom several times a second, while four servers (maps, in this process) work on one map:

* **locks**: 24 locks visited in turn; each visit first writes with the token the lock issued
  *two* visits ago (stale by construction: a newer one was issued since), then acquires and
  releases once.  Between two visits Redis may evict the fence counter.  Oracle
  ``stale_fenced_accepted``: stale writes acknowledged (**must 0**).
* **transform**: one fast and several slow ``transform`` callers (their function waits
  0.04-0.3 s between read and write) append their write id to a short list under a key that has
  a bucket of its own, recording the id each applied write read (its *predecessor*).  Oracles:
  ``duplicate_versions_compared``: two acknowledged transforms that read the same value (a
  compare matched an (epoch, version) that named another write; **must 0**);
  ``acked_writes_lost``: acknowledged writes no later write read, that are not the final value,
  and that no later write's reading "absent" explains (eviction removed the data; those are
  ``writes_removed_by_eviction``) (**must 0**).
* **reads**: two servers read 16 keys through their near caches, rewritten now and then by a
  third; a checker reads the same keys straight from Redis every 20 ms.  Oracle
  ``served_after_evicted``: a cached read, started more than ``max_staleness`` after the checker
  saw the key absent, that returned a value acknowledged before that look (**must 0**);
  ``stale_beyond_delta`` counts the same for keys the checker saw overwritten.

Evictions are counted by kind through keyspace notifications (``__keyevent@0__:evicted``).  Each
oracle has a guard-off control (``control=``): the old script behaviour switched back on by
:class:`~syncmap.core.nearcache.Guards` (store side, passed to the scripts as ARGV[8]); run under
``allkeys-random``, each must then report its failure.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from ..config import MapConfig
from ..core.nearcache import Guards
from ..core.wire import unpack_value
from ..errors import StaleFence, SyncMapError, WriteOutcomeUnknown
from ..keys import Layout, bucket_of, encode_key
from ..lock import Lock
from ..lock.lease import Fence
from ..map import SyncMap
from .lockload import configure_eviction
from .scenario import (
    ACKED_LOST,
    ANOMALIES,
    FENCED_ACCEPTED,
    FENCED_REJECTED,
    OPS,
    Env,
    ScenarioResult,
    finish,
    scenario,
    timed,
)

POLICIES = ("allkeys-lru", "allkeys-random", "volatile-lru", "noeviction")
DUPLICATES = "duplicate_versions_compared"
SERVED_EVICTED = "served_after_evicted"
STALE = "stale_beyond_delta"
#: Guard-off controls: the protection each one switches off, the figure that must then fail, and
#: the memory headroom (bytes) that shows it best: versions restart (and so repeat) more often
#: under more pressure; a data hash evicted alone is served on only while its separate
#: bookkeeping survives, which is likelier under less.
CONTROLS: dict[str, tuple[Guards, str, int]] = {
    "fence": (Guards(fence_missing_refuses=False), FENCED_ACCEPTED, 1_500_000),
    "version": (Guards(ver_epoch=False, bookkeeping_in_data=False), DUPLICATES, 1_500_000),
    "data": (Guards(bookkeeping_in_data=False), SERVED_EVICTED, 4_000_000),
}
HEADROOM = 1_500_000
MAX_STALENESS = 0.3
NAME = "s16"
_LOCKS, _TKEYS, _RKEYS, _WKEYS = 24, 1, 16, 48
# Transformers' work between read and write (s): one fast one (server 0) and slow ones (server 1),
# whose windows span many writes; they mostly wait, so they cost little CPU.
_PAUSES = (0.005, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.25, 0.3)


@dataclass
class _Log:
    """What the threads record; each list is appended by one thread only."""

    evicted: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    crashed: list[str] = field(default_factory=list)  # "<thread>: <exception>" (must stay empty)
    ops: Counter[str] = field(default_factory=Counter)
    fenced: list[tuple[str, str]] = field(default_factory=list)  # (outcome, detail)
    # transform: (key, id, predecessor id or None, invoked, acked)
    transforms: list[list[tuple[str, str, str | None, float, float]]] = field(
        default_factory=lambda: [[] for _ in _PAUSES]
    )
    acks: dict[str, float] = field(default_factory=dict)  # read keys' value id -> acked at
    # cached reads: (invoked, key, value id), one list per reader
    reads: list[list[tuple[float, str, str]]] = field(default_factory=lambda: [[], []])
    # checker: key -> [(sent, received, value id or None)]
    looks: dict[str, list[tuple[float, float, str | None]]] = field(
        default_factory=lambda: defaultdict(list)
    )


_ENDINGS = (
    (":fence", "fence"),
    (":meta", "meta"),
    (":d", "data"),
    (":m", "bookkeeping"),  # layout 1's separate hash (guard-off runs only)
)


def _kind(key: str) -> str:
    if key.startswith("junk:"):
        return "filler"
    kind = next((k for end, k in _ENDINGS if key.endswith(end)), "other")
    if kind == "other" and ("{lock:" in key or ":lock:" in key):
        return "hold"  # a lock's hold (it has a TTL: the lease); on a Cluster {<bucket>}:lock:
    return kind


def _names(prefix: str, count: int, buckets: int, *, inside: bool) -> list[str]:
    """``count`` key names ``<prefix><n>`` in the last bucket (``inside``) or in the others: the
    transform keys get a bucket of their own, so their versions stay small and restart often
    under eviction (which is what makes a version-only comparison match another write)."""
    out: list[str] = []
    n = 0
    while len(out) < count:
        name, n = f"{prefix}{n}", n + 1
        if (bucket_of(encode_key(name, 1000), buckets) == buckets - 1) == inside:
            out.append(name)
    return out


class _Stopped(Exception):
    """The run ended while a transform's function was working."""


class _Run:
    """One run's threads; each records into ``self.log``.  The hooks :meth:`fill_targets` and
    :meth:`look_targets` say where the filler writes and the checker reads (one server here;
    every master on a Redis Cluster: ``scenarios_eviction_cluster``)."""

    def __init__(self, url: str, policy: str, guards: Guards, headroom: int = HEADROOM,
                 name: str = NAME) -> None:  # fmt: skip
        self.url, self.policy, self.headroom, self.name = url, policy, headroom, name
        self.cfg = MapConfig(buckets=4, max_staleness=MAX_STALENESS, presence=False,
                             guards=guards, transform_retries=64)  # fmt: skip
        self.layout = Layout("sm", name, self.cfg.buckets)
        self.log = _Log()
        self.stop = threading.Event()
        self.tkeys = _names("t", _TKEYS, self.cfg.buckets, inside=True)
        self.rkeys = _names("r", _RKEYS, self.cfg.buckets, inside=False)
        self.wkeys = _names("w", _WKEYS, self.cfg.buckets, inside=False)
        self.fkeys = _names("fence", _LOCKS, self.cfg.buckets, inside=False)
        self.maps: list[SyncMap] = []

    def open(self) -> None:
        for i in range(4):
            self.maps.append(SyncMap(self.name, self.url, config=self.cfg, node_id=f"s16-n{i}"))
        writer = self.maps[0]
        for key in self.wkeys:
            writer.set(key, "x" * 64)
        for key in self.rkeys:
            writer.set(key, f"init-{key}")
            self.log.acks[f"init-{key}"] = time.monotonic()

    def close(self) -> None:
        for m in self.maps:
            m.close()

    def notifications(self, admin: redis.Redis) -> Any:
        sub = admin.pubsub(ignore_subscribe_messages=True)
        sub.subscribe("__keyevent@0__:evicted")

        def run() -> None:
            try:
                while not self.stop.is_set():
                    msg = sub.get_message(timeout=0.05)
                    if msg is not None:
                        data = msg["data"]
                        text = data.decode() if isinstance(data, bytes) else str(data)
                        self.log.evicted[_kind(text)] += 1
            finally:
                sub.close()

        return run

    def fill_targets(self) -> list[tuple[redis.Redis, str, int]]:
        """(client, key prefix, keys per round) of each server the filler writes to."""
        return [(redis.Redis.from_url(self.url), "junk:", 8)]

    def filler(self) -> None:
        targets = self.fill_targets()
        blob, n = b"\0" * 16384, 0
        while not self.stop.is_set():
            for client, prefix, per_round in targets:
                pipe = client.pipeline(transaction=False)
                for _ in range(per_round):
                    pipe.set(f"{prefix}{n}", blob, ex=60)
                    n += 1
                try:
                    pipe.execute()
                except redis.ResponseError:
                    self.log.errors["filler_oom"] += 1
            time.sleep(0.01)  # load shape: ~800 keys (13 MB) a second on one server
        for client, _, _ in targets:
            client.close()

    def make_lock(self, i: int) -> Lock:
        return Lock(f"s16-L{i}", self.url, lease=5)

    def locks(self) -> None:
        writer, log = self.maps[0], self.log
        # Each lock's tokens as acquire() returned them: a Fence names its counter's key, which
        # a fenced write reads (on a Cluster, in the write's own bucket slot).
        tokens: dict[int, list[Fence]] = defaultdict(list)
        held = [self.make_lock(i) for i in range(_LOCKS)]
        i = 0
        while not self.stop.is_set():
            i = (i + 1) % _LOCKS
            lock, past = held[i], tokens[i]
            if len(past) >= 2:  # stale: the token of two visits ago, one newer issued since
                try:
                    writer.set(self.fkeys[i], uuid.uuid4().hex, fence=past[-2])
                    log.fenced.append(("accepted", f"{lock.name} token {past[-2]} < {past[-1]}"))
                except StaleFence as exc:
                    log.fenced.append(("lost" if "lost" in str(exc) else "refused", ""))
                except SyncMapError as exc:
                    log.errors[type(exc).__name__] += 1
            try:
                fence = lock.acquire(timeout=1)
                if not past or fence > past[-1]:  # a failed release (OOM) re-enters
                    past.append(fence)
                lock.release()
            except SyncMapError as exc:
                log.errors[type(exc).__name__] += 1

    def transformer(self, n: int) -> Any:
        """Appends its ids under the transform keys; ``_PAUSES[n]`` is its work between read
        and write."""
        m, out, pause = self.maps[min(n, 1)], self.log.transforms[n], _PAUSES[n]

        def attempt(key: str, me: str) -> None:
            seen: list[str | None] = [None]

            def step(v: Any) -> list[str]:
                ids = list(v or [])
                seen[0] = ids[-1] if ids else None
                if self.stop.wait(pause):  # the work between read and write
                    raise _Stopped
                return [*ids[-5:], me]

            invoked = time.monotonic()
            try:
                m.transform(key, step, default=None)
            except WriteOutcomeUnknown:  # may have applied: it may be someone's predecessor
                out.append((key, me, seen[0], invoked, -1.0))
                return
            except _Stopped:
                return
            except SyncMapError as exc:
                self.log.errors[type(exc).__name__] += 1
                return
            out.append((key, me, seen[0], invoked, time.monotonic()))

        def run() -> None:
            seq = 0
            while not self.stop.is_set():
                seq += 1
                attempt(self.tkeys[seq % _TKEYS], f"{n}-{seq}")

        return run

    def rewriter(self) -> None:
        writer, n = self.maps[0], 0
        while not self.stop.is_set():
            n += 1
            for key in self.wkeys:  # load: keeps the other buckets' sequences climbing
                with contextlib.suppress(SyncMapError):
                    writer.set(key, f"{n}" * 32)
            self.log.ops["writes"] += _WKEYS
            if n % 8:
                continue
            # A read key now and then (each every few seconds): an evicted one stays absent a
            # while, so a cache that keeps serving it is seen.
            key, value = self.rkeys[n // 8 % _RKEYS], f"v{n}"
            try:
                writer.set(key, value)
                self.log.acks[value] = time.monotonic()
                self.log.ops["writes"] += 1
            except SyncMapError as exc:
                self.log.errors[type(exc).__name__] += 1

    def reader(self, n: int) -> Any:
        m, out = self.maps[2 + n], self.log.reads[n]

        def run() -> None:
            i = 0
            while not self.stop.is_set():
                i += 1
                key = self.rkeys[i % _RKEYS]
                invoked = time.monotonic()
                try:
                    value, _, where = m.get_with_meta(key)
                except SyncMapError as exc:
                    self.log.errors[type(exc).__name__] += 1
                    continue
                if where == "local":
                    out.append((invoked, key, value))
                if i % 64 == 0:
                    time.sleep(0.0005)  # let the other threads run

        return run

    def look_targets(self, looked: list[tuple[str, bytes, str]]
                     ) -> list[tuple[redis.Redis, list[tuple[str, bytes, str]]]]:  # fmt: skip
        """(client, the (key, field, data hash) it reads) for the checker: one server here."""
        return [(redis.Redis.from_url(self.url), looked)]

    def checker(self) -> None:
        codec = self.maps[0]._codec
        looked = [(k, f, self.layout.data(bucket_of(f, self.cfg.buckets)))
                  for k, f in ((k, encode_key(k, 1000)) for k in self.rkeys)]  # fmt: skip
        targets = self.look_targets(looked)
        while not self.stop.is_set():
            # One pipeline per server, one after the other: a look spans [sent, got], and each
            # value it saw was in Redis at some moment of that span (all the oracle assumes).
            sent = time.monotonic()
            try:
                seen = [
                    (look[0], raw)
                    for client, group in targets
                    for look, raw in zip(group, _hgets(client, group), strict=True)
                ]
            except redis.RedisError:
                continue
            got = time.monotonic()
            for key, raw in seen:
                value = codec.decode(unpack_value(raw)[2]) if raw else None
                self.log.looks[key].append((sent, got, value))
            time.sleep(0.02)  # sampling period
        for client, _ in targets:
            client.close()

    def guarded(self, target: Callable[[], None]) -> Callable[[], None]:
        """``target``, its death by an error it does not expect recorded (a thread that died
        early would leave its oracle quietly starved)."""

        def run() -> None:
            try:
                target()
            except Exception as exc:
                self.log.crashed.append(f"{threading.current_thread().name}: {exc!r}"[:300])

        return run

    def run(self, admin: redis.Redis, seconds: float) -> dict[str, Any]:
        return self.run_on([admin], seconds)

    def run_on(self, admins: list[redis.Redis], seconds: float) -> dict[str, Any]:
        """The run, every server of ``admins`` limited (each master on a Cluster)."""
        for admin in admins:
            admin.config_set("notify-keyspace-events", "Ee")
        started = time.monotonic()
        try:
            self.open()
            # The maps' keys exist before the limit is set, so the filler has them to push out.
            for admin in admins:
                configure_eviction(admin, headroom=self.headroom, policy=self.policy)
            targets = [*(self.notifications(a) for a in admins), self.filler, self.locks,
                       self.rewriter, self.reader(0), self.reader(1), self.checker,
                       *(self.transformer(n) for n in range(len(_PAUSES)))]  # fmt: skip
            threads = [threading.Thread(target=self.guarded(t), name=f"s16-{i}", daemon=True)
                       for i, t in enumerate(targets)]  # fmt: skip
            for t in threads:
                t.start()
            self.stop.wait(seconds)  # the run's length
            self.stop.set()
            for t in threads:
                t.join(timeout=10)
            final = {k: self.maps[0].get(k, consistent=True) for k in self.tkeys}
        finally:
            self.stop.set()
            self.close()
        figures = _judge(self.log, final, MAX_STALENESS)
        figures["seconds"] = round(time.monotonic() - started, 1)
        figures["maxmemory_policy"] = self.policy
        return figures


def _hgets(client: redis.Redis, group: list[tuple[str, bytes, str]]) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for _, f, name in group:
        pipe.hget(name, f)
    return pipe.execute()


def eviction_run(
    url: str, admin: redis.Redis, policy: str, seconds: float, guards: Guards | None = None,
    headroom: int = HEADROOM,
) -> dict[str, Any]:  # fmt: skip
    """One run under ``policy`` on a server of one's own; its figures (module docstring)."""
    return _Run(url, policy, guards or Guards(), headroom).run(admin, seconds)


def _judge(log: _Log, final: dict[str, Any], delta: float) -> dict[str, Any]:
    f: dict[str, Any] = {}
    outcomes = Counter(o for o, _ in log.fenced)
    f[FENCED_ACCEPTED] = outcomes["accepted"]
    f[FENCED_REJECTED] = outcomes["refused"] + outcomes["lost"]
    f["fence_state_lost_refusals"] = outcomes["lost"]
    f["fence_witnesses"] = [d for o, d in log.fenced if o == "accepted"][:3]
    f.update(_judge_transforms(log, final))
    f.update(_judge_reads(log, delta))
    f[OPS] = len(log.fenced) + f["transforms"] + f["cached_reads"] + log.ops["writes"]
    f[ANOMALIES] = (f[FENCED_ACCEPTED] + f[DUPLICATES] + f[ACKED_LOST] + f[SERVED_EVICTED]
                    + f[STALE])  # fmt: skip
    for kind in ("fence", "hold", "data", "meta", "bookkeeping", "filler"):
        f[f"evicted_{kind}"] = log.evicted[kind]
    f["errors"] = dict(log.errors)
    f["crashed"] = sorted(log.crashed)
    return f


def _judge_transforms(log: _Log, final: dict[str, Any]) -> dict[str, Any]:
    """Each applied transform names the write it read (its predecessor): two that read the same
    one both passed a compare against it (a duplicate); a write nobody read, that is not the
    final value and after which nobody found the key absent, was lost."""
    writes = sorted((w for per in log.transforms for w in per), key=lambda w: w[4])
    readers = Counter((k, p) for k, _, p, _, _ in writes if p)
    restarts: dict[str, list[float]] = defaultdict(list)  # key -> acks of writes that read absent
    for key, _, pred, _, acked in writes:
        if pred is None and acked >= 0:
            restarts[key].append(acked)
    lost = removed = 0
    for key, me, _, _, acked in writes:
        last = final.get(key)
        if acked < 0 or (key, me) in readers or (last and last[-1] == me):
            continue  # (acked < 0: outcome unknown, not acknowledged)
        if last is None or any(t > acked for t in restarts[key]):
            removed += 1  # the key was found absent after it: eviction took it
        else:
            lost += 1
    return {
        DUPLICATES: sum(n - 1 for n in readers.values() if n > 1),
        ACKED_LOST: lost,
        "writes_removed_by_eviction": removed,
        "transforms": sum(1 for w in writes if w[4] >= 0),
    }


def _judge_reads(log: _Log, delta: float) -> dict[str, Any]:
    """A cached read that began more than ``delta`` after the checker's look ended, and returned
    a value acknowledged before that look began although the look saw something else."""
    served_evicted = stale = 0
    for reads in log.reads:
        for invoked, key, value in reads:
            looks = log.looks.get(key, [])
            i = bisect.bisect_right(looks, invoked - delta, key=lambda look: look[1]) - 1
            if i < 0:
                continue
            sent, _, seen = looks[i]
            acked = log.acks.get(value, float("inf")) if isinstance(value, str) else float("inf")
            if seen != value and acked < sent:
                if seen is None:
                    served_evicted += 1
                else:
                    stale += 1
    return {SERVED_EVICTED: served_evicted, STALE: stale,
            "cached_reads": sum(len(r) for r in log.reads)}  # fmt: skip


@scenario("S16", "eviction")
def s16(env: Env, seconds: float = 10.0, *, policies: tuple[str, ...] = POLICIES,
        control: str | None = None, guard: bool = True) -> ScenarioResult:  # fmt: skip
    """Every policy in turn (``seconds`` split between them).  ``control`` (``fence``,
    ``version``, ``data``) runs that guard-off control instead, under ``allkeys-random``;
    ``guard=False`` runs all three.  A control *fails* when its oracle caught the planted bug,
    which is what it is for (``syncmap torture --controls``)."""
    result, started = timed("S16", "eviction")

    def one(policy: str, each: float, guards: Guards | None, headroom: int) -> dict[str, Any]:
        return _one(env, policy, each, guards, headroom)

    judge(result, one, seconds, policies, control, guard, shortest=(3.0, 2.0))
    return finish(result, started)


Runner = Callable[[str, float, "Guards | None", int], dict[str, Any]]
"""One run: (policy, seconds, guards or None, headroom) -> its figures (:func:`eviction_run`)."""


def judge(result: ScenarioResult, one: Runner, seconds: float, policies: tuple[str, ...],
          control: str | None, guard: bool, shortest: tuple[float, float]) -> None:  # fmt: skip
    """S16's runs and musts, whatever runs them (``one``): the guard-off controls when asked
    for (each at least ``shortest[0]`` s), else every policy (each at least ``shortest[1]``)."""
    if not guard or control is not None:
        chosen = sorted(CONTROLS) if control is None else [control]
        each = max(seconds / len(chosen), shortest[0])
        caught = 0
        for name in chosen:
            guards, figure, headroom = CONTROLS[name]
            r = one("allkeys-random", each, guards, headroom)
            result.figures[f"control_{name}"] = {k: r[k] for k in _SUMMED}
            result.require(r[figure] == 0, f"control {name!r} (guard off): {figure} = {r[figure]}")
            caught += r[figure] > 0
        result.figures["controls_caught"] = f"{caught}/{len(chosen)}"
        result.figures["control"] = ",".join(chosen)
        return
    each = max(seconds / len(policies), shortest[1])
    runs = [one(policy, each, None, HEADROOM) for policy in policies]
    f = result.figures
    for name in _SUMMED:
        f[name] = sum(r[name] for r in runs)
    f["per_policy"] = {r["maxmemory_policy"]: {k: v for k, v in r.items() if k in _SUMMED
                       or k in ("errors", "transforms", "cached_reads")} for r in runs}  # fmt: skip
    for r in runs:
        policy = r["maxmemory_policy"]
        for name in (FENCED_ACCEPTED, DUPLICATES, ACKED_LOST, SERVED_EVICTED, STALE):
            result.require(r[name] == 0, f"{policy}: {name} must be 0, got {r[name]}")
        ours = r["evicted_fence"] + r["evicted_data"] + r["evicted_meta"]
        if policy.startswith("allkeys"):
            result.require(ours > 0, f"{policy}: syncmap's keys must have been evicted")
        else:
            result.require(ours == 0, f"{policy}: evicted {ours} syncmap keys (none have a TTL)")
        ran = r["cached_reads"] > 0 and (r["transforms"] > 0 or policy == "noeviction")
        result.require(ran, f"{policy}: the workload must have run")  # (noeviction: OOM soon)
        result.require(not r["crashed"], f"{policy}: threads died of {r['crashed']}")


_SUMMED = (OPS, FENCED_ACCEPTED, FENCED_REJECTED, DUPLICATES, ACKED_LOST, SERVED_EVICTED, STALE,
           ANOMALIES, "fence_state_lost_refusals", "writes_removed_by_eviction", "evicted_fence",
           "evicted_data", "evicted_meta", "evicted_bookkeeping", "evicted_hold")  # fmt: skip


def _one(env: Env, policy: str, seconds: float, guards: Guards | None, headroom: int
         ) -> dict[str, Any]:  # fmt: skip
    with env.server() as server:
        admin = server.client()
        try:
            return eviction_run(server.url, admin, policy, seconds, guards, headroom)
        finally:
            admin.close()


__all__ = ["CONTROLS", "HEADROOM", "POLICIES", "Runner", "eviction_run", "judge", "s16"]
