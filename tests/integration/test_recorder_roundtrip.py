"""A history saved by ``save_records`` checks through ``syncmap check`` as it does in memory.

``save_records`` once wrote a read of an absent key as ``"output": null``, which ``syncmap check``
reads as the value None, not as "absent": every such history was "not linearizable" there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from syncmap import MapConfig, SyncMap
from syncmap.testing.recorder import Record, Recorder, load_records, save_records
from syncmap.testing.storecheck import check_records


def syncmap_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncmap.cli", "check", str(path), "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_a_recorded_history_checks_the_same_saved_and_in_memory(
    shared_redis_url: str, tmp_path: Path
) -> None:
    config = MapConfig(namespace="rt")
    with (
        SyncMap("roundtrip", shared_redis_url, config=config) as a,
        SyncMap("roundtrip", shared_redis_url, config=config) as b,
    ):
        # The key budget, not the clock, ends the run: 4 keys of 40 operations each.
        rec = Recorder([a, b], threads=4, ops_per_key=40, max_keys=4, seed=12)
        history = rec.run(120)
    records = history.records
    assert len(records) >= 150
    absent_reads = [r for r in records if r.f == "get" and r.ret_ns and r.output is None]
    assert absent_reads, "the history must read absent keys (the case that broke)"
    in_memory = check_records(records)
    assert in_memory.verdict == "linearizable"

    path = tmp_path / "history.jsonl"
    save_records(records, path)
    run = syncmap_check(path)
    assert run.returncode == 0, run.stdout + run.stderr
    saved = json.loads(run.stdout)
    assert (saved["verdict"], saved["ops"], saved["keys"]) == (
        in_memory.verdict, in_memory.ops, in_memory.keys,
    )  # fmt: skip
    assert load_records(path) == records  # and it still loads back as the same records


def test_a_saved_stale_read_is_still_caught(tmp_path: Path) -> None:
    """The negative control: the saved form must not make every history pass either."""
    records = [
        Record("p0", "k", "get", None, None, 10, 20),  # absent
        Record("p0", "k", "set", "v1", None, 30, 40),
        Record("p1", "k", "swap", "v2", "v1", 50, 60),
        Record("p1", "k", "get", None, None, 70, 80),  # absent after v2 was stored: stale
    ]
    assert check_records(records).verdict == "not linearizable"
    path = tmp_path / "stale.jsonl"
    save_records(records, path)
    run = syncmap_check(path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert json.loads(run.stdout)["verdict"] == "not linearizable"
    records[3] = Record("p1", "k", "get", None, "v2", 70, 80)
    save_records(records, path)
    assert syncmap_check(path).returncode == 0
