"""``syncmap lock NAME -- CMD`` as a real subprocess, holding a lock on a real Redis."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from syncmap import Lock
from syncmap.testing.wait import wait_until

CLI = [sys.executable, "-m", "syncmap.cli"]
PY = sys.executable


def lock(url: str, name: str, *cmd: str, opts: tuple[str, ...] = ()) -> list[str]:
    return [*CLI, "lock", name, "--url", url, *opts, "--", *cmd]


def test_the_command_exit_code_is_returned(redis_url: str) -> None:
    for code in (0, 3, 42):
        result = subprocess.run(lock(redis_url, "job", PY, "-c", f"raise SystemExit({code})"),
                                check=False, timeout=60)  # fmt: skip
        assert result.returncode == code
    killed = subprocess.run(lock(redis_url, "job", "sh", "-c", "kill -9 $$"), check=False,
                            timeout=60)  # fmt: skip
    assert killed.returncode == 128 + 9
    missing = subprocess.run(lock(redis_url, "job", "no-such-command-here"), check=False,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert missing.returncode == 127 and "not found" in missing.stderr


def test_fence_and_lock_name_are_passed_and_the_fence_is_an_int(redis_url: str) -> None:
    script = "import os; print(os.environ['SYNCMAP_FENCE'], os.environ['SYNCMAP_LOCK'])"
    tokens = []
    for _ in range(2):
        out = subprocess.run(lock(redis_url, "job", PY, "-c", script), check=True,
                             capture_output=True, text=True, timeout=60).stdout.split()  # fmt: skip
        assert out[1] == "job"
        tokens.append(int(out[0]))
    assert tokens[1] > tokens[0]  # a new token with every acquisition
    assert Lock("job", redis_url).try_acquire() is not None  # released after each run


def test_a_second_lock_gives_up_with_75_while_the_first_holds(redis_url: str, tmp_path: Path
                                                              ) -> None:  # fmt: skip
    started = tmp_path / "started"
    holder = subprocess.Popen(
        lock(redis_url, "job", PY, "-c",
             f"import pathlib, time; pathlib.Path({str(started)!r}).touch(); time.sleep(60)"),
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(started.exists, 20, "the first command started")
        waiter = lock(redis_url, "job", "true", opts=("--wait", "0.5"))
        second = subprocess.run(waiter, check=False, capture_output=True, text=True, timeout=60)
        assert second.returncode == 75
        assert "'job'" in second.stderr and "--wait 0.5" in second.stderr
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.wait(timeout=20)


def test_sigterm_terminates_the_command_and_releases_the_lock(redis_url: str, tmp_path: Path
                                                              ) -> None:  # fmt: skip
    started, child_pid = tmp_path / "started", tmp_path / "pid"
    script = (
        "import os, pathlib, time\n"
        f"pathlib.Path({str(child_pid)!r}).write_text(str(os.getpid()))\n"
        f"pathlib.Path({str(started)!r}).touch()\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(lock(redis_url, "job", PY, "-c", script, opts=("--ttl", "30")))
    try:
        wait_until(started.exists, 20, "the command started")
        assert Lock("job", redis_url).try_acquire() is None  # held while it runs
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 128 + signal.SIGTERM
        pid = int(child_pid.read_text())
        assert not Path(f"/proc/{pid}").exists() or "Z" in _state(pid)  # the child is gone
        assert Lock("job", redis_url).try_acquire() is not None  # released, not left to expire
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
