"""``syncmap demo --sentinel`` end to end: the demo's servers on a master, a replica and three
Sentinels it starts itself.  ``--chaos`` (the master paused once until Sentinel fails over) is
run by hand (``syncmap demo --sentinel --chaos --seconds 15``): S10 tests the same failover, and
the suite's time is kept near ten minutes."""

from __future__ import annotations

import re
import subprocess
import sys


def _demo(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncmap.cli", "demo", "--sentinel", *args],
        check=False, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_demo_on_sentinel_converges_and_shows_the_topology(sentinel_binary: str) -> None:
    result = _demo("--nodes", "2", "--seconds", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    node = r"127\.0\.0\.1:\d+"
    topology = rf"Sentinel service 'syncmap': master {node}, replicas {node}, Sentinels {node}, "
    assert re.search(topology + rf"{node}, {node}", out), out
    assert "maps open redis+sentinel://127.0.0.1:" in out, out
    assert out.splitlines()[-1].startswith("CONVERGED: all"), out
