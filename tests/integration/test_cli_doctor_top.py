"""``syncmap doctor`` and ``syncmap top`` end to end: the real commands in subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import redis

from syncmap import MapConfig, SyncMap
from syncmap.embedded import EmbeddedRedis, free_port
from syncmap.testing.wait import wait_until


def syncmap(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncmap.cli", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_doctor_on_a_default_server_passes(redis_server: EmbeddedRedis) -> None:
    run = syncmap("doctor", "--url", redis_server.url)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert any(line.startswith("OK   invalidation") for line in lines), run.stdout
    assert any(line.startswith("OK   connect") for line in lines)
    assert "mode standalone" in run.stdout
    # The embedded server runs without persistence: a warning, not a failure.
    assert any(line.startswith("WARN persistence") for line in lines)
    assert any(line.startswith("OK   durability") and "no replicas" in line for line in lines)
    assert any(line.startswith("OK   topology") and "standalone" in line for line in lines)
    client = redis_server.client()
    try:
        assert client.dbsize() == 0  # the test map's keys were deleted
    finally:
        client.close()


def test_doctor_warns_about_an_evicting_policy(
    redis_server: EmbeddedRedis, admin: redis.Redis
) -> None:
    admin.config_set("maxmemory", "100mb")
    admin.config_set("maxmemory-policy", "allkeys-lru")
    run = syncmap("doctor", "--url", redis_server.url, "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    doc = json.loads(run.stdout)
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks["memory"]["status"] == "WARN"
    assert "allkeys-lru" in checks["memory"]["detail"]
    assert "lock" in checks["memory"]["hint"]
    assert checks["invalidation"]["status"] == "OK"


def test_doctor_on_a_closed_port_exits_2_naming_the_url() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    run = syncmap("doctor", "--url", url)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stdout.startswith(f"FAIL connect  cannot reach {url}")
    assert "hint:" in run.stdout
    assert url in run.stderr


def _top(url: str, name: str) -> list[dict[str, object]]:
    run = syncmap("top", name, "--url", url, "--once", "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    servers: list[dict[str, object]] = json.loads(run.stdout)["servers"]
    return servers


def test_top_lists_every_open_map_and_forgets_a_closed_one(
    redis_server: EmbeddedRedis, admin: redis.Redis
) -> None:
    url = redis_server.url
    cfg = MapConfig(presence_interval=0.2)
    a = SyncMap("users", url, node_id="node-a", config=cfg)
    b = SyncMap("users", url, node_id="node-b", config=cfg)
    try:
        a["alice"] = 1
        for _ in range(10):
            assert b["alice"] == 1

        # The records exist from open(); wait for a refresh that saw b's reads.
        def refreshed() -> bool:
            raw = admin.hget("sm:presence:{users}", "node-b")
            return raw is not None and json.loads(raw)["hits"] >= 9

        wait_until(refreshed, 5, "a presence refresh that saw node-b's reads")
        servers = {s["node"]: s for s in _top(url, "users")}
        assert set(servers) == {"node-a", "node-b"}
        assert servers["node-b"]["entries"] == 1
        assert servers["node-b"]["hits"] >= 9  # type: ignore[operator]
        table = syncmap("top", "users", "--url", url, "--once")
        assert table.returncode == 0, table.stderr
        assert table.stdout.startswith("map users: 2 server(s)\nnode ")
        assert "node-a" in table.stdout and "node-b" in table.stdout
        b.close()
        assert [s["node"] for s in _top(url, "users")] == ["node-a"]
    finally:
        a.close()
        b.close()
    assert admin.exists("sm:presence:{users}") == 0


def test_presence_false_writes_no_presence_key(
    redis_server: EmbeddedRedis, admin: redis.Redis
) -> None:
    with SyncMap("quiet", redis_server.url, config=MapConfig(presence=False)) as m:
        m["k"] = 1
        assert m["k"] == 1
        assert admin.exists("sm:presence:{quiet}") == 0
    with SyncMap("loud", redis_server.url) as m:
        assert admin.hlen("sm:presence:{loud}") == 1
    assert admin.exists("sm:presence:{loud}") == 0


class _Counting:
    """A real executor that counts the round trips carrying a presence HSET (and their HSETs)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.where = inner, inner.where
        self.trips: list[int] = []

    def call(self, commands: Any, *, write: bool, partial: bool = False) -> list[Any]:
        hsets = sum(1 for c in commands if c[0] == "HSET" and ":presence:" in str(c[1]))
        if hsets:
            self.trips.append(hsets)
        return self.inner.call(commands, write=write, partial=partial)  # type: ignore[no-any-return]


def test_a_process_refreshes_its_maps_presence_in_one_round_trip(
    redis_server: EmbeddedRedis, admin: redis.Redis
) -> None:
    cfg = MapConfig(presence_interval=0.1)
    maps = [SyncMap(f"p{i}", redis_server.url, config=cfg) for i in range(3)]
    counters = []
    try:
        for m in maps:
            counter = _Counting(m._engine.executor)
            # Presence goes through the probe executor (on one Redis, the map's executor).
            m._engine.executor = m._engine.prober = counter  # type: ignore[assignment]
            counters.append(counter)
        wait_until(lambda: sum(len(c.trips) for c in counters) >= 8, 10, "8 presence refreshes")
        trips = [n for c in counters for n in c.trips]
        # Each refresh carries every map's record: per map, it would be one HSET a trip.
        assert trips and all(n == 3 for n in trips), trips
        for m in maps:
            assert admin.hlen(f"sm:presence:{{{m.name}}}") == 1
    finally:
        for m in maps:
            m.close()
    for m in maps:
        assert admin.exists(f"sm:presence:{{{m.name}}}") == 0
