"""S26 ``fork`` under a real gunicorn with ``--preload`` and 4 workers, driven over HTTP.

The map is opened in gunicorn's master (apps/preload_app.py) and used by the forked workers.
The guard-off control (``SYNCMAP_TEST_FORK_GUARD=off``) must fail the same checks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

pytest.importorskip("gunicorn", reason="pip install gunicorn (in the dev extra)")
APPS = Path(__file__).parent / "apps"
WORKERS = 4
INCRS = 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(base: str, path: str) -> dict[str, Any]:
    """The JSON reply, or ``{"error": ...}`` when the worker failed (HTTP 500)."""
    try:
        with urllib.request.urlopen(base + path, timeout=10) as reply:
            return dict(json.loads(reply.read()))
    except urllib.error.HTTPError as exc:
        return {"error": exc.code, "pid": None, "value": None, "client_id": None, "hit": 0}


@pytest.fixture(params=["guarded", "guard-off"])
def service(request: pytest.FixtureRequest, redis_url: str) -> Iterator[tuple[str, bool]]:
    port = _free_port()
    env = dict(os.environ, SYNCMAP_URL=redis_url)
    if request.param == "guard-off":
        env["SYNCMAP_TEST_FORK_GUARD"] = "off"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--preload", "-w", str(WORKERS), "-b",
         f"127.0.0.1:{port}", "--chdir", str(APPS), "--graceful-timeout", "2",
         "preload_app:app"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    try:
        while True:  # readiness: gunicorn accepts once its workers are forked
            try:
                _get(base, "/health")
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline, "gunicorn did not start within 30 s"
                time.sleep(0.05)
        yield base, request.param == "guarded"
    finally:
        proc.terminate()
        proc.wait(15)


@pytest.mark.scenario
def test_preloaded_map_serves_every_worker_correctly(service: tuple[str, bool], redis_url: str
                                                     ) -> None:  # fmt: skip
    base, guarded = service
    admin = redis.Redis.from_url(redis_url)
    inherited = {int(c["id"]) for c in admin.client_list()}  # the master's, after the forks
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda _: _get(base, "/whoami"), range(4 * WORKERS)))
        reads = list(pool.map(lambda i: (i, _get(base, f"/get/k{i % 20}")), range(400)))
        list(pool.map(lambda _: _get(base, "/incr/counter"), range(INCRS)))
        time.sleep(0.6)  # outlive the leases the workers inherited: 3 x max_staleness
        stats = list(pool.map(lambda _: _get(base, "/stats"), range(4 * WORKERS)))
    wrong = [r for i, r in reads if r["value"] != {"k": f"k{i % 20}"}]
    shared = {r["client_id"] for r in ids} & inherited
    counter = _get(base, "/get/counter")["value"]
    hits = {r["pid"] for r in stats if r["hit"] == 1}
    served_by = {r["pid"] for _, r in reads}
    admin.close()
    errors = [r for r in [*ids, *(r for _, r in reads), *stats] if "error" in r]
    all_hit = hits == {r["pid"] for r in stats}
    healthy = not errors and not wrong and not shared and counter == INCRS and all_hit
    if not guarded:
        assert not healthy, "guard-off control passed: the gunicorn test cannot fail"
        return
    assert not errors, f"{len(errors)} requests failed"
    assert len(served_by) > 1, "requests reached only one worker"
    assert not shared, f"workers talked on the master's Redis connections {shared}"
    assert not wrong, f"{len(wrong)} of {len(reads)} reads returned another key's value"
    assert counter == INCRS, "an atomic increment was lost or applied twice"
    assert all_hit, "a worker stopped serving hits from its cache"
