"""A multi-process lock workload with faults: TESTPLAN §4.5, the engine of scenarios S12-S16.

``run(LockLoad(url, ...))`` starts ``workers`` OS processes (multiprocessing's *spawn* context, so a
SIGSTOP hits exactly one of them).  Each loops until one shared deadline::

    acquire (lease L) -> read the shared list S (get(key, consistent=True)) -> sleep a random time
    inside the critical section -> write S + [unique id] (fence= the token, or no fence) -> release

and logs every step with ``time.monotonic_ns()`` (CLOCK_MONOTONIC: one clock for every process of
the machine) to a JSON-lines file of its own, one ``write()`` per record, so a killed worker loses
at most the record it was writing.  Meanwhile the calling process applies one kind of fault to
whoever holds the lock, found by the owner token in the hold's ``o`` field (``w<index>-<hex>``):

``sigstop``       SIGSTOP the holder for ``stall`` x lease (1.5-3 by default), then SIGCONT.
``gil``           SIGUSR1 the holder; its handler calls libc ``usleep`` through ``ctypes.PyDLL``,
                  which keeps the GIL: no thread of that process (the watchdog included) runs.
``client-pause``  ``CLIENT PAUSE <ms> WRITE``: renewals, acquisitions and writes wait in Redis.
``ttl``           ``PEXPIRE <hold> 1``: the TTL-shortening nemesis (stands in for a clock jump).
``kill``          SIGKILL the holder (while more than two workers live); figures: time to recover
                  (until Redis shows the next owner).  A victim killed before it logged its
                  acquisition leaves no section: overlaps with it are not counted.
``evict``         write volatile filler keys at ``fill_rate``, so that a server with a small
                  ``maxmemory`` and a ``volatile-*`` policy (:func:`configure_eviction`) evicts the
                  lock's hold; evictions are counted through keyspace notifications.

Every fault but ``evict`` waits for a *new* hold (its owner or token changes) and strikes at once,
so it lands at the start of a critical section, where it does the most harm.

The oracles (:class:`LockResult`):

* **overlaps**: pairs of critical sections of different workers whose ``[enter, exit]`` intersect.
  ``enter`` is taken after ``acquire()`` returned and ``exit`` before ``release()`` is called, so
  an overlap means two workers were each told they held the lock at the same moment.
* **stale accepted**: an acknowledged write whose token is lower than the token of an acquisition
  that had *completed* (returned to its worker) before the write was invoked.  Redis had issued the
  newer token before the write was sent, so the write should have been refused.
* **lost appends**: acknowledged appends whose id is missing from the final list (``counter``
  mode: acknowledged increments minus the final value, when positive); **duplicates**:
  ids found more than once; **refused but applied**: ids of writes refused with ``StaleFence`` found
  in the final list; **order violations**: ids in the final list preceded by an id of a newer
  token (fenced writes must land in token order).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import logging
import multiprocessing as mp
import os
import queue
import random
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from ..config import MapConfig
from ..errors import (
    LockLost,
    LockNotAcquired,
    StaleFence,
    SyncMapError,
    WriteOutcomeUnknown,
)
from ..keys import Layout, LockLayout, bucket_of, encode_key
from ..lock import Lock
from ..map import SyncMap
from ..store.endpoint import Endpoint
from ..store.topology import open_topology
from .faults import admin_client
from .lockcheck import (
    Evictions,
    FaultEvent,
    FaultKind,
    LockLoad,
    LockResult,
    analyse,
)
from .wait import wait_until

_EXPIRE_IF_OWNER = """
if redis.call('HGET', KEYS[1], 'o') == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], 1) end
return 0
"""


def _usleep() -> Callable[[int], int]:
    """libc ``usleep`` called through a PyDLL: the GIL stays held for the whole sleep."""
    fn: Any = ctypes.PyDLL(None).usleep
    fn.argtypes = [ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


def _worker(
    cfg: LockLoad,
    index: int,
    log_path: str,
    deadline: Any,
    stall_ms: Any,
    stall_end: Any,
    ready: Any,
    go: Any,
) -> None:
    """Body of one worker process (module level: the spawn context imports it by name)."""
    rng = random.Random(cfg.seed * 1_000 + index)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def log(**record: Any) -> None:
        os.write(fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())

    usleep = _usleep()

    def stall(_signum: int, _frame: object) -> None:
        start = time.monotonic_ns()
        usleep(max(0, int(stall_ms[index])) * 1000)
        end = time.monotonic_ns()
        stall_end[index] = end
        log(e="stall", w=index, start=start, end=end)

    signal.signal(signal.SIGUSR1, stall)
    if cfg.quiet:
        logging.getLogger("syncmap.lock").setLevel(logging.CRITICAL)
    owner = f"w{index}-{uuid.uuid4().hex[:8]}"
    if cfg.driver(index) == "async":
        from .alockload import aworker  # noqa: PLC0415 - the asyncio worker's modules

        asyncio.run(aworker(cfg, index, owner, rng, log, (deadline, ready, go)))
    else:
        _sync_worker(cfg, index, owner, rng, log, (deadline, ready, go))
    log(e="done", w=index, at=time.monotonic_ns())
    os.close(fd)


def _sync_worker(cfg: LockLoad, index: int, owner: str, rng: random.Random,
                 log: Callable[..., None], shared: tuple[Any, Any, Any]) -> None:  # fmt: skip
    deadline, ready, go = shared
    lock = Lock(cfg.lock, cfg.url, lease=cfg.lease, owner=owner, namespace=cfg.namespace,
                hash_tag=cfg.hash_tag)  # fmt: skip
    with SyncMap(cfg.map, cfg.url, node_id=f"lockload-{owner}") as m:
        m.get(cfg.key, consistent=True)  # connections open before the clock starts
        ready.put((index, os.getpid(), owner))
        if not go.wait(120):
            return
        end_ns = int(deadline.value)
        n = 0
        while time.monotonic_ns() < end_ns:
            n += 1
            _iteration(cfg, m, lock, rng, index, n, end_ns, log)


def _iteration(
    cfg: LockLoad,
    m: SyncMap,
    lock: Lock,
    rng: random.Random,
    index: int,
    n: int,
    end_ns: int,
    log: Callable[..., None],
) -> None:
    call = time.monotonic_ns()
    try:
        fence = lock.acquire(timeout=max(0.001, (end_ns - call) / 1e9))
    except LockNotAcquired:
        log(e="acq", w=index, call=call, ret=time.monotonic_ns(), ok=False)
        return
    except SyncMapError as exc:  # Redis unavailable, OOM: count it, and try again
        log(e="acq", w=index, call=call, ret=time.monotonic_ns(), ok=False, err=repr(exc))
        time.sleep(0.01)  # pacing the retries, not waiting for anything
        return
    enter = time.monotonic_ns()
    token = int(fence)
    log(e="acq", w=index, call=call, ret=enter, ok=True, tok=token)
    write: dict[str, Any] | None = None
    wid = f"w{index}-{n}"
    try:
        old: Any = m.get(cfg.key, 0 if cfg.mode == "counter" else [], consistent=True)
        time.sleep(rng.uniform(cfg.cs_min, cfg.cs_max))  # the work of the critical section
        new: Any = int(old) + 1 if cfg.mode == "counter" else [*old, wid]
        wcall = time.monotonic_ns()
        outcome, err = "ok", ""
        try:
            m.set(cfg.key, new, fence=fence if cfg.fenced else None)
        except StaleFence:
            outcome = "stale"
        except WriteOutcomeUnknown as exc:
            outcome, err = "unknown", repr(exc)
        except SyncMapError as exc:
            outcome, err = "error", repr(exc)
        write = {"call": wcall, "ret": time.monotonic_ns(), "id": wid, "out": outcome, "err": err}
    except SyncMapError as exc:  # the read failed: no write
        write = {"call": 0, "ret": 0, "id": "", "out": "noread", "err": repr(exc)}
    exit_ = time.monotonic_ns()
    released = "ok"
    try:
        lock.release()
    except LockLost:
        released = "lost"
    except SyncMapError:
        released = "error"
    log(e="cs", w=index, tok=token, enter=enter, exit=exit_, write=write, rel=released)


# ---- the controller ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Victim:
    index: int
    pid: int
    owner: str
    alive: bool = True


def configure_eviction(admin: redis.Redis, headroom: int, policy: str = "volatile-lru") -> int:
    """Let the server use ``headroom`` bytes above what it uses now, then evict by ``policy``.

    Returns the ``maxmemory`` set.  Meant for a server of one's own (a test's, a torture run's).
    """
    used = int(admin.info("memory")["used_memory"])
    admin.config_set("maxmemory", used + headroom)
    admin.config_set("maxmemory-policy", policy)
    return used + headroom


def placed(cfg: LockLoad) -> LockLoad:
    """``cfg`` with its lock in the slot of ``key``'s bucket on a Redis Cluster (``hash_tag``,
    as ``map.lock(key)`` places one); as it is elsewhere."""
    if cfg.hash_tag is not None or not open_topology(cfg.url).sharded:
        return cfg
    defaults = MapConfig()
    layout = Layout("sm", cfg.map, defaults.buckets)  # the workers' maps: default namespace
    bucket = bucket_of(encode_key(cfg.key, defaults.max_key_bytes), defaults.buckets)
    return dataclasses.replace(cfg, hash_tag=layout.bucket_tag(bucket))


def run(cfg: LockLoad) -> LockResult:
    """Run the workload with its fault; the figures after every worker has stopped."""
    if cfg.workers < 2:
        raise ValueError("a lock workload needs at least 2 workers")
    cfg = placed(cfg)
    ctx = mp.get_context("spawn")
    logdir = Path(tempfile.mkdtemp(prefix="syncmap-lockload-"))
    deadline: Any = ctx.RawValue("q", 0)
    stall_ms: Any = ctx.RawArray("q", cfg.workers)
    stall_end: Any = ctx.RawArray("q", cfg.workers)
    ready: Any = ctx.Queue()
    go = ctx.Event()
    procs = [
        ctx.Process(
            target=_worker,
            args=(cfg, i, str(logdir / f"w{i}.jsonl"), deadline, stall_ms, stall_end, ready, go),
            name=f"lockload-w{i}",
            daemon=True,
        )
        for i in range(cfg.workers)
    ]
    layout = LockLayout(cfg.namespace, cfg.lock, cfg.hash_tag)
    # The lock's own node (on a Cluster the master of its slot): the nemesis reads the holder
    # there, and client-pause holds that node's writes, the renewals and fenced writes alike.
    admin = admin_client(cfg.url, key=layout.hold)
    evictions = Evictions()
    try:
        with SyncMap(cfg.map, cfg.url, node_id="lockload-controller") as m:
            m.delete(cfg.key)
        for p in procs:
            p.start()
        victims = _started(procs, ready)
        t0 = time.monotonic_ns()
        deadline.value = t0 + int(cfg.seconds * 1e9)
        go.set()
        nemesis = _Nemesis(cfg, admin, layout, victims, int(deadline.value), stall_ms, stall_end)
        faults = nemesis.run(evictions)
        for p in procs:
            p.join(timeout=max(1.0, (deadline.value - time.monotonic_ns()) / 1e9) + 30)
        elapsed = (time.monotonic_ns() - t0) / 1e9
        stuck = [p.name for p in procs if p.is_alive()]
        if stuck:
            raise RuntimeError(f"lock workload: workers {stuck} did not stop")
        records = _read_logs(logdir)
    finally:
        for p in procs:
            if p.is_alive() and p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.join(5)
        admin.close()
        shutil.rmtree(logdir, ignore_errors=True)
    with SyncMap(cfg.map, cfg.url, node_id="lockload-checker") as m:
        final = m.get(cfg.key, consistent=True)
    killed = {f.worker: f.start_ns for f in faults if f.kind == "kill" and f.worker is not None}
    return analyse(cfg, records, faults, final, killed, elapsed, evictions)


def _started(procs: list[Any], ready: Any, timeout: float = 120) -> dict[int, _Victim]:
    """Each worker's (index, pid, owner) once it is ready; a worker that died fails at once."""
    victims: dict[int, _Victim] = {}
    give_up = time.monotonic() + timeout
    while len(victims) < len(procs):
        try:
            i, pid, owner = ready.get(timeout=0.2)
        except queue.Empty:
            dead = [f"{p.name} (exit {p.exitcode})" for p in procs if p.exitcode is not None]
            if dead or time.monotonic() > give_up:
                raise RuntimeError(f"lock workload: workers did not start: {dead}") from None
            continue
        victims[i] = _Victim(i, pid, owner)
    return victims


