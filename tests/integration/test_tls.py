"""``rediss://`` with a CA file and a client certificate, as docs/deploying.md shows, against a
redis-server with ``--tls-port`` that requires client certificates.  Certificates are made with
the openssl command (``syncmap.testing.certs``); the test skips when openssl is missing or
redis-server lacks TLS."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from syncmap import StoreUnavailable, SyncMap
from syncmap.embedded import EmbeddedRedis
from syncmap.testing.certs import make_certs

DOC = Path(__file__).resolve().parents[2] / "docs" / "deploying.md"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def tls_server(redis_binary: str, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make test certificates")
    make_certs(tmp_path)
    port = _free_port()
    server = EmbeddedRedis(binary=redis_binary, extra_args=[
        "--tls-port", str(port), "--tls-cert-file", str(tmp_path / "server.crt"),
        "--tls-key-file", str(tmp_path / "server.key"),
        "--tls-ca-cert-file", str(tmp_path / "ca.crt"), "--tls-auth-clients", "yes",
    ])  # fmt: skip
    try:
        server.start()
    except Exception as exc:  # a redis-server built without TLS refuses --tls-port
        pytest.skip(f"this redis-server has no TLS: {exc}")
    try:
        yield port, tmp_path
    finally:
        server.stop()


def documented_url(port: int, certs: Path) -> str:
    """docs/deploying.md's example URL, pointed at this server and these certificates."""
    found = re.search(r"^(rediss://redis\.example\.com:6380/0\?\S+)$", DOC.read_text(), re.M)
    assert found, "docs/deploying.md shows no rediss:// URL with certificate options"
    url = found[1].replace("redis.example.com:6380", f"127.0.0.1:{port}")
    return url.replace("/etc/ssl/redis/", f"{certs}/")


def test_the_documented_rediss_url_with_a_ca_and_a_client_certificate(
    tls_server: tuple[int, Path],
) -> None:
    port, certs = tls_server
    url = documented_url(port, certs)
    assert "ssl_ca_certs=" in url and "ssl_certfile=" in url and "ssl_keyfile=" in url
    with SyncMap("tls", url) as a, SyncMap("tls", url) as b, b.watch() as events:
        a["k"] = 1
        event = events.get(10)  # the change message reached b's subscriber, over TLS too
        assert event is not None and event.key == "k"
        assert b.get("k", consistent=True) == 1
        with a.lock("k") as fence:
            a.set("k", 2, fence=fence)
    doctor = subprocess.run([sys.executable, "-m", "syncmap.cli", "doctor", "--url", url],
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert re.search(r"^OK +invalidation", doctor.stdout, re.M), doctor.stdout


def test_a_client_built_by_hand_and_the_refusals(tls_server: tuple[int, Path]) -> None:
    port, certs = tls_server
    client = redis.Redis(host="127.0.0.1", port=port, ssl=True,
                         ssl_ca_certs=str(certs / "ca.crt"),
                         ssl_certfile=str(certs / "client.crt"),
                         ssl_keyfile=str(certs / "client.key"))  # fmt: skip
    with SyncMap("tls", redis=client) as a, a.watch() as events:
        a["k"] = 3
        assert events.get(10) is not None and a.get("k", consistent=True) == 3
    client.close()
    # Without the client certificate the server refuses; without the CA the client does.
    for query in (f"ssl_ca_certs={certs}/ca.crt", f"ssl_certfile={certs}/client.crt"
                  f"&ssl_keyfile={certs}/client.key"):  # fmt: skip
        with pytest.raises(StoreUnavailable):
            SyncMap("tls", f"rediss://127.0.0.1:{port}/0?{query}")
    # ssl_cert_reqs=none: no verification of the server (tests only), a client certificate still.
    url = (f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=none&ssl_certfile={certs}/client.crt"
           f"&ssl_keyfile={certs}/client.key")  # fmt: skip
    with SyncMap("tls", url) as m:
        assert m.get("k", consistent=True) == 3
