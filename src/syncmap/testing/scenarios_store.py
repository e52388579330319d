"""Store-level scenarios of TESTPLAN §8: S01 (linearizable baseline), S02 (linearizable under
connection and server faults), S03 (durability modes).

They test what Redis plus syncmap's scripts and transport promise when the near cache is bypassed
(``get_with_meta(key, consistent=True)``): every key behaves as one linearizable register, and an
acknowledged write survives a crash when Redis runs ``appendfsync always``.

The history is recorded by :mod:`syncmap.testing.recorder` (TESTPLAN §2.4 rules there).

Oracles: the per-key WGL search of :mod:`syncmap.testing.linearizability` (primary), the
versioned-register sweep of :mod:`syncmap.testing.history` (secondary, O(n log n)), and for S02 and
S03 "acknowledged writes lost" (C7), defined at :func:`acked_writes_lost`.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from ..config import MapConfig
from ..embedded import EmbeddedRedis
from ..errors import StoreUnavailable, WriteOutcomeUnknown
from ..map import SyncMap
from .drivers import mixed_maps
from .faults import client_kill, client_pause, delete_matching
from .recorder import (
    _UNAVAILABLE_PAUSE_S,
    MUTATIONS,
    OPS_PER_KEY,
    History,
    Record,
    Recorder,
    save_records,
)
from .scenario import (
    ACKED_LOST,
    ANOMALIES,
    Env,
    ScenarioResult,
    finish,
    scenario,
    timed,
)
from .storecheck import Checked, LostReport, acked_writes_lost, check_records, plant_stale_read


@contextlib.contextmanager
def _redis_for(env: Env) -> Iterator[str]:
    """The user's Redis (``env.url``), else a private store of ``env.topology``."""
    if env.url:
        yield env.url
    else:
        with env.store() as store:
            yield store.url


def _open_maps(url: str, name: str, count: int, config: MapConfig) -> list[SyncMap]:
    maps: list[SyncMap] = []
    try:
        for i in range(count):
            maps.append(SyncMap(name, url, config=config, node_id=f"{name}-n{i}"))
    except BaseException:
        for m in maps:
            m.close()
        raise
    return maps


def delete_map_keys(url: str, name: str, namespace: str) -> int:
    """Delete every Redis key of map ``name``: its meta hash and each bucket's keys (``Layout``:
    all under ``{<name>}`` or ``{<name>:<bucket>}``, as are the locks of ``map.lock`` on a
    Cluster), found by SCAN on every master (a Cluster spreads them)."""
    return delete_matching(url, [f"{namespace}:{{{name}}}*", f"{namespace}:{{{name}:*"])


def _items(m: SyncMap, timeout: float = 10.0) -> list[tuple[Any, Any]]:
    """``m.items()``, retried while the server does not answer (it may be loading)."""
    return _snapshot_items(m, timeout)[0]


