"""examples/fastapi_app.py under a real uvicorn with 2 workers, driven over HTTP with httpx:
reads through the near cache, and a locked read-modify-write that loses no increment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from syncmap import MapConfig, SyncMap

httpx = pytest.importorskip("httpx", reason="pip install httpx (in the dev extra)")
pytest.importorskip("uvicorn", reason="pip install uvicorn (in the dev extra)")
ROOT = Path(__file__).resolve().parents[2]
INCRS = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def service(redis_url: str) -> Iterator[str]:
    port = _free_port()
    env = dict(os.environ, SYNCMAP_URL=redis_url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--workers", "2",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    try:
        while True:  # ready when a request is answered (by either worker)
            try:
                if httpx.get(f"{base}/items/ready", timeout=1).status_code == 404:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "uvicorn did not answer within 30 s"
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_the_example_reads_writes_and_increments_under_two_workers(
    service: str, redis_url: str
) -> None:
    with httpx.Client(base_url=service, timeout=10) as http:
        assert http.put("/items/greeting", json={"value": "hello"}).status_code == 200
        for _ in range(6):  # both workers answer (connections are spread), each from its map
            assert http.get("/items/greeting").json()["value"] == "hello"
        assert http.get("/items/absent").status_code == 404

        def incr(_: int) -> int:
            with httpx.Client(base_url=service, timeout=10) as c:  # one connection each
                reply = c.post("/counters/hits/incr")
                assert reply.status_code == 200, reply.text
                return int(reply.json()["value"])

        with ThreadPoolExecutor(8) as pool:
            values = list(pool.map(incr, range(INCRS)))
    assert sorted(values) == list(range(1, INCRS + 1)), "a locked increment was lost or doubled"
    with SyncMap("fastapi-example", redis_url, config=MapConfig(presence=False)) as m:
        assert m.get("hits", consistent=True) == INCRS
        assert m.get("greeting") == "hello"