def _read_logs(logdir: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in sorted(logdir.glob("w*.jsonl")):
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a killed worker's last line
                out.append(json.loads(line))
    return out


class _Nemesis:
    """Applies ``cfg.fault`` from the calling process until every fault can end in time."""

    def __init__(
        self,
        cfg: LockLoad,
        admin: redis.Redis,
        layout: LockLayout,
        victims: dict[int, _Victim],
        deadline_ns: int,
        stall_ms: Any,
        stall_end: Any,
    ) -> None:
        self.cfg = cfg
        self.admin = admin
        self.layout = layout
        self.victims = victims
        self.deadline_ns = deadline_ns
        self.stall_ms = stall_ms
        self.stall_end = stall_end
        self.rng = random.Random(cfg.seed)
        # The last fault must be over (and its victim running) before the workers stop.
        self.stop_ns = deadline_ns - int((cfg.stall[1] * cfg.lease + 0.2) * 1e9)

    def run(self, evictions: Evictions) -> list[FaultEvent]:
        kind = self.cfg.fault
        if kind == "none":
            return []
        if kind == "evict":
            return self._fill(evictions)
        strike = {
            "sigstop": self._sigstop,
            "gil": self._gil,
            "client-pause": self._client_pause,
            "ttl": self._ttl,
            "kill": self._kill,
        }[kind]
        events: list[FaultEvent] = []
        previous: tuple[str, bytes] | None = None
        while time.monotonic_ns() < self.stop_ns:
            if kind == "kill" and sum(v.alive for v in self.victims.values()) <= 2:
                break
            hold = self._next_holder(previous)
            if hold is None:
                continue
            previous = hold
            victim = self._victim(hold[0])
            if victim is None:  # not one of ours, or killed already
                continue
            events.append(strike(victim))
            time.sleep(self.rng.uniform(0.5, 1.5) * self.cfg.fault_gap)  # the fault schedule
        return events

    def _owner(self) -> str | None:
        raw = self.admin.hget(self.layout.hold, "o")
        return raw.decode(errors="replace") if isinstance(raw, bytes) else None

    def _hold(self) -> tuple[str, bytes] | None:
        """(owner, token) of the hold in force: the same worker re-acquiring is a new hold."""
        owner, token = self.admin.hmget(self.layout.hold, ["o", "t"])
        if not isinstance(owner, bytes) or not isinstance(token, bytes):
            return None
        return owner.decode(errors="replace"), token

    def _next_holder(self, previous: tuple[str, bytes] | None) -> tuple[str, bytes] | None:
        """The hold in force as soon as it differs from ``previous`` (None: none came in time)."""
        seen: list[tuple[str, bytes] | None] = [None]

        def changed() -> bool:
            seen[0] = self._hold()
            return seen[0] is not None and seen[0] != previous

        left = (self.stop_ns - time.monotonic_ns()) / 1e9
        if left <= 0:
            return None
        try:
            wait_until(changed, min(left, 5 * self.cfg.lease + 2), "a new lock holder")
        except AssertionError:
            return None
        return seen[0]

    def _victim(self, owner: str) -> _Victim | None:
        with contextlib.suppress(ValueError):
            victim = self.victims.get(int(owner.split("-", 1)[0][1:]))
            if victim is not None and victim.owner == owner and victim.alive:
                return victim
        return None

    def _length(self) -> float:
        return self.rng.uniform(*self.cfg.stall) * self.cfg.lease

    def _sigstop(self, v: _Victim) -> FaultEvent:
        length = self._length()
        start = time.monotonic_ns()
        os.kill(v.pid, signal.SIGSTOP)
        try:
            hit = self._owner() == v.owner
            time.sleep(length)  # the fault's length: the holder stays stopped this long
        finally:
            os.kill(v.pid, signal.SIGCONT)
        return FaultEvent("sigstop", v.index, start, time.monotonic_ns(), hit, f"{length:.3f} s")

    def _gil(self, v: _Victim) -> FaultEvent:
        length = self._length()
        self.stall_ms[v.index] = round(length * 1000)
        self.stall_end[v.index] = 0
        start = time.monotonic_ns()
        os.kill(v.pid, signal.SIGUSR1)
        hit = self._owner() == v.owner
        wait_until(lambda: self.stall_end[v.index] > start, length + 10, "the GIL stall to end")
        end = int(self.stall_end[v.index])
        return FaultEvent("gil", v.index, start, end, hit, f"{length:.3f} s")

    def _client_pause(self, v: _Victim) -> FaultEvent:
        length = self._length()
        start = time.monotonic_ns()
        self.admin.client_pause(round(length * 1000), all=False)
        try:
            hit = self._owner() == v.owner
            time.sleep(length)  # the fault's length (Redis would end the pause by itself too)
        finally:
            self.admin.client_unpause()
        return FaultEvent("client-pause", v.index, start, time.monotonic_ns(), hit,
                          f"{length:.3f} s")  # fmt: skip

    def _ttl(self, v: _Victim) -> FaultEvent:
        start = time.monotonic_ns()
        hit = bool(self.admin.eval(_EXPIRE_IF_OWNER, 1, self.layout.hold, v.owner))
        return FaultEvent("ttl", v.index, start, time.monotonic_ns(), hit, "PEXPIRE 1")

    def _kill(self, v: _Victim) -> FaultEvent:
        """SIGKILL; the fault ends when Redis shows the next owner (its ``end_ns - start_ns`` is
        the time to recover: the victim may die before it logs its acquisition)."""
        start = time.monotonic_ns()
        os.kill(v.pid, signal.SIGKILL)
        v.alive = False
        hit = self._owner() == v.owner
        try:
            wait_until(lambda: self._owner() not in (None, v.owner), 3 * self.cfg.lease + 5,
                       "another holder after the kill")  # fmt: skip
        except AssertionError:
            return FaultEvent("kill", v.index, start, start, hit, "SIGKILL, never recovered")
        end = time.monotonic_ns()
        return FaultEvent("kill", v.index, start, end, hit, "SIGKILL")

    def _fill(self, evictions: Evictions) -> list[FaultEvent]:
        """Volatile filler keys at ``fill_rate`` until ``stop_ns``; evictions counted."""
        cfg = self.cfg
        db = Endpoint.from_client(self.admin).db
        before = self.admin.config_get("notify-keyspace-events").get("notify-keyspace-events") or ""
        self.admin.config_set("notify-keyspace-events", "Ee")
        stats = self.admin.info("stats")
        evicted_before = int(stats.get("evicted_keys", 0))
        pubsub = self.admin.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call,unused-ignore]
        pubsub.subscribe(f"__keyevent@{db}__:evicted")
        hold, fence = self.layout.hold.encode(), self.layout.fence.encode()
        done = threading.Event()

        def listen() -> None:
            while not done.is_set():
                msg = pubsub.get_message(timeout=0.05)
                if msg is None:
                    continue
                evictions.hold += msg["data"] == hold
                evictions.fence += msg["data"] == fence

        listener = threading.Thread(target=listen, name="lockload-evictions", daemon=True)
        listener.start()
        blob = b"x" * cfg.fill_bytes
        batch = max(1, round(cfg.fill_rate / 50))
        start = time.monotonic_ns()
        n = refused = 0
        try:
            while time.monotonic_ns() < self.stop_ns:
                pipe = self.admin.pipeline(transaction=False)
                for _ in range(batch):
                    pipe.set(f"lockload:fill:{n}", blob, px=600_000)
                    n += 1
                replies = pipe.execute(raise_on_error=False)
                refused += sum(isinstance(r, Exception) for r in replies)
                time.sleep(batch / cfg.fill_rate)  # pacing the filler, not waiting for anything
        finally:
            end = time.monotonic_ns()
            done.set()
            listener.join(5)
            pubsub.close()
            self.admin.config_set("notify-keyspace-events", before)
        evictions.total = int(self.admin.info("stats").get("evicted_keys", 0)) - evicted_before
        detail = f"{n} filler keys of {cfg.fill_bytes} B, {refused} refused"
        return [FaultEvent("evict", None, start, end, evictions.hold > 0, detail)]


# ---- the oracles ------------------------------------------------------------------------------


__all__ = ["FaultKind", "LockLoad", "LockResult", "configure_eviction", "run"]