def _wait_loaded(server: EmbeddedRedis, timeout: float = 10.0) -> None:
    """Until a restarted server has loaded its data (``restart()`` returns once INFO answers, and
    INFO answers while Redis still refuses other commands with LOADING)."""
    give_up = time.monotonic() + timeout
    client = server.client(socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        while True:
            try:
                if not int(client.info("persistence").get("loading", 0)):
                    return
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > give_up:
                raise TimeoutError(f"{server!r} still loading after {timeout} s")
            time.sleep(0.005)
    finally:
        client.close()


def _snapshot_items(m: SyncMap, timeout: float) -> tuple[list[tuple[Any, Any]], int, int]:
    give_up = time.monotonic() + timeout
    while True:
        start = time.monotonic_ns()
        try:
            items = list(m.items())  # read now, inside [start, end]: a view reads when used
        except StoreUnavailable:
            if time.monotonic() > give_up:
                raise
            time.sleep(0.01)
            continue
        return items, start, time.monotonic_ns()


def _snapshot(m: SyncMap, keys: Iterable[str], timeout: float = 10.0
              ) -> tuple[dict[str, str | None], int, int]:  # fmt: skip
    """Every key's value, read in one round trip during [start_ns, end_ns] (each bucket's read is
    atomic, so each key's value is its value at some instant of that interval)."""
    items, start, end = _snapshot_items(m, timeout)
    have = {str(k): v for k, v in items}
    return {k: have.get(k) for k in keys}, start, end


def _scan_records(snapshot: dict[str, str | None], start: int, end: int, tag: str
                  ) -> list[Record]:  # fmt: skip
    return [Record(tag, k, "get", None, v, start, end, source="scan") for k, v in snapshot.items()]


def _short(text: str, lines: int = 6) -> str:
    """The head of a checker witness, for a one-line failure (the full text is in Checked)."""
    head = text.splitlines()[:lines]
    return " | ".join(head) + (" | ..." if len(text.splitlines()) > lines else "")


def _history_figures(h: History) -> dict[str, Any]:
    return {
        "ops_recorded": len(h.records),
        "ops_ok": h.ok,
        "ops_fail": h.failed,
        "ops_info": h.info,
        "reads_dropped": h.reads_dropped,
        "keys_used": len(h.keys),
        # The slowest acknowledged write: S02's CLIENT PAUSE WRITE shows up here (>= the pause).
        "write_latency_max_ms": round(
            max(
                (
                    r.ret_ns - r.call_ns
                    for r in h.records
                    if r.ret_ns is not None and r.f in MUTATIONS
                ),
                default=0,
            )
            / 1e6,
            1,
        ),
    }


# ---- S01 -----------------------------------------------------------------------------------------


@scenario("S01", "auth-linearizable-baseline", faults_server=False)
def s01(
    env: Env,
    seconds: float,
    *,
    threads: int = 16,
    ops_per_key: int = OPS_PER_KEY,
    max_keys: int | None = None,
    budget_s: float = 10.0,
    workers: int = 2,
    seed: int | None = None,
    plant: bool = False,
    history_path: str | Path | None = None,
    drivers: tuple[str, ...] = (),
    **_: Any,
) -> ScenarioResult:
    """Concurrent get/set/swap/cas/cad/delete/setdefault with the cache bypassed, no faults.

    With ``env.url`` it runs on that Redis under a map of its own and deletes every key it made;
    else on a private store of ``env.topology``.
    ``plant=True`` corrupts one read before checking (the oracle's negative control: must fail).
    ``drivers``: the two servers' drivers (``("sync", "async")``: S01a, see testing/drivers.py).
    """
    result, started = timed("S01", "auth-linearizable-baseline")
    name = f"s01-{uuid.uuid4().hex[:10]}"
    config = MapConfig(namespace=env.namespace)
    rec = Recorder([], threads=threads, ops_per_key=ops_per_key, max_keys=max_keys, seed=seed)
    with _redis_for(env) as url:
        try:  # on the user's Redis, every key the map made is deleted, whatever happens
            with mixed_maps(url, name, 2, config, drivers) as maps:
                rec.maps = list(maps)
                history = rec.run(seconds)
        finally:
            deleted = delete_map_keys(url, name, env.namespace)
    records = history.records
    if history_path is not None:
        save_records(records, history_path)
    result.figures.update(_history_figures(history))
    result.figures["seed"] = rec.seed
    if plant:
        records, what = plant_stale_read(records)
        result.figures["planted"] = what
    checked = check_records(records, budget_s=budget_s, workers=workers)
    result.figures.update(checked.figures())
    result.figures[ANOMALIES] = checked.anomalies
    result.figures["redis_keys_deleted"] = deleted
    result.require(
        checked.keys_failed == 0,
        f"{checked.keys_failed} keys not linearizable (first: {_short(checked.witness)})",
    )
    result.require(
        checked.sweep.anomalies == 0,
        f"version sweep: {checked.sweep.summary()} {checked.sweep.witnesses[:3]}",
    )
    result.require(
        checked.ops > 0 and checked.keys > checked.keys_unknown,
        "nothing was checked: no operations, or every key ran out of budget",
    )
    result.require(not history.unexpected, f"unexpected errors: {dict(history.unexpected)}")
    return finish(result, started)


# ---- S02 -----------------------------------------------------------------------------------------


@dataclass(slots=True)
class Nemesis:
    """S02's faults, on a thread: CLIENT KILL TYPE normal every ``kill_every`` s, one CLIENT PAUSE
    WRITE at 30 % of the run, one kill -9 + restart at 55 %, then a snapshot of every key.

    ``admins``: clients of every master that takes writes (one server; each master of a
    Cluster), opened by :meth:`run` and closed by it; the kills and the pause go to each.
    ``crash``: the kill -9 and the restart, returning once the store serves again."""

    admins: Callable[[], list[redis.Redis]]
    crash: Callable[[], None]
    recorder: Recorder
    snap_map: SyncMap
    seconds: float
    kill_every: float = 0.3
    pause_ms: int = 300
    kills: int = 0
    clients_killed: int = 0
    pauses: int = 0
    restarts: int = 0
    downtime_ms: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)
    snapshot: tuple[dict[str, str | None], int, int] | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        start = time.monotonic()
        pause_at, crash_at = start + 0.30 * self.seconds, start + 0.55 * self.seconds
        end = start + self.seconds
        admins = self.admins()
        try:
            while not self.recorder.stop.is_set() and time.monotonic() < end:
                now = time.monotonic()
                try:
                    if self.pauses == 0 and now >= pause_at:
                        for admin in admins:
                            client_pause(admin, self.pause_ms, "WRITE")
                        self.pauses += 1
                        # No CLIENT KILL until the pause is over: it would turn every paused
                        # write into an indeterminate one and hide the pause itself.
                        time.sleep(self.pause_ms / 1000)
                    elif self.restarts == 0 and now >= crash_at:
                        self._crash()
                    else:
                        self.clients_killed += sum(client_kill(a, "normal") for a in admins)
                        self.kills += 1
                except Exception as exc:  # counted and reported; the run goes on
                    self.errors[type(exc).__name__] += 1
                time.sleep(self.kill_every)
        finally:
            for admin in admins:
                admin.close()
            self.done.set()

    def _crash(self) -> None:
        down = time.monotonic()
        self.crash()
        self.restarts += 1
        self.downtime_ms = (time.monotonic() - down) * 1000
        with self.recorder._keys_lock:
            keys = list(self.recorder._keys)
        self.snapshot = _snapshot(self.snap_map, keys)


