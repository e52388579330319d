"""The demo's server processes: each opens the demo map and reads, writes and locks it.

A server reads (mostly from its near cache) and writes with a Zipf skew, takes the key's lock
for a few writes (a fenced read-modify-write), and sends a :class:`Report` to the demo process
four times a second over its own pipe, then once more at the end with what its near cache would
serve.  A probe process writes its send time so every server can measure propagation delay.
Split from demo.py (STYLE: a module is one concept, ~400 lines).
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from ..core.nearcache import Event
from ..errors import LockLost, LockNotAcquired, StaleFence, StoreError
from ..map import SyncMap

MAP = "demo"
KEYS = 200
HOT = 10  # the convergence check samples the hottest keys
PROBE_KEY = "probe:sent-at"
WRITE_SHARE = 0.1
LOCK_SHARE = 0.05  # of the writes: a fenced read-modify-write under the key's lock
REPORT_EVERY = 0.25


@dataclass
class Report:
    """What one server process sends to the demo four times a second (and once at the end)."""

    node: str
    t: float = 0.0  # time.monotonic() when sent: one clock for every process here
    reads: int = 0
    writes: int = 0
    hits: int = 0
    misses: int = 0
    entries: int = 0
    resyncs: int = 0
    locks: int = 0
    lock_timeouts: int = 0
    locks_lost: int = 0
    delays_ms: list[float] = field(default_factory=list)
    probe_arrivals: list[float] = field(default_factory=list)
    lock_waits_ms: list[float] = field(default_factory=list)
    sample: dict[str, int] = field(default_factory=dict)  # hot key -> cached version
    final: dict[str, tuple[Any, int]] | None = None
    ends_at: float = 0.0  # time.monotonic() when this server stops its reads and writes
    errors: int = 0  # calls that failed: Redis down or failing over (--sentinel --chaos)


def _hot_keys() -> list[str]:
    return [f"user:{i}" for i in range(HOT)]


def server(url: str, node: str, seconds: float, out: Connection, quiet: bool = False,
           start: Any = None) -> None:  # fmt: skip
    """One demo server: Zipf-skewed reads (90 %) and writes (10 %; 5 % of them under a lock).

    ``start``: a barrier of every server, so that their runs begin together once all are up
    (spawning them may take seconds on a slow machine, one after another)."""
    if quiet:  # the live view shows chaos and healing itself; log lines would tear it
        logging.getLogger("syncmap").setLevel(logging.ERROR)
    rng = random.Random(node)
    keys = [f"user:{i}" for i in range(KEYS)]
    weights = [1 / (i + 1) for i in range(KEYS)]
    hot = _hot_keys()
    delays: list[float] = []
    arrivals: list[float] = []
    with SyncMap(MAP, url, node_id=node) as m:

        def on_change(event: Event) -> None:
            # The probe writes its send time; the event's arrival time is taken first.
            if event.key == PROBE_KEY:
                arrived = time.monotonic_ns()
                try:
                    sent, version, _ = m.get_with_meta(PROBE_KEY, consistent=True)
                except StoreError:
                    return
                if version == event.version and isinstance(sent, int):
                    delays.append((arrived - sent) / 1e6)
                    arrivals.append(arrived / 1e9)

        m.subscribe(on_change)
        if start is not None:
            start.wait(60)
        end = time.monotonic() + seconds
        rep = Report(node, ends_at=end)
        next_report = time.monotonic() + REPORT_EVERY
        while time.monotonic() < end:
            try:
                _one_call(m, rng, rng.choices(keys, weights)[0], node, rep)
            except StoreError:
                rep.errors += 1
            time.sleep(0.001)  # pacing: a server doing other work between map calls
            if time.monotonic() >= next_report:
                rep.sample = _sample(m, hot)
                _flush(m, rep, delays, arrivals, out)
                next_report = time.monotonic() + REPORT_EVERY
        time.sleep(m.config.max_staleness + 0.3)  # the contract: caches converge within it
        rep.final = {}
        for k in list(m._entries):
            # What this server would serve: an entry whose lease ran out is re-read on access.
            if m._servable(k) is not None and (cached := m.peek(k)) is not None:
                rep.final[str(k)] = cached
        rep.sample = _sample(m, hot)
        _flush(m, rep, delays, arrivals, out)


def _one_call(m: SyncMap, rng: random.Random, key: str, node: str, rep: Report) -> None:
    if rng.random() < WRITE_SHARE:
        if rng.random() < LOCK_SHARE:
            _locked_write(m, key, node, rep)
        else:
            m.set(key, {"by": node, "visits": rep.writes})
        rep.writes += 1
    else:
        m.get(key)
        rep.reads += 1


def _locked_write(m: SyncMap, key: str, node: str, rep: Report) -> None:
    """A read-modify-write under the key's lock; the fence makes a stale holder's write fail."""
    lock = m.lock(key, lease=5.0)
    asked = time.monotonic()
    try:
        fence = lock.acquire(timeout=5.0)
    except LockNotAcquired:
        rep.lock_timeouts += 1
        return
    rep.lock_waits_ms.append((time.monotonic() - asked) * 1000)
    rep.locks += 1
    try:
        current = m.get(key, consistent=True)
        visits = current.get("visits", 0) + 1 if isinstance(current, dict) else 1
        m.set(key, {"by": node, "visits": visits, "locked": True}, fence=fence)
    except (LockLost, StaleFence):
        rep.locks_lost += 1
    finally:
        try:
            lock.release()
        except LockLost:
            rep.locks_lost += 1


def _sample(m: SyncMap, hot: list[str]) -> dict[str, int]:
    sample = {}
    for k in hot:
        if m._servable(k) is not None and (cached := m.peek(k)) is not None:
            sample[k] = cached[1]
    return sample


def _flush(m: SyncMap, rep: Report, delays: list[float], arrivals: list[float], out: Connection
           ) -> None:  # fmt: skip
    s = m.statistics()
    rep.hits, rep.misses, rep.entries, rep.resyncs = s.hits, s.misses, s.entries, s.resyncs
    rep.delays_ms, delays[:] = list(delays), []
    rep.probe_arrivals, arrivals[:] = list(arrivals), []
    rep.t = time.monotonic()
    out.send(rep)
    rep.lock_waits_ms = []


def probe_writer(url: str, stop: Any, quiet: bool = False) -> None:
    """Writes its send time (monotonic ns, one clock for every process here) every 50 ms."""
    if quiet:
        logging.getLogger("syncmap").setLevel(logging.ERROR)
    with SyncMap(MAP, url, node_id="probe") as m:
        while not stop.is_set():
            with contextlib.suppress(StoreError):  # failing over (--sentinel): the next one will do
                m.set(PROBE_KEY, time.monotonic_ns())
            stop.wait(0.05)
