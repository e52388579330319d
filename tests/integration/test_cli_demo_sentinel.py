"""``syncmap demo --sentinel`` end to end: the demo's servers on a master, a replica and three
Sentinels it starts itself; with ``--chaos`` the master is paused once and Sentinel fails over."""

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


def test_demo_sentinel_chaos_fails_over_and_converges(sentinel_binary: str) -> None:
    result = _demo("--nodes", "2", "--seconds", "12", "--chaos")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    first = re.search(r"chaos: SIGSTOP the master (127\.0\.0\.1:\d+)", out)
    promoted = re.search(r"chaos: Sentinel promoted (127\.0\.0\.1:\d+) [\d.]+ s after", out)
    assert first and promoted and first[1] != promoted[1], out
    # After the SIGCONT the topology names the promoted node as the master, the old as a replica.
    assert f"master {promoted[1]}, replicas {first[1]}" in out, out
    assert "chaos: 1 events, 1 healed" in out, out
    assert out.splitlines()[-1].startswith("CONVERGED: all"), out


def test_demo_sentinel_refuses_a_url() -> None:
    result = _demo("--url", "redis://127.0.0.1:1/0", "--seconds", "1", timeout=60)
    assert result.returncode == 2
    assert "--sentinel starts servers of its own: leave out --url" in result.stderr