@dataclass(slots=True)
class S02Run:
    """What one S02 run recorded: the history, the nemesis, the final snapshot, the seed."""

    history: History
    nemesis: Nemesis
    final: tuple[dict[str, str | None], int, int]
    seed: int


def run_s02(url: str, name: str, config: MapConfig, seconds: float, *,
            admins: Callable[[], list[redis.Redis]], crash: Callable[[], None], threads: int,
            ops_per_key: int, seed: int | None, kill_every: float, pause_ms: int
            ) -> S02Run:  # fmt: skip
    """S01's workload on map ``name`` (two servers, a third for the snapshots) under the
    :class:`Nemesis` (``admins``, ``crash``: what it faults), then a final snapshot."""
    maps = _open_maps(url, name, 3, config)
    try:
        rec = Recorder(maps[:2], threads=threads, ops_per_key=ops_per_key, seed=seed)
        nemesis = Nemesis(admins, crash, rec, maps[2], seconds, kill_every=kill_every,
                          pause_ms=pause_ms)  # fmt: skip
        nt = threading.Thread(target=nemesis.run, name="s02-nemesis", daemon=True)
        nt.start()
        try:
            history = rec.run(seconds)
        finally:
            rec.stop.set()
            nt.join()
        return S02Run(history, nemesis, _snapshot(maps[2], history.keys), rec.seed)
    finally:
        for m in maps:
            m.close()


def judge_s02_run(result: ScenarioResult, run: S02Run, *, budget_s: float, workers: int,
                  history_path: str | Path | None) -> None:  # fmt: skip
    """S02's oracles over ``run``: C7 at the restart and at the end (the snapshots), then WGL
    and the sweep over the history with the snapshot reads; figures and musts."""
    records = list(run.history.records)
    lost_mid = LostReport()
    if run.nemesis.snapshot is not None:
        lost_mid = acked_writes_lost(records, *run.nemesis.snapshot)
        records += _scan_records(*run.nemesis.snapshot, "scan-restart")
    lost_end = acked_writes_lost(records, *run.final)
    records += _scan_records(*run.final, "scan-final")
    records.sort(key=lambda r: r.call_ns)
    if history_path is not None:  # with the snapshot reads (source "scan"), for re-checking
        save_records(records, history_path)
    checked = check_records(records, budget_s=budget_s, workers=workers)
    _judge_s02(result, run.history, checked, run.nemesis, lost_mid, lost_end)
    result.figures["seed"] = run.seed


