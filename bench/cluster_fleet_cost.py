"""What idle maps cost a Redis Cluster, with PING leases and without (``ping_leases=False``: a
probe of every bucket every Δ/4, as every Cluster map did before).

    python bench/cluster_fleet_cost.py [processes] [maps] [window]     (default 10 10 10)

Starts a 3 + 3 cluster (``ClusterSet``), then for each variant (no maps; leases off; leases
on) ``processes`` idle processes (``spawn``) each open ``maps`` maps, wait 3 s to settle, and
over ``window`` seconds the masters' ``INFO commandstats`` (calls/s summed over the three, each
command a script runs counted too) and ``INFO cpu`` (user + sys: the share of one core summed
over the three masters), and ``connected_clients`` on the masters at the end.  The replicas'
CPU is left out (they replay writes; an idle fleet writes only presence records).
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from typing import Any

from syncmap import MapConfig, SyncMap
from syncmap.embedded import find_redis_server
from syncmap.testing.clusterset import ClusterSet

SETTLE = 3.0


def idle(url: str, maps: int, leases: bool, ready: Any, stop: Any) -> None:
    opened = [SyncMap(f"fleet{i}", url, config=MapConfig(ping_leases=leases)) for i in range(maps)]
    ready.release()
    stop.wait()
    for m in opened:
        m.close()


def sample(cs: ClusterSet) -> tuple[dict[str, int], float, int]:
    calls: dict[str, int] = {}
    cpu, clients = 0.0, 0
    for node in cs.masters():
        c = cs.node_client(node.addr)
        for name, stat in c.info("commandstats").items():
            calls[name] = calls.get(name, 0) + int(stat["calls"])
        info = c.info("cpu")
        cpu += float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
        clients += int(c.info("clients")["connected_clients"]) - 1
        c.close()
    return calls, cpu, clients


def measure(cs: ClusterSet, processes: int, maps: int, leases: bool, window: float) -> str:
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Semaphore(0), ctx.Event()
    procs = [ctx.Process(target=idle, args=(cs.url, maps, leases, ready, stop))
             for _ in range(processes)]  # fmt: skip
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire()
    time.sleep(SETTLE)  # the subscribers' first reconnects (tracking) and probes settle
    calls0, cpu0, _ = sample(cs)
    time.sleep(window)
    calls1, cpu1, clients = sample(cs)
    stop.set()
    for p in procs:
        p.join(30)
    rates = {k[8:]: (calls1[k] - calls0.get(k, 0)) / window for k in calls1}
    rates = {k: v for k, v in rates.items() if v >= 0.5 and k not in ("info", "cluster|info")}
    top = ", ".join(f"{k} {v:.0f}" for k, v in sorted(rates.items(), key=lambda kv: -kv[1])[:6])
    label = "no maps" if maps == 0 else f"leases {'on ' if leases else 'off'}"
    return (
        f"{processes} x {maps} {label}: Redis CPU {100 * (cpu1 - cpu0) / window:5.2f} % of a "
        f"core (3 masters), {sum(rates.values()):6.0f} commands/s ({top}), "
        f"{clients} connections on the masters"
    )


def main() -> None:
    processes = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    maps = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    window = float(sys.argv[3]) if len(sys.argv) > 3 else 10.0
    with ClusterSet(binary=find_redis_server()) as cs:
        for m, leases in ((0, True), (maps, False), (maps, True)):
            print(measure(cs, processes, m, leases, window), flush=True)


if __name__ == "__main__":
    main()
