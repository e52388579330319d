"""The README's first command, end to end: ``syncmap demo`` as a subprocess on a real Redis."""

from __future__ import annotations

import subprocess
import sys

from syncmap.embedded import EmbeddedRedis


def test_demo_converges_and_exits_zero(redis_server: EmbeddedRedis) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "syncmap.cli", "demo", "--url", redis_server.url,
         "--nodes", "2", "--seconds", "2"],
        check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("CONVERGED: all"), result.stdout
    assert any("propagation p50" in line for line in lines), result.stdout
    assert "server-1" in result.stdout and "server-2" in result.stdout


def test_demo_reports_an_unreachable_redis_clearly() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "syncmap.cli", "demo", "--url", "redis://127.0.0.1:1/0",
         "--seconds", "1"],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "cannot reach redis 127.0.0.1:1/0" in result.stderr