def _judge_s02(result: ScenarioResult, history: History, checked: Checked, nemesis: Nemesis,
               lost_mid: LostReport, lost_end: LostReport) -> None:  # fmt: skip
    fig = result.figures
    fig.update(_history_figures(history))
    fig.update(checked.figures())
    fig.update(client_kills=nemesis.kills, clients_killed=nemesis.clients_killed,
               pauses=nemesis.pauses, restarts=nemesis.restarts,
               restart_downtime_ms=round(nemesis.downtime_ms, 1))  # fmt: skip
    fig["acked_lost_at_restart"] = lost_mid.lost
    fig["acked_lost_final"] = lost_end.lost
    fig[ACKED_LOST] = lost_mid.lost + lost_end.lost
    phantoms = lost_mid.phantom_keys + lost_end.phantom_keys
    fig[ANOMALIES] = checked.anomalies + phantoms
    if history.unexpected:
        fig["unexpected_errors"] = dict(history.unexpected)
    if nemesis.errors:
        fig["nemesis_errors"] = dict(nemesis.errors)
    result.require(
        checked.keys_failed == 0,
        f"{checked.keys_failed} keys not linearizable (first: {_short(checked.witness)})",
    )
    result.require(
        checked.sweep.anomalies == 0,
        f"version sweep: {checked.sweep.summary()} {checked.sweep.witnesses[:3]}",
    )
    result.require(phantoms == 0, f"snapshot values no write stored: {lost_mid.witnesses[:3]}"
                   f" {lost_end.witnesses[:3]}")  # fmt: skip
    result.require(
        fig[ACKED_LOST] == 0,
        f"{fig[ACKED_LOST]} acknowledged writes lost with "
        f"appendfsync always: {(lost_mid.witnesses + lost_end.witnesses)[:5]}",
    )
    result.require(
        nemesis.restarts == 1 and nemesis.snapshot is not None,
        "the kill -9 + restart did not happen (run too short?)",
    )
    result.require(nemesis.clients_killed > 0, "CLIENT KILL never disconnected a client")
    result.require(
        checked.ops > 0 and checked.keys > checked.keys_unknown,
        "nothing was checked: no operations, or every key ran out of budget",
    )


@scenario("S02", "auth-linearizable-conn-faults", faults_server=True)
def s02(
    env: Env,
    seconds: float,
    *,
    threads: int = 16,
    ops_per_key: int = OPS_PER_KEY,
    budget_s: float = 10.0,
    workers: int = 2,
    seed: int | None = None,
    socket_timeout: float = 1.0,
    kill_every: float = 0.3,
    pause_ms: int = 300,
    guard: bool = True,
    history_path: str | Path | None = None,
    **_: Any,
) -> ScenarioResult:
    """S01's workload on a private Redis (AOF, fsync always) under connection kills, a write
    pause and a kill -9 + restart.  Must: no anomaly, no acknowledged write lost.

    ``guard=False`` is the negative control: Redis without persistence (the protection switched
    off), so the restart loses every acknowledged write and the run must fail (C7 and WGL).
    """
    result, started = timed("S02", "auth-linearizable-conn-faults")
    name = f"s02-{uuid.uuid4().hex[:10]}"
    # socket_timeout (1 s) is longer than the write pause, which shows up as latency; a client
    # timeout would be one more source of indeterminate operations, handled like the others.
    config = MapConfig(namespace=env.namespace, socket_timeout=socket_timeout)
    persistence: dict[str, Any] = {"appendonly": True, "appendfsync": "always"} if guard else {}
    with env.server(**persistence) as server:

        def crash() -> None:
            server.kill()
            server.restart()  # returns once the AOF is loaded

        run = run_s02(server.url, name, config, seconds, crash=crash, threads=threads,
                      admins=lambda: [server.client(socket_timeout=2.0,
                                                    socket_connect_timeout=2.0)],
                      ops_per_key=ops_per_key, seed=seed, kill_every=kill_every,
                      pause_ms=pause_ms)  # fmt: skip
    judge_s02_run(result, run, budget_s=budget_s, workers=workers, history_path=history_path)
    result.figures["aof"] = "always" if guard else "off"
    return finish(result, started)


# ---- S03 -----------------------------------------------------------------------------------------

#: name -> EmbeddedRedis options.  "none" is ``--save ''`` without AOF (EmbeddedRedis's default).
DURABILITY_MODES: dict[str, dict[str, Any]] = {
    "none": {"extra_args": ("--save", "")},
    "everysec": {"appendonly": True, "appendfsync": "everysec"},
    "always": {"appendonly": True, "appendfsync": "always"},
}


@dataclass(slots=True)
class Durability:
    mode: str
    acked: int = 0
    lost: int = 0
    unknown: int = 0  # writes of unknown outcome (in flight at the kill)
    unknown_applied: int = 0  # ... of which the restarted server has
    downtime_ms: float = 0.0


