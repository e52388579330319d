"""S27 outage-policy (issue 17 §3): both ``on_store_down`` policies under an S07/S08-style cut.

One reader map reaches its private redis-server through a :class:`FaultProxy` (data connections
and feed); a writer map goes direct.  Each round warms the reader, black-holes its path (no FIN,
no RST: a hung Redis as far as the reader can tell) for longer than ``max_stale_age`` while the
writer keeps writing, heals, and runs on.  Every read and write is recorded and swept:

* strict (``"raise"``): 0 reads stale beyond Δ, no read flagged stale; reads raise
  ``StoreUnavailable`` during the cut, each within the call deadline;
* serve_stale: 0 reads beyond ``max_stale_age``; every read stale beyond Δ is flagged
  ``"stale"`` and the flagged reads equal ``statistics().stale_reads``; no stale read once Δ (plus
  one call deadline) has passed since the heal; after writes stop the cache equals Redis (C3).

``guard=False`` runs the serve_stale round with ``Guards.stale_bound`` off: stale entries are then
served past ``max_stale_age``, which the sweep must catch.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import MapConfig
from ..core.nearcache import Guards
from ..errors import StoreUnavailable
from ..map import SyncMap
from .history import Op, sweep
from .proxy import FaultProxy
from .scenario import (
    ANOMALIES,
    OPS,
    STALE_MAX,
    STALE_P50,
    STALE_P99,
    Env,
    ScenarioResult,
    finish,
    scenario,
    timed,
)

DELTA, AGE, DEADLINE = 0.5, 1.5, 0.25
KEYS = [f"k{i}" for i in range(8)]
WARM, AFTER = 0.5, 1.5  # seconds of load before the cut and after the heal
_ns = time.monotonic_ns


@dataclass(frozen=True, slots=True)
class Seen:
    """What the readers of some keys saw: their ops (and the writer's to those keys), the reads
    that raised ``StoreUnavailable``, and the longest call (ns)."""

    ops: list[Op]
    errors: int
    longest_ns: int


class Load:
    """A writer thread (direct) and reader threads (through the proxy), recording ops.

    ``groups``: the keys each reader thread cycles through (default: one thread, every key);
    ``tag`` makes the values unique when several loads write the same map (S27-cluster)."""

    def __init__(self, reader: SyncMap, writer: SyncMap, keys: Sequence[str] = KEYS,
                 groups: Sequence[Sequence[str]] | None = None,
                 tag: str = "w") -> None:  # fmt: skip
        self.reader, self.writer = reader, writer
        self.keys, self.tag = list(keys), tag
        self.ops: list[Op] = []
        self.errors: Counter[str] = Counter()  # key -> reads that raised StoreUnavailable
        self.longest_ns: dict[str, int] = {}  # key -> its longest read
        self._stop = threading.Event()
        self._n = itertools.count(1)
        self._threads = [threading.Thread(target=self._w, daemon=True)] + [
            threading.Thread(target=self._r, args=(list(g),), daemon=True)
            for g in (groups or [self.keys])
        ]

    def __enter__(self) -> Load:
        for key in self.keys:  # every key written (and cached by the reader) before the load
            call, value = _ns(), f"{self.tag}-0"
            version = self.writer.set(key, value)
            self.ops.append(Op("writer", "write", key, value, version, call, _ns()))
            self.reader.get(key)
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def seen(self, keys: Sequence[str]) -> Seen:
        chosen = set(keys)
        return Seen([op for op in self.ops if op.key in chosen],
                    sum(self.errors[k] for k in chosen),
                    max((self.longest_ns.get(k, 0) for k in chosen), default=0))  # fmt: skip

    def _w(self) -> None:
        rng = random.Random(1)
        while not self._stop.wait(0.01):
            key, value = rng.choice(self.keys), f"{self.tag}-{next(self._n)}"
            call = _ns()
            version = self.writer.set(key, value)
            self.ops.append(Op("writer", "write", key, value, version, call, _ns()))

    def _r(self, keys: list[str]) -> None:
        for i, key in enumerate(itertools.cycle(keys)):
            if i % len(keys) == 0 and self._stop.wait(0.0005):  # pacing: ~10k reads/s at most
                return
            call = _ns()
            try:
                value, version, source = self.reader.get_with_meta(key)
            except StoreUnavailable:
                self.errors[key] += 1
                self._longest(key, _ns() - call)
                continue
            ret = _ns()
            self._longest(key, ret - call)
            self.ops.append(Op("reader", "read", key, value, version, call, ret, source))

    def _longest(self, key: str, ns: int) -> None:
        self.longest_ns[key] = max(self.longest_ns.get(key, 0), ns)


def _config(policy: str, guard: bool) -> MapConfig:
    guards = Guards() if guard else Guards(stale_bound=False)
    return MapConfig(max_staleness=DELTA, call_timeout=DEADLINE, self_check_timeout=5.0,
                     on_store_down=policy, max_stale_age=AGE, guards=guards)  # type: ignore[arg-type]  # fmt: skip


@contextlib.contextmanager
def _maps(env: Env, policy: str, guard: bool) -> Iterator[tuple[FaultProxy, SyncMap, SyncMap]]:
    name = f"s27-{uuid.uuid4().hex[:8]}"
    with (
        env.server() as server,
        FaultProxy(server.host, server.port) as proxy,
        SyncMap(name, server.url, node_id="writer") as writer,
        SyncMap(name, proxy.url, node_id="reader", config=_config(policy, guard)) as reader,
    ):
        yield proxy, reader, writer


def _round(env: Env, policy: str, outage: float, guard: bool) -> dict[str, Any]:
    with _maps(env, policy, guard) as (proxy, reader, writer):
        with Load(reader, writer) as load:
            time.sleep(WARM)  # load before the cut (a schedule, not a synchronisation)
            proxy.blackhole()
            cut = _ns()
            time.sleep(outage)  # the outage itself: its length is what is measured
            proxy.heal()
            healed = _ns()
            time.sleep(AFTER)
        time.sleep(DELTA + DEADLINE)  # quiet: waiting out a lease is the point (C3)
        diverged = [k for k in KEYS if differs(reader, writer, k)]
        return judge(policy, load.seen(KEYS), reader, cut, healed, diverged)


def differs(reader: SyncMap, writer: SyncMap, key: str) -> bool:
    """C3: what the reader caches for ``key`` (if anything) is what Redis holds."""
    cached = reader.peek(key)
    return cached is not None and cached != writer.get_with_meta(key, consistent=True)[:2]


def judge(policy: str, load: Seen, reader: SyncMap, cut: int, healed: int,
          diverged: list[str]) -> dict[str, Any]:  # fmt: skip
    ops = load.ops
    flagged = [op for op in ops if op.source == "stale"]
    unflagged = [op for op in ops if op.source != "stale"]
    within_delta = sweep(unflagged, DELTA)  # every read not flagged is within Δ (C2 and C4-C6)
    within_age = sweep(ops, AGE)  # and every read at all within max_stale_age
    settled = healed + int((DELTA + DEADLINE) * 1e9)
    return {
        "policy": policy,
        "reads": within_age.reads,
        "writes": within_age.writes,
        "stale_flagged": len(flagged),
        "stale_counted": reader.statistics().stale_reads,
        "unflagged_beyond_delta": within_delta.stale_beyond_delta,
        "beyond_max_age": within_age.stale_beyond_delta,
        "other_anomalies": within_age.anomalies - within_age.stale_beyond_delta,
        "stale_after_repair": sum(op.call_ns > settled for op in flagged),
        "errors": load.errors,
        "longest_call_ms": round(load.longest_ns / 1e6, 1),
        "outage_s": round((healed - cut) / 1e9, 2),
        "divergent": diverged,
        "staleness_ms": within_age.staleness_ms,
        "witnesses": within_delta.witnesses[:2] + within_age.witnesses[:2],
    }


def require(result: ScenarioResult, f: dict[str, Any]) -> None:
    p, need, seen = f["policy"], result.require, f["witnesses"]
    need(
        f["unflagged_beyond_delta"] == 0,
        f"{p}: {f['unflagged_beyond_delta']} unflagged reads stale beyond Δ; {seen}",
    )
    need(
        f["beyond_max_age"] == 0,
        f"{p}: {f['beyond_max_age']} reads beyond max_stale_age ({AGE} s); {seen}",
    )
    need(f["other_anomalies"] == 0, f"{p}: {f['other_anomalies']} C4-C6 anomalies")
    need(
        f["stale_flagged"] == f["stale_counted"],
        f"{p}: {f['stale_flagged']} reads flagged stale, {f['stale_counted']} counted",
    )
    need(
        f["stale_after_repair"] == 0,
        f"{p}: {f['stale_after_repair']} stale reads after Redis was back for Δ",
    )
    need(not f["divergent"], f"{p}: cached entries differ from Redis after Δ: {f['divergent']}")
    need(f["errors"] > 0, f"{p}: no read failed although the cut outlasted max_stale_age")
    need(
        f["longest_call_ms"] <= (2 * DEADLINE + 0.25) * 1000,
        f"{p}: a call blocked {f['longest_call_ms']} ms, over the {DEADLINE} s deadline",
    )
    if p == "raise":
        need(f["stale_flagged"] == 0, f"strict mode served {f['stale_flagged']} stale reads")
    else:
        need(f["stale_flagged"] > 0, "serve_stale served nothing stale during the cut")


@scenario("S27", "outage-policy")
def s27(env: Env, seconds: float = 8.0, *, guard: bool = True) -> ScenarioResult:
    """Rounds of both policies (serve_stale only with ``guard=False``) until ``seconds`` are used;
    each cut lasts ``max_stale_age`` + 1 s."""
    result, started = timed("S27", "outage-policy")
    policies = ("raise", "serve_stale") if guard else ("serve_stale",)
    rounds: list[dict[str, Any]] = []
    while not rounds or time.monotonic() - started < seconds:
        for policy in policies:
            rounds.append(_round(env, policy, AGE + 1.0, guard))
    staleness = [s for f in rounds for s in f.pop("staleness_ms")]
    for f in rounds:
        require(result, f)
    _figures(result, rounds, staleness, guard)
    return finish(result, started)


def _total(rounds: list[dict[str, Any]], name: str, policy: str | None = None) -> int:
    return sum(f[name] for f in rounds if policy in (None, f["policy"]))


def _figures(result: ScenarioResult, rounds: list[dict[str, Any]], staleness: list[float],
             guard: bool) -> None:  # fmt: skip
    fig = result.figures
    fig[OPS] = _total(rounds, "reads") + _total(rounds, "writes")
    fig[ANOMALIES] = sum(
        _total(rounds, n) for n in ("unflagged_beyond_delta", "beyond_max_age", "other_anomalies")
    )
    ordered = sorted(staleness) or [0.0]
    for name, q in ((STALE_P50, 0.5), (STALE_P99, 0.99), (STALE_MAX, 1.0)):
        fig[name] = round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)
    fig["rounds"] = len(rounds)
    fig["delta_s"], fig["max_stale_age_s"], fig["call_timeout_s"] = DELTA, AGE, DEADLINE
    for p, tag in (("raise", "strict"), ("serve_stale", "stale")):
        mine = [f for f in rounds if f["policy"] == p]
        if not mine:
            continue
        for name, figure in (("reads", "reads"), ("unflagged_beyond_delta", "beyond_delta"),
                             ("beyond_max_age", "beyond_max_age"), ("stale_flagged", "flagged"),
                             ("stale_counted", "counted"), ("errors", "errors")):  # fmt: skip
            fig[f"{tag}_{figure}"] = _total(mine, name)
        fig[f"{tag}_longest_call_ms"] = max(f["longest_call_ms"] for f in mine)
    if not guard:
        fig["control"] = "stale_bound off"
