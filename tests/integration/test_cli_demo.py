"""The README's first command, end to end: ``syncmap demo`` as a subprocess on a real Redis.

Run without a terminal, the demo prints plain periodic lines (the rich live view is for ttys).
"""

from __future__ import annotations

import re
import subprocess
import sys

from syncmap.embedded import EmbeddedRedis


def _demo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncmap.cli", "demo", *args],
        check=False, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_demo_converges_and_exits_zero(redis_server: EmbeddedRedis) -> None:
    result = _demo("--url", redis_server.url, "--nodes", "2", "--seconds", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("CONVERGED: all"), result.stdout
    assert any("propagation p50" in line for line in lines), result.stdout
    assert "server-1" in result.stdout and "server-2" in result.stdout
    assert "server-3" not in result.stdout


def test_demo_default_four_servers_with_locks_store_and_convergence(
    redis_server: EmbeddedRedis,
) -> None:
    result = _demo("--url", redis_server.url, "--seconds", "5")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    lines = out.splitlines()
    assert lines[-1].startswith("CONVERGED: all"), out
    assert "on 4 servers" in lines[-1], out
    # Periodic plain lines: per server rates, a store line from INFO, a convergence line.
    assert re.search(r"server-4: +\d+ entries, hit +\d+%, +\d+ reads/s, +\d+ writes/s", out), out
    assert re.search(r"store: \d+ entries in Redis, \S+ used, \d+ clients, \d+ ops/s", out), out
    assert re.search(r"convergence: (converged|converging): \d+/\d+ sampled", out), out
    # Every server took locks for some of its writes: acquisitions and wait p50/p99.
    finals = [line for line in lines if line.startswith("final server-")]
    assert len(finals) == 4, out
    for line in finals:
        m = re.search(r"locks (\d+) \(wait p50 ([\d.]+) ms p99 ([\d.]+) ms\)", line)
        assert m, line
        assert int(m[1]) > 0 and float(m[2]) <= float(m[3]), line
    assert re.search(r"convergence: .* \d+ in flight, 0 late", out) and "LATE" not in out, out


def test_demo_chaos_heals_and_converges(redis_server: EmbeddedRedis) -> None:
    result = _demo("--url", redis_server.url, "--seconds", "6", "--chaos")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    lines = out.splitlines()
    assert lines[-1].startswith("CONVERGED: all"), out
    events = [
        line for line in lines if re.search(r"chaos: (CLIENT KILL TYPE pubsub|SIGSTOP)", line)
    ]
    assert events, out
    assert any("chaos: healed: every server receives changes again" in line for line in lines), out
    summary = next(line for line in lines if re.match(r"chaos: \d+ events, \d+ healed", line))
    assert summary.startswith(f"chaos: {len(events)} events"), out


def test_demo_reports_an_unreachable_redis_clearly() -> None:
    result = _demo("--url", "redis://127.0.0.1:1/0", "--seconds", "1", timeout=60)
    assert result.returncode == 2
    assert "cannot reach redis 127.0.0.1:1/0" in result.stderr


def test_a_chaos_run_that_injected_nothing_fails(redis_server: EmbeddedRedis) -> None:
    """Chaos is scheduled from "servers up" and never in the last 2.5 s of the servers' run, so
    2 s leave room for no event on any machine: that run must not pass as a chaos run."""
    result = _demo("--url", redis_server.url, "--nodes", "2", "--seconds", "2", "--chaos")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "chaos: 0 events, 0 healed" in lines, result.stdout
    assert lines[-1].startswith("NOT A CHAOS RUN: --chaos injected no events"), result.stdout
