"""``syncmap bench --only cluster`` end to end, in the tiny hidden ``--smoke`` plan: the real
command in a subprocess, which starts its own Redis and its own 3-master cluster.  Only the
outputs are checked, never a timing (speed is what the benchmark measures, not what a test
asserts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROWS = {
    "cluster.hit_hget": "| near-cache hit `m[k]` on a cluster map vs `RedisCluster.hget` |",
    "cluster.miss_hget": "| miss `m[k]` (capacity=0) vs `RedisCluster.hget` |",
    "cluster.set_hset": "| write `m[k] = v` vs `RedisCluster.hset` |",
    "cluster.miss_one": "|   miss on the cluster vs the same miss on one Redis |",
    "cluster.set_one": "|   write on the cluster vs the same write on one Redis |",
    "cluster.propagation.1.p50": "| write → visible in 1 receiver (sharded channels): p50 vs raw",
    "cluster.propagation.1.p99": "|   write → visible in 1 receiver: p99 |",
    "cluster.writers.1": "| 1 writer process: writes/s on the 3-master cluster vs one Redis |",
    "cluster.writers.2": "| 2 writer processes: writes/s on the 3-master cluster vs one Redis |",
    "cluster.writers.4": "| 4 writer processes: writes/s on the 3-master cluster vs one Redis |",
    "cluster.update": "| `update()` of 1k entries on the 3-master cluster vs one Redis |",
    "cluster.copy": "| `copy()` (`items()`) of 1k entries, cluster vs one Redis |",
    "cluster.preload": "| `preload()` of 1k entries, cluster vs one Redis |",
}


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory, cluster_binary: str) -> Path:
    out = tmp_path_factory.mktemp("bench-cluster")
    run = subprocess.run(
        [sys.executable, "-m", "syncmap.cli", "bench", "--smoke", "--only", "cluster",
         "--no-plots", "--out", str(out)],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "(smoke: cluster)" in run.stderr
    return out


def section(out: Path) -> dict[str, Any]:
    doc = json.loads((out / "smoke.json").read_text())
    assert doc["failed"] == {}
    assert [s["name"] for s in doc["sections"]] == ["cluster"]
    found: dict[str, Any] = doc["sections"][0]
    return found


def test_markdown_has_the_cluster_table_with_every_row(out: Path) -> None:
    text = (out / "smoke.md").read_text()
    assert "## Redis Cluster (3 masters)" in text
    for row in ROWS.values():
        assert row in text, row
    assert "A private cluster of 3 masters, no replicas" in text


def test_every_row_is_measured_against_its_peer_in_the_same_run(out: Path) -> None:
    found = section(out)
    rows = {r["key"]: r for r in found["rows"]}
    assert set(rows) == set(ROWS)
    for key, row in rows.items():
        assert row["syncmap"] > 0 and row["baseline"] > 0 and row["ratio"] > 0, key
        if ".propagation." not in key:  # percentiles, not paired rounds
            assert len(row["spread"]["syncmap"]) == len(row["spread"]["baseline"]) >= 1, key
    assert rows["cluster.preload"]["max_ratio"] == 1.0  # issue 14: at least as fast
    assert "MISSING" not in json.dumps(found["rows"])  # every delivery arrived
    assert set(found["series"]["seconds"]) == {"round trips", "propagation", "writers",
                                               "whole-map"}  # fmt: skip
