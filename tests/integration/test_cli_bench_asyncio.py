"""``syncmap bench --only asyncio`` end to end, in the tiny hidden ``--smoke`` plan: the real
command in a subprocess, against the embedded Redis it starts itself.  Only the outputs are
checked, never a timing (speed is what the benchmark measures, not what a test asserts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROWS = {
    "asyncio.get_sync": "| async hit `await m.get(k)` vs the sync hit `m[k]` |",
    "asyncio.get_dict": "| async hit `await m.get(k)` vs dict `d[k]` |",
    "asyncio.cached_sync": "| `m.get_cached(k)` (no `await`) vs the sync hit `m[k]` |",
    "asyncio.get_cashews": "| async hit `await m.get(k)` vs cashews client-side cache hit",
    "asyncio.miss_hget": "| async miss `await m.get(k)` (capacity=0) vs redis.asyncio `HGET` |",
    "asyncio.set_hset": "| async write `await m.set(k, v)` vs redis.asyncio `HSET` |",
    "asyncio.crowd_mixed": "| 100 concurrent coroutines, 90 % hits + 10 % misses, vs the same",
    "asyncio.crowd_misses": "|   100 concurrent coroutines, misses only (capacity=0), vs",
    "asyncio.handoff.p50": "| lock hand-off p50, 2 coroutines on one loop (hold 3 ms): `aio.Lock`",
    "asyncio.handoff.p99": "|   lock hand-off p99, 2 coroutines vs 2 processes |",
}


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory, redis_binary: str) -> Path:
    out = tmp_path_factory.mktemp("bench-asyncio")
    run = subprocess.run(
        [sys.executable, "-m", "syncmap.cli", "bench", "--smoke", "--only", "asyncio",
         "--no-plots", "--out", str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "(smoke: asyncio)" in run.stderr
    return out


def section(out: Path) -> dict[str, Any]:
    doc = json.loads((out / "smoke.json").read_text())
    assert doc["failed"] == {}
    assert [s["name"] for s in doc["sections"]] == ["asyncio"]
    found: dict[str, Any] = doc["sections"][0]
    return found


def test_markdown_has_the_asyncio_table_with_every_row(out: Path) -> None:
    text = (out / "smoke.md").read_text()
    assert "## asyncio (`syncmap.aio`)" in text
    for row in ROWS.values():
        assert row in text, row


def test_every_row_is_measured_against_its_peer_in_the_same_run(out: Path) -> None:
    rows = {r["key"]: r for r in section(out)["rows"]}
    assert set(rows) == set(ROWS)
    for key, row in rows.items():
        if key == "asyncio.get_cashews" and row["baseline"] is None:
            assert row["absent"], key  # cashews missing here: the row says why
            continue
        assert row["syncmap"] > 0 and row["baseline"] > 0 and row["ratio"] > 0, key
        if not key.startswith("asyncio.handoff"):  # percentiles, not paired rounds
            assert len(row["spread"]["syncmap"]) == len(row["spread"]["baseline"]) >= 1, key


def test_the_section_reports_no_broken_measurement(out: Path) -> None:
    """The section's own checks (warm-map reads that were not hits, capacity=0 reads that were,
    overlapping lock holds) write notes; none may appear."""
    found = section(out)
    notes = " ".join(found["notes"])
    assert "figures are off" not in notes and "MUTUAL EXCLUSION BROKEN" not in notes, notes
    handoffs = found["series"]["handoff_ms"]
    assert handoffs["asyncio"]["handoffs"] > 0 and handoffs["processes"]["handoffs"] > 0
    assert "holds per coroutine" in notes and "holds per process" in notes
