"""``syncmap check`` end to end: the real command in a subprocess, on bundled histories."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from syncmap.testing.formats import write_history
from syncmap.testing.scenarios_checker import corrupt_late_read, simulate_register

DATA = Path(__file__).resolve().parents[1] / "data"


def syncmap_check(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncmap.cli", "check", *map(str, args)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_linearizable_jepsen_log_exits_0() -> None:
    run = syncmap_check(DATA / "jepsen-etcd" / "etcd_018.log")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "linearizable"
    assert lines[1].startswith("83 ops, 1 keys (0 not linearizable, 0 unknown), ")


def test_not_linearizable_kv_history_exits_1_with_a_witness() -> None:
    run = syncmap_check(DATA / "kv" / "c01-bad.txt", "--format", "jepsen-kv")
    assert run.returncode == 1, run.stderr
    out = run.stdout
    assert out.startswith("not linearizable\nkey '7': not linearizable (5 ops")
    assert "this op cannot be placed before it returns:\n  #3 p0 get() -> 'x 0 0 y'" in out
    assert "not possible in state 'x 0 0 yx 0 3 y'" in out
    assert out.rstrip().splitlines()[-1].startswith("38 ops, 8 keys (1 not linearizable, 0 ")


def test_json_output() -> None:
    run = syncmap_check(DATA / "jepsen-etcd" / "etcd_000.log", "--json", "--budget", "5")
    assert run.returncode == 1, run.stderr
    doc = json.loads(run.stdout)
    assert doc["verdict"] == "not linearizable"
    assert (doc["model"], doc["ops"], doc["keys"], doc["keys_failed"]) == ("register", 85, 1, 1)
    assert "cannot be placed" in doc["witness"]
    run = syncmap_check(DATA / "kv" / "c10-ok.txt", "--json", "--workers", "2")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert (doc["verdict"], doc["model"], doc["keys"], doc["witness"]) == (
        "linearizable",
        "kv",
        10,
        "",
    )


def test_syncmap_history_and_exhausted_budget(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    write_history(corrupt_late_read(simulate_register(200, 4, seed=3)), path)
    run = syncmap_check(path)
    assert run.returncode == 1, run.stderr
    assert "observes 'never-written'" in run.stdout
    # A valid history too long to finish in a zero budget: unknown, exit 2, the key named.
    path = tmp_path / "long.jsonl"
    write_history(simulate_register(2000, 8, seed=4), path)
    run = syncmap_check(path, "--budget", "0")
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stdout.startswith("unknown\nran out of the 0 s budget on 1 key(s): 'k'\n")


def test_unreadable_or_unknown_files_exit_2(tmp_path: Path) -> None:
    run = syncmap_check(tmp_path / "missing.jsonl")
    assert run.returncode == 2
    assert "syncmap check: cannot check" in run.stderr and "No such file" in run.stderr
    run = syncmap_check(DATA / "README.md")
    assert run.returncode == 2
    assert "not a history in a known format" in run.stderr
    run = syncmap_check(DATA / "kv" / "c01-ok.txt", "--format", "jepsen-register")
    assert run.returncode == 2
    assert "line 1: not a Jepsen register event" in run.stderr
