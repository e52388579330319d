"""``syncmap get|set|del|ls|watch`` end to end: the real command as a subprocess on a real Redis."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from typing import IO

from syncmap import SyncMap

CLI = [sys.executable, "-m", "syncmap.cli"]


def run(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args, "--url", url], check=False, capture_output=True, text=True, timeout=60
    )


def test_set_then_get_round_trips_json(redis_url: str) -> None:
    value = {"name": "Alice", "tags": ["a", "b"], "age": 31, "ok": True, "none": None}
    assert run("set", "users", "alice", json.dumps(value), url=redis_url).returncode == 0
    got = run("get", "users", "alice", url=redis_url)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == value
    meta = json.loads(run("get", "users", "alice", "--json", url=redis_url).stdout)
    assert meta["value"] == value and meta["key"] == "alice" and meta["version"] > 0
    with SyncMap("users", redis_url) as m:  # what the library sees is the same value
        assert m.get("alice", consistent=True) == value


def test_set_refuses_non_json_unless_raw(redis_url: str) -> None:
    bad = run("set", "m", "k", "plain text", url=redis_url)
    assert bad.returncode == 2 and "--raw" in bad.stderr
    assert run("set", "m", "k", "plain text", "--raw", url=redis_url).returncode == 0
    assert run("get", "m", "k", "--raw", url=redis_url).stdout == "plain text\n"


def test_int_keys_differ_from_string_keys(redis_url: str) -> None:
    assert run("set", "m", "1", "42", "--int-key", url=redis_url).returncode == 0
    assert run("get", "m", "1", "--int-key", url=redis_url).stdout == "42\n"
    assert run("get", "m", "1", url=redis_url).returncode == 1


def test_del_and_get_of_a_missing_key(redis_url: str) -> None:
    run("set", "m", "k", "1", url=redis_url)
    assert run("del", "m", "k", url=redis_url).returncode == 0
    missing = run("get", "m", "k", url=redis_url)
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert "'k' is not in map 'm'" in missing.stderr
    again = run("del", "m", "k", "--json", url=redis_url)
    assert again.returncode == 1 and json.loads(again.stdout)["deleted"] is False


def test_ls_with_pattern_limit_and_json(redis_url: str) -> None:
    with SyncMap("m", redis_url) as m:
        m.update({f"user:{i}": i for i in range(5)} | {"other": "x"})
    plain = run("ls", "m", url=redis_url)
    assert plain.returncode == 0
    assert plain.stdout.splitlines() == ['other\t"x"'] + [f"user:{i}\t{i}" for i in range(5)]
    out = run("ls", "m", "--pattern", "user:*", "--limit", "3", "--json", url=redis_url)
    doc = json.loads(out.stdout)
    assert doc["matched"] == 5 and doc["count"] == 3 and doc["truncated"] is True
    assert doc["items"] == [{"key": f"user:{i}", "value": i} for i in range(3)]
    limited = run("ls", "m", "--pattern", "user:*", "--limit", "2", url=redis_url)
    assert len(limited.stdout.splitlines()) == 2 and "showing 2 of 5" in limited.stderr


def test_unreachable_url_exits_2_naming_it() -> None:
    url = "redis://127.0.0.1:1/0"
    for args in (("get", "m", "k"), ("set", "m", "k", "1"), ("ls", "m"), ("watch", "m")):
        result = run(*args, url=url)
        assert result.returncode == 2, (args, result.stderr)
        assert "127.0.0.1:1/0" in result.stderr and "SYNCMAP_URL" in result.stderr


def _lines(stream: IO[str]) -> queue.Queue[str]:
    """Lines of ``stream`` as they arrive, read on a thread (so reads can have a timeout)."""
    q: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            q.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return q


def test_watch_json_prints_a_change_made_by_another_process(redis_url: str) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [*CLI, "watch", "events", "--json", "--url", redis_url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stderr is not None and proc.stdout is not None
        err, out = _lines(proc.stderr), _lines(proc.stdout)
        first = err.get(timeout=20)  # a new map: a note first (a mistyped name would be silent)
        assert "no map 'events'" in first and "waiting for its first write" in first
        assert "watching map 'events'" in err.get(timeout=20)  # subscribed from here on
        with SyncMap("events", redis_url) as m:
            m["k1"] = {"a": 1}
            event = json.loads(out.get(timeout=10))
            assert event["key"] == "k1" and event["op"] == "set"
            assert event["version"] > 0 and event["origin"] == m.node_id
            del m["k1"]
            assert json.loads(out.get(timeout=10))["op"] == "delete"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_mistyped_map_name_is_not_created(redis_url: str) -> None:
    import redis

    run("set", "users", "alice", "1", url=redis_url)
    client = redis.Redis.from_url(redis_url)
    try:
        before = sorted(client.scan_iter())
        for args in (("get", "usres", "alice"), ("ls", "usres"), ("del", "usres", "alice")):
            result = run(*args, url=redis_url)
            assert result.returncode == 1, (args, result.stderr)
            assert "no map 'usres'" in result.stderr and "maps here: users" in result.stderr
        assert sorted(client.scan_iter()) == before  # nothing written, no meta key
    finally:
        client.close()
    assert run("ls", "users", url=redis_url).stdout == "alice\t1\n"  # an existing map still works


def test_every_command_takes_the_same_url_default(redis_url: str) -> None:
    from syncmap.cli.options import DEFAULT_URL

    for command in ("get", "set", "del", "ls", "watch", "lock", "top", "doctor", "verify"):
        shown = subprocess.run([*CLI, command, "--help"], capture_output=True, text=True,
                               check=True, env={**os.environ, "COLUMNS": "200"}).stdout  # fmt: skip
        assert "SYNCMAP_URL" in shown and DEFAULT_URL in shown, command
    run("set", "m", "k", "1", url=redis_url)
    env = {**os.environ, "SYNCMAP_URL": redis_url}
    got = subprocess.run([*CLI, "get", "m", "k"], capture_output=True, text=True, env=env,
                         check=False, timeout=60)  # fmt: skip
    assert got.returncode == 0 and got.stdout == "1\n", got.stderr
