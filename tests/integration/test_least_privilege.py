"""docs/protocol.md §9's least-privilege ACL, exactly as documented, on a redis-server of our own:
a map works, ``syncmap top`` shows it, and ``syncmap doctor`` says what it lacks, then runs clean
with the documented grant for its test map."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import redis

from syncmap import MapConfig, SyncMap
from syncmap.embedded import EmbeddedRedis
from syncmap.testing.wait import wait_until

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def documented_acl() -> tuple[list[str], list[str]]:
    """The two ``ACL SETUSER`` lines of §9: the app's, and the doctor's addition."""
    section = DOC.read_text(encoding="utf-8").split("## 9.")[1].split("\n## ")[0]
    lines = re.findall(r"^(ACL SETUSER app .+)$", section, flags=re.MULTILINE)
    assert len(lines) == 2, lines
    return lines[0].split(), lines[1].split()


def syncmap(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncmap.cli", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def refusals(admin: redis.Redis) -> list[str]:
    return [f"{e['reason']} {e['object']}" for e in admin.acl_log()]


def test_the_documented_acl_runs_a_map_top_and_doctor(
    redis_server: EmbeddedRedis, admin: redis.Redis
) -> None:
    app, doctor_grant = documented_acl()
    admin.execute_command(*app)
    url = f"redis://app:pw@127.0.0.1:{redis_server.port}/0"
    with SyncMap("users", url, config=MapConfig(presence_interval=0.2)) as m:
        m["a"] = 1
        assert m.get("a", consistent=True) == 1 and len(m) == 1 and dict(m.items()) == {"a": 1}
        m.update({"b": 2})
        assert m.pop("b") == 2 and m.compare_and_set("a", 1, 3) and m.setdefault("c", 4) == 4
        wait_until(lambda: admin.hlen("sm:presence:{users}") == 1, 10, "the presence record")
        top = syncmap("top", "users", "--url", url, "--once", "--json")
        assert top.returncode == 0, top.stdout + top.stderr
        servers = json.loads(top.stdout)["servers"]
        assert [s["node"] for s in servers] == [m.node_id]
        m.clear()
    # The map, its presence record and top: nothing refused but the map's optional CONFIG GET of
    # the eviction policy (it skips that check when refused).
    assert set(refusals(admin)) <= {"command config|get"}, refusals(admin)

    # Without the doctor's grant, doctor says what it needs (no "cannot reach Redis").
    run = syncmap("doctor", "--url", url)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "FAIL invalidation" in run.stdout and "~syncmap-doctor:*" in run.stdout, run.stdout
    assert "FAIL error" not in run.stdout, run.stdout  # a refused INFO is a warning, not a failure

    admin.execute_command(*doctor_grant)
    admin.acl_log_reset()
    run = syncmap("doctor", "--url", url)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"^OK +invalidation +change message arrived", run.stdout, re.M), run.stdout
    assert re.search(r"^OK +server +Redis \d", run.stdout, re.M), run.stdout
    assert admin.keys("syncmap-doctor:*") == []  # its test map is gone again
    # Only CONFIG is refused (doctor then warns that it could not read the settings).
    assert set(refusals(admin)) <= {"command config|get"}, refusals(admin)


def test_top_says_the_acl_refused_it_not_that_redis_is_unreachable(
    redis_server: EmbeddedRedis, admin: redis.Redis
) -> None:
    admin.execute_command(
        "ACL", "SETUSER", "nopresence", "on", ">pw", "~other", "+@all"
    )  # fmt: skip
    run = syncmap("top", "users", "--url", f"redis://nopresence:pw@127.0.0.1:{redis_server.port}/0",
                  "--once")  # fmt: skip
    assert run.returncode == 2
    assert "cannot reach" not in run.stderr, run.stderr
    assert "sm:presence:{users}" in run.stderr and "docs/protocol.md" in run.stderr, run.stderr