@dataclass(slots=True)
class SteadyWriters:
    """``writers`` threads writing on ``m`` until :meth:`stop`, each to keys of its own: key =
    value = ``<prefix>w<i>-<n>``, one key per write, so nothing overwrites it and a scan tells
    exactly which acknowledged writes survived."""

    m: SyncMap
    writers: int = 4
    prefix: str = ""
    acked: list[list[str]] = field(default_factory=list)
    unknown: list[list[str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self.acked = [[] for _ in range(self.writers)]
        self.unknown = [[] for _ in range(self.writers)]
        self._threads = [threading.Thread(target=self._write, args=(i,), daemon=True)
                         for i in range(self.writers)]  # fmt: skip
        for t in self._threads:
            t.start()

    def _write(self, i: int) -> None:
        seq = 0
        while not self._stop.is_set():
            seq += 1
            value = f"{self.prefix}w{i}-{seq}"
            try:
                self.m.set(value, value)
            except WriteOutcomeUnknown:  # NotReplicated too: it ran, it may not survive
                self.unknown[i].append(value)
            except StoreUnavailable:
                time.sleep(_UNAVAILABLE_PAUSE_S)
            else:
                self.acked[i].append(value)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def tally(self, mode: str, have: dict[str, Any],
              counted: Callable[[str], bool] = lambda _: True) -> Durability:  # fmt: skip
        """Acknowledged writes missing from ``have`` (a scan of the map after the restart), and
        writes of unknown outcome it holds, over the keys ``counted`` keeps."""
        out = Durability(mode)
        for values in self.acked:
            kept = [v for v in values if counted(v)]
            out.acked += len(kept)
            out.lost += sum(1 for v in kept if have.get(v) != v)
        for values in self.unknown:
            kept = [v for v in values if counted(v)]
            out.unknown += len(kept)
            out.unknown_applied += sum(1 for v in kept if have.get(v) == v)
        return out


def scan(url: str, name: str, config: MapConfig) -> dict[str, Any]:
    """Every entry of map ``name``, read by a server of its own (retried while loading)."""
    with SyncMap(name, url, config=config, node_id=f"{name}-scan") as m:
        return {str(k): v for k, v in _items(m)}


def durability_run(env: Env, mode: str, seconds: float, *, writers: int = 4) -> Durability:
    """Steady writes (each to a key of its own) for ``seconds``, kill -9 while they run, restart,
    then compare a scan of the map with every acknowledged write."""
    name = f"s03-{mode}-{uuid.uuid4().hex[:8]}"
    config = MapConfig(namespace=env.namespace, socket_timeout=2.0)
    with env.server(**DURABILITY_MODES[mode]) as server:
        m = SyncMap(name, server.url, config=config, node_id=f"{name}-w")
        try:
            load = SteadyWriters(m, writers)
            load.start()
            time.sleep(seconds)
            server.kill()  # while the writers run: some writes are in flight
            load.stop()
            down = time.monotonic()
            server.restart()
            _wait_loaded(server)
            downtime_ms = (time.monotonic() - down) * 1000
        finally:
            m.close()
        out = load.tally(mode, scan(server.url, name, config))
    out.downtime_ms = downtime_ms
    return out


@scenario("S03", "durability-modes", faults_server=True)
def s03(
    env: Env,
    seconds: float,
    *,
    modes: Sequence[str] = ("none", "everysec", "always"),
    writers: int = 4,
    **_: Any,
) -> ScenarioResult:
    """Acknowledged writes lost to a kill -9 per persistence mode.  Only ``always`` has a must (0).

    kill -9 kills the process, not the machine: what Redis has write()n to the AOF is in the
    kernel's page cache and survives, so ``everysec`` is expected to lose (almost) nothing here.
    Its up-to-1 s window is about an OS crash or power loss, which this scenario does not cause.
    """
    result, started = timed("S03", "durability-modes")
    per_mode = max(0.3, seconds / max(1, len(modes)))
    for mode in modes:
        d = durability_run(env, mode, per_mode, writers=writers)
        result.figures[f"acked_{mode}"] = d.acked
        result.figures[f"lost_{mode}"] = d.lost
        result.figures[f"in_flight_{mode}"] = f"{d.unknown_applied}/{d.unknown} applied"
        result.require(d.acked > 0, f"{mode}: no write was acknowledged")
        if mode == "always":
            result.figures[ACKED_LOST] = d.lost
            result.require(d.lost == 0, f"appendfsync always lost {d.lost} of {d.acked} "
                           "acknowledged writes")  # fmt: skip
    return finish(result, started)


__all__ = [
    "DURABILITY_MODES",
    "Durability",
    "Nemesis",
    "S02Run",
    "SteadyWriters",
    "delete_map_keys",
    "durability_run",
    "judge_s02_run",
    "run_s02",
    "s01",
    "s02",
    "s03",
    "scan",
]
