"""``syncmap bench --only fleet`` end to end with tiny numbers: the real command in a subprocess,
which starts its own private redis-server and 2 idle worker processes with 1, then 2 maps each,
measured for 1 s per map count.  Only the report's shape and sane values are checked (counts and
connections that follow from the maps opened), never a cost: what idle maps cost is what the
benchmark measures (issue 16), not what a test asserts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from syncmap.benchmarks import runner
from syncmap.benchmarks.fleet import FleetPlan
from syncmap.benchmarks.method import TIMES

N, MAPS = 2, (1, 2)
AT = f"1,000 processes {TIMES} 10 maps (linear)"
WINDOW_ROWS = {
    "requests": "requests/s clients sent to Redis |",
    "commands": "commands/s Redis ran (a script's own included) |",
    "cpu": "Redis CPU, % of one core |",
    "evalsha_per_map": "EVALSHA/s per map instance |",
    "cpu_per_map": "Redis CPU per map instance |",
    "clients": "Redis connected_clients |",
    "connections": "connections to Redis per process (max) |",
    "threads": "threads per process (max) |",
}
AT_ROWS = {
    "fleet.at_1000x10.requests": f"| {AT}: requests/s clients send to Redis |",
    "fleet.at_1000x10.commands": f"|   {AT}: commands/s Redis runs |",
    "fleet.at_1000x10.cpu": f"|   {AT}: Redis CPU, % of one core |",
    "fleet.at_1000x10.connections": f"|   {AT}: connections to Redis |",
    "fleet.threads_growth": "| threads per process: 2 maps vs 1 map (max, difference) |",
}


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory, redis_binary: str) -> Path:
    out = tmp_path_factory.mktemp("bench-fleet")
    run = subprocess.run(
        [sys.executable, "-m", "syncmap.cli", "bench", "--smoke", "--only", "fleet", "--no-plots",
         "--fleet-processes", str(N), "--fleet-maps", ",".join(map(str, MAPS)),
         "--fleet-window", "1", "--name", "fleet", "--out", str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "(smoke: fleet)" in run.stderr
    return out


def section(out: Path) -> dict[str, Any]:
    doc = json.loads((out / "fleet.json").read_text())
    assert doc["failed"] == {}
    assert [s["name"] for s in doc["sections"]] == ["fleet"]
    found: dict[str, Any] = doc["sections"][0]
    return found


def test_markdown_has_every_row_and_the_comparison_with_issue_16(out: Path) -> None:
    text = (out / "fleet.md").read_text()
    assert "## Fleet: idle maps' cost to Redis" in text
    for m in MAPS:
        head = f"{N} processes {TIMES} {m} map{'s' if m > 1 else ''}: "
        for row in WINDOW_ROWS.values():
            assert head + row in text, head + row
    for row in AT_ROWS.values():
        assert row in text, row
    assert "| EVALSHA/s per map instance | 64 |" in text  # issue 16's figure beside this run's
    assert f"| 50 processes {TIMES} 10 maps | 30,741 EVALSHA/s, 0.56 of a Redis core" in text
    assert "A private Redis" in text or "A private Valkey" in text


def test_every_window_has_sane_values(out: Path) -> None:
    found = section(out)
    rows = {r["key"]: r for r in found["rows"]}
    expected = {f"fleet.{m}.{k}" for m in MAPS for k in WINDOW_ROWS} | set(AT_ROWS)
    assert set(rows) == expected
    assert found["series"]["processes"] == N and found["series"]["window"] == 1.0
    for m in MAPS:
        key = f"fleet.{m}"
        # An idle map PINGs every 4 Δ and refreshes presence every 10 s: a 1 s window may see
        # nothing at all, which is the goal, not an error.
        assert rows[key + ".requests"]["syncmap"] >= 0, m
        assert rows[key + ".commands"]["syncmap"] >= rows[key + ".requests"]["syncmap"], m
        # With PING leases an idle map need not probe at all: 0 is the goal, not an error.
        assert rows[key + ".evalsha_per_map"]["syncmap"] >= 0, m
        assert 0 < rows[key + ".cpu"]["syncmap"] < 100 * 2, m  # % of one core, 2 cores here
        # Every process holds at least one connection per map it opened, and Redis sees them.
        assert rows[key + ".connections"]["syncmap"] >= m, m
        assert rows[key + ".clients"]["syncmap"] >= N * m, m
        assert rows[key + ".threads"]["syncmap"] >= 2, m  # main + the queue's feeder, at least
    windows = {w["maps"]: w for w in found["series"]["windows"]}
    assert set(windows) == set(MAPS)
    for w in windows.values():
        assert len(w["threads"]) == len(w["connections"]) == N  # every process reported
        assert "INFO" not in w["calls"]  # the section's own calls are left out
        assert sum(w["calls"].values()) >= sum(w["requests"].values()) >= 0
    at = rows["fleet.at_1000x10.connections"]
    assert at["syncmap"] >= 1000 and at["at_most"] == 2000
    assert rows["fleet.at_1000x10.cpu"]["at_most"] == 5.0
    assert rows["fleet.at_1000x10.requests"]["syncmap"] >= 0  # 0 in 1 s windows: idle


def test_bad_fleet_flags_are_usage_errors() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "syncmap.cli", "bench", "--only", "fleet", "--fleet-maps", "1,x"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert run.returncode == 2 and "--fleet-maps '1,x': use map counts" in run.stderr, run.stderr
    for args, why in (((None, "0", None), "at least one ≥ 1"), ((0, None, None), "use 1 or more"),
                      ((None, None, 0.0), "more than 0 seconds")):  # fmt: skip
        with pytest.raises(ValueError, match=why):
            runner.parse_fleet(*args)
    assert runner.parse_fleet(3, "0,2", 4.0).apply(runner.PLANS["smoke"].fleet) == FleetPlan(
        processes=3, maps=(0, 2), window=4.0, settle=0.3, monitor=0.5)  # fmt: skip
