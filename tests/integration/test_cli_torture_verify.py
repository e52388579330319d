"""``syncmap torture`` and ``syncmap verify`` end to end: the real command, as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import redis

from syncmap.embedded import EmbeddedRedis
from syncmap.testing.sentinelset import SentinelSet


def syncmap(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """The installed ``syncmap`` script next to this interpreter (else ``python -m``)."""
    script = Path(sys.executable).with_name("syncmap")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "syncmap.cli"]
    return subprocess.run([*command, *args], check=False, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_torture_runs_s04_and_prints_the_table() -> None:
    result = syncmap("torture", "--minutes", "0.2", "--only", "S04")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = lines[0].split()
    for column in ("scenario", "seconds", "ops", "anomalies", "verdict"):
        assert column in header, result.stdout
    row = next(line for line in lines if line.startswith("S04 nearcache-staleness-load"))
    assert row.split()[-1] == "PASS", result.stdout
    assert lines[-1].startswith("PASS: 1 of 1 scenarios passed"), result.stdout
    assert "S04 nearcache-staleness-load: running" in result.stderr  # the progress lines


def test_torture_rejects_an_unknown_scenario() -> None:
    result = syncmap("torture", "--only", "S99", timeout=60)
    assert result.returncode == 2
    assert "unknown scenario S99" in result.stderr and "S04" in result.stderr


def test_verify_passes_and_leaves_no_key_behind(
    redis_server: EmbeddedRedis, admin: redis.Redis
) -> None:
    admin.set("users-own-key", "keep me")
    result = syncmap("verify", "--url", redis_server.url, "--seconds", "3", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert doc["passed"] is True
    ran = {s["id"]: s for s in doc["scenarios"]}
    assert "S04" in ran and ran["S04"]["passed"], doc
    assert "S01" in ran or "S01" in doc["skipped"], doc
    assert admin.keys("*") == [b"users-own-key"], "verify must delete every key it made"
    assert admin.get("users-own-key") == b"keep me"


def test_verify_prints_a_verdict(redis_server: EmbeddedRedis, admin: redis.Redis) -> None:
    result = syncmap("verify", "--url", redis_server.url, "--seconds", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "S04 nearcache-staleness-load: PASS" in result.stdout
    assert result.stdout.splitlines()[-1].startswith("PASS: ")
    assert admin.dbsize() == 0


def test_verify_against_a_closed_port_exits_2_and_says_why() -> None:
    url = "redis://:hunter2@127.0.0.1:1/0"
    result = syncmap("verify", "--url", url, "--seconds", "1", timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "cannot reach Redis at redis://:***@127.0.0.1:1/0" in result.stderr
    assert "Check that the server is running" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


def test_verify_runs_on_a_sentinel_url(sentinel_set: SentinelSet) -> None:
    """``verify --url redis+sentinel://...``: S01 and S04 used to crash at their cleanup
    (``redis.Redis.from_url`` refuses the scheme); they now find the master as a map does."""
    result = syncmap("verify", "--url", sentinel_set.url, "--seconds", "0.5", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert doc["passed"] is True and {s["id"] for s in doc["scenarios"]} == {"S01", "S04"}, doc
    with sentinel_set.client() as master:
        assert master.dbsize() == 0, "verify must delete every key it made"
