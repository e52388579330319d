"""Fleet: what idle maps cost Redis, per map instance, and at 1,000 processes x 10 maps.

DESIGN §4: "cost grows with writes, not with deployments": 1,000 idle processes x 10 maps ≤ 5 %
of one Redis core and ≤ 2 connections per process per Redis node, threads per process independent
of how many maps it has.  This section measures where syncmap stands (issue 16, goal 1).

It starts a private ``redis-server`` on a free port (never the run's ``--url``: its CPU and its
command counts must be the fleet's alone) and N worker processes (``spawn``, :mod:`.workers`).
For each map count M (one window each, in the plan's order): every process opens the same M maps
with the default configuration, nobody reads or writes, and after ``settle`` seconds the section
takes, over ``window`` seconds:

* Redis ``INFO commandstats`` deltas: calls/s and µs/s per command (EVALSHA, HSET, PEXPIRE, ...).
  This section's own ``INFO`` calls are left out.  Redis counts a command a script runs as well as
  the EVALSHA that ran it, so the total counts both; the requests clients sent are those counts
  times the share of each command that MONITOR saw come from a client, after the window;
* Redis ``INFO cpu`` deltas: ``used_cpu_sys + used_cpu_user`` per second = the fraction of one
  core, and the same for the main thread where the server reports it;
* ``connected_clients`` at the end (less this section's own client);
* per process, after the window: its threads (``/proc/self/task``) and its TCP connections to
  the Redis port (``/proc/self/net/tcp`` matched with its socket file descriptors).

M = 0 is the processes with no map open: the server's own background work (``hz``), which does
not grow with the fleet.  The extrapolation to 1,000 x 10 is linear: that fixed part, plus
1,000 / N times the per-N-processes cost at 10 maps, fitted (least squares) over the M ≥ 1 windows.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from multiprocessing.queues import Queue
from typing import Any

import redis

from .. import MapConfig, SyncMap, SyncMapError
from ..embedded import EmbeddedRedis
from .context import Bench
from .fleetreport import TITLE, Window, section
from .method import Row, Section
from .workers import Pool, serve

OURS = "INFO"  # this section's own commands, left out of the counts


@dataclass(frozen=True, slots=True)
class FleetPlan:
    processes: int  # N idle server processes
    maps: tuple[int, ...]  # map counts per process, one window each (0: processes, no map)
    window: float  # seconds measured per map count
    settle: float  # seconds between the maps opening and the window
    monitor: float  # seconds of MONITOR after the window: the clients' own requests


# ---- the worker processes -------------------------------------------------------------------


def worker(wid: int, cmds: Queue[Any], out: Queue[Any], url: str, ns: str, port: int) -> None:
    """An idle server: opens the maps it is told to, reports its threads and connections."""
    maps: list[SyncMap] = []

    def handle(cmd: tuple[Any, ...]) -> Any:
        if cmd[0] == "open":
            maps.extend(SyncMap(n, url=url, config=MapConfig(namespace=ns)) for n in cmd[1])
            return None
        if cmd[0] == "look":
            return look(port)
        while maps:  # "close"
            maps.pop().close()
        return None

    serve(wid, cmds, out, handle)


def look(port: int) -> dict[str, int | None]:
    """This process's threads (the OS's count, and Python's) and TCP connections to ``port``."""
    try:
        threads: int | None = len(os.listdir("/proc/self/task"))
    except OSError:  # not Linux
        threads = None
    return {"threads": threads, "python_threads": threading.active_count(),
            "connections": connections_to(port)}  # fmt: skip


def connections_to(port: int) -> int | None:
    """Established TCP connections of this process whose remote port is ``port`` (Linux)."""
    inodes = set()
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for fd in fds:
        with contextlib.suppress(OSError):  # closed since the listing
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    found = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)  # the header
            for line in f:
                # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
                cols = line.split()
                remote_port = int(cols[2].rsplit(":", 1)[1], 16)
                if cols[3] == "01" and remote_port == port and cols[9] in inodes:
                    found += 1
    return found


# ---- one window -----------------------------------------------------------------------------


def _snapshot(client: redis.Redis) -> tuple[float, dict[str, Any], dict[str, Any], int]:
    """One round trip: commandstats, cpu, clients; and when it was taken."""
    pipe = client.pipeline(transaction=False)
    pipe.info("commandstats")
    pipe.info("cpu")
    pipe.info("clients")
    stats, cpu, clients = pipe.execute()
    return time.monotonic(), stats, cpu, int(clients["connected_clients"])


