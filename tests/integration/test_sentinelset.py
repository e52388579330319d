"""The Sentinel fixture itself (``syncmap.testing.sentinelset``): it starts ready to fail over,
follows a failover, and leaves no process or temp dir behind, also when starting fails."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from syncmap import serverproc
from syncmap.errors import ConfigurationError
from syncmap.map import SyncMap
from syncmap.testing.faults import kill_subscribers, subscribers
from syncmap.testing.sentinelset import SentinelSet, parse_sentinel_url, sentinel_master_client
from syncmap.testing.wait import wait_until


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone as a server once it is not running.
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split(") ")[1][0] != "Z"


def test_the_set_is_ready_and_its_url_names_every_sentinel(sentinel_set: SentinelSet) -> None:
    s = sentinel_set
    assert s.url.startswith("redis+sentinel://") and s.url.endswith(f"/{s.service}/0")
    addrs, service, db = parse_sentinel_url(s.url)
    assert addrs == s.sentinel_addrs and len(addrs) == 3 and (service, db) == (s.service, 0)
    master = s.master_addr()
    assert s.named_masters()[master] == 3  # every Sentinel agrees
    assert s.role(master) == "master"
    replica = next((n.host, n.port) for n in s.nodes if (n.host, n.port) != master)
    assert s.role(replica) == "slave"
    client = sentinel_master_client(s.url, socket_timeout=1.0)
    try:
        client.set("k", "v")
    finally:
        client.close()
    assert s.node_at(master).client().get("k") == b"v"
    # client() is the master's (what a scenario faults); among its pub/sub clients a map's feed
    # is told apart from the Sentinels' own hello links (control: CLIENT LIST counts them all).
    with SyncMap("feeds", s.url) as m, s.client() as admin:
        m["a"] = 1
        assert admin.get("k") == b"v"
        everyone = [c for c in admin.client_list() if "P" in c["flags"]]
        assert len(everyone) == 1 + len(s.sentinels), everyone
        assert len(subscribers(admin)) == 1 and kill_subscribers(admin) == 1
        assert len(subscribers(admin)) <= 1  # the map's feed may be back already


def test_min_replicas_makes_a_lone_master_refuse_writes(sentinel_set: SentinelSet) -> None:
    s = sentinel_set
    s.set_min_replicas(1, max_lag=1)
    client = s.master_client(socket_timeout=1.0)
    client.set("k", "1")  # the replica is in touch
    replica = next(n for n in s.nodes if (n.host, n.port) != s.master_addr())
    replica.pause()
    try:
        with pytest.raises(Exception, match="NOREPLICAS"):
            wait_until(lambda: client.set("k", "2") is None, 10, "a refused write")
    finally:
        replica.resume()


def test_close_stops_every_process_and_removes_the_dirs(redis_binary: str) -> None:
    s = SentinelSet(binary=redis_binary)
    procs = [*s.nodes, *s.sentinels]
    pids = [p.pid for p in procs]
    dirs = [p.dir for p in procs]
    paused = s.pause_master()  # a stopped process must be stopped too
    assert paused.pid in pids
    s.close()
    assert not any(_alive(pid) for pid in pids if pid is not None)
    assert not any(d.exists() for d in dirs)
    s.close()  # idempotent


def test_a_failed_start_leaves_nothing_behind(redis_binary: str) -> None:
    """No time to get ready: the servers started so far are stopped (a leaked one would still be
    our child in /proc, and still in serverproc's list of live servers)."""
    live_before = set(serverproc._LIVE)
    children_before = _children()
    with pytest.raises(ConfigurationError, match="did not happen in time"):
        SentinelSet(binary=redis_binary, ready_timeout=0.0)
    assert set(serverproc._LIVE) == live_before
    assert not [p for p in _children() - children_before if _alive(p)]


def _children() -> set[int]:
    return {int(p) for p in os.listdir("/proc") if p.isdigit() and _child_of_us(int(p))}


def _child_of_us(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().split(") ")[1].split()[1]) == os.getpid()
    except (OSError, ValueError, IndexError):
        return False


def test_the_outages_doc_sentinel_example_runs(sentinel_set: SentinelSet) -> None:
    """docs/outages.md §Sentinel's code, pointed at this set: the map writes through Sentinel."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "outages.md").read_text()
    section = doc.split("\n## Sentinel\n", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    addrs = ",".join(f"{h}:{p}" for h, p in sentinel_set.sentinel_addrs)
    wanted = "s1:26379,s2:26379,s3:26379/mymaster/"
    assert wanted in code, code
    code = code.replace(wanted, f"{addrs}/{sentinel_set.service}/")
    scope: dict[str, object] = {}
    exec(compile(code, "docs/outages.md", "exec"), scope)  # our own documentation
    m, durable = scope["m"], scope["durable"]
    assert isinstance(m, SyncMap) and isinstance(durable, SyncMap)
    durable["d"] = 1  # a replica confirmed it (wait_replicas=1), or NotReplicated was raised
    durable.close()
    try:
        m["k"] = "v"
        assert m.get("k", consistent=True) == "v"
        master = sentinel_set.node_at(sentinel_set.master_addr())
        assert master.client().dbsize() > 0  # the map's keys are on the master the set names
    finally:
        m.close()
