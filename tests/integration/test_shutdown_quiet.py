"""Interpreter shutdown: the subscriber's daemon thread must not report the connection it loses
while the process exits (the embedded Redis stops at exit too) as a problem."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import logging, sys
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from syncmap import SyncMap
    from syncmap.embedded import EmbeddedRedis
    server = EmbeddedRedis(binary=sys.argv[1]).start()
    m = SyncMap("bye", server.url)
    m["k"] = 1
    assert m["k"] == 1
    print("ok", flush=True)
    # no close(): the process exits with the map open, as services often do
    """
)


def test_no_lost_connection_warning_at_exit(redis_binary: str) -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT, redis_binary], check=False,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.stdout.strip() == "ok", done.stderr
    assert "lost its connection" not in done.stderr, done.stderr