def sent_shares(client: redis.Redis, seconds: float) -> dict[str, float]:
    """Per command, the share of its calls that clients sent (the rest: scripts' own), from
    ``seconds`` of MONITOR (a script's lines say ``[db lua]``).

    ``INFO commandstats`` counts a script's own commands as well as the EVALSHA that ran it; this
    share splits the window's counts.  MONITOR runs after the window, not in it, and only a share
    is taken from it, not a rate: feeding a monitor and parsing its lines cost CPU on the same
    cores as the fleet, which then probes less often.  Lines are read until one is stamped past
    the end (a reader that falls behind still sees exactly those ``seconds``).
    """
    sent: dict[str, int] = {}
    run: dict[str, int] = {}
    where = client.connection_pool.connection_kwargs
    watcher = redis.Redis(host=where["host"], port=where["port"], socket_timeout=10)
    try:
        with watcher.monitor() as mon:  # type: ignore[no-untyped-call]
            # The server stamps lines with its wall clock: this host's, as time.time() reads it.
            start = time.time()
            end = start + seconds
            while time.time() < end + 30:  # a reader 30 s behind gives up
                # can_read, not a socket timeout: redis-py drops a connection whose read timed out.
                if not mon.connection.can_read(timeout=0.2):
                    if time.time() > end + 0.5:  # no command after the end: an idle server
                        break
                    continue
                line = mon.connection.read_response()
                text = line.decode() if isinstance(line, bytes) else str(line)
                stamp, rest = text.split(" ", 1)  # 1733580000.123456 [0 127.0.0.1:41234] "EVALSHA"
                if float(stamp) >= end:
                    break
                who, _, command = rest.partition('] "')
                if float(stamp) >= start:
                    name = command.split('"', 1)[0].upper()
                    run[name] = run.get(name, 0) + 1
                    if not who.endswith(" lua"):
                        sent[name] = sent.get(name, 0) + 1
    finally:
        watcher.close()
    return {name: sent.get(name, 0) / n for name, n in run.items()}


def _requests(calls: dict[str, float], shares: dict[str, float]) -> dict[str, float]:
    """The window's calls/s that clients sent.  A command MONITOR did not see (a rare one, such
    as the subscriber's PING every 2 s, in a short MONITOR) counts as sent: syncmap's scripts run
    data commands, which every probe runs."""
    found = {name: rate * shares.get(name, 1.0) for name, rate in calls.items()}
    return {name: rate for name, rate in sorted(found.items(), key=lambda kv: -kv[1]) if rate}


def _cpu(info: dict[str, Any], suffix: str = "") -> float | None:
    sys_, user = info.get(f"used_cpu_sys{suffix}"), info.get(f"used_cpu_user{suffix}")
    return None if sys_ is None or user is None else float(sys_) + float(user)


def measure(client: redis.Redis, pool: Pool, plan: FleetPlan, m: int) -> Window:
    """Open ``m`` maps in every process, settle, measure one window, close them."""
    wids = range(plan.processes)
    names = [f"fleet{m}-{i}" for i in range(m)]
    try:
        if names:
            pool.ask(wids, ("open", names), 60 + 5 * m)
        time.sleep(plan.settle)  # the maps' opening round trips are over
        t0, stats0, cpu0, _ = _snapshot(client)
        time.sleep(plan.window)
        t1, stats1, cpu1, clients = _snapshot(client)
        shares = sent_shares(client, plan.monitor)
        looks = pool.ask(wids, ("look",), 30)
    finally:
        pool.ask(wids, ("close",), 60 + 5 * m)
    dt = t1 - t0
    calls, usec = {}, {}
    for key, after in stats1.items():
        name = key.removeprefix("cmdstat_").upper()
        before = stats0.get(key, {})
        if name != OURS and after["calls"] > before.get("calls", 0):
            calls[name] = (after["calls"] - before.get("calls", 0)) / dt
            usec[name] = (after["usec"] - before.get("usec", 0)) / dt
    main0, main1 = _cpu(cpu0, "_main_thread"), _cpu(cpu1, "_main_thread")
    return Window(
        m, plan.processes, dt, dict(sorted(calls.items(), key=lambda kv: -kv[1])),
        _requests(calls, shares), usec,
        ((_cpu(cpu1) or 0.0) - (_cpu(cpu0) or 0.0)) / dt,
        None if main0 is None or main1 is None else (main1 - main0) / dt,
        clients - 1,  # this section's client
        *([looks[w][k] for w in wids] for k in ("threads", "python_threads", "connections")),
    )  # fmt: skip


# ---- the section ----------------------------------------------------------------------------


def run(b: Bench, plan: FleetPlan) -> Section:
    try:
        server = EmbeddedRedis().start()
    except SyncMapError as exc:
        why = f"not measured: no private redis-server ({exc})"
        return Section("fleet", TITLE, [Row("idle maps' cost to Redis", "/s", None, absent=why,
                                            key="fleet.absent")], notes=[why])  # fmt: skip
    windows: list[Window] = []
    try:
        client = server.client()
        hz = client.config_get("hz").get("hz", "?")
        pool = Pool.start(worker, plan.processes, (server.url, b.ns, server.port))
        try:
            windows = [measure(client, pool, plan, m) for m in plan.maps]
        finally:
            pool.stop()
            client.close()
    finally:
        server.stop()
    return section(windows, plan, f"{server.label}, hz {hz}")
