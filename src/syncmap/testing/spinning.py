"""A CPU-bound reader and a writer in another process, counted in reads, not in milliseconds.

:func:`reads_to_see` spins on ``m[key]`` (never releasing the GIL but inside the map) and
counts the reads made *after* the writer acknowledged its write and before the new value came
back.  The writer process (:class:`Writer`, ``python -m syncmap.testing.spinning``) raises a
byte in a shared file mapping right after each acknowledgement, which the spinning loop reads
without a system call.  Used by the integration test of ``MapConfig.feed_turn`` (docs/design.md,
"CPU-bound readers"): with it, the subscriber applies the change within a few thousand reads;
without it, only once CPython's switch interval makes the reader let go of the GIL.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SLOTS = 32  # writes per writer: one "go" byte and one "acknowledged" byte each
GO = SLOTS  # the go bytes follow the acknowledgement bytes
WAIT_READS = 50_000_000  # reads while waiting for the writer (~15 s): it is gone


class Writer:
    """A writer process with a map ``name`` open on ``url``; :meth:`write` starts one write and
    returns at once (the caller spins meanwhile)."""

    def __init__(self, url: str, namespace: str, name: str, flags: Path) -> None:
        flags.write_bytes(bytes(2 * SLOTS))
        self._file = open(flags, "r+b")  # noqa: SIM115 - closed in close()
        self.flags = mmap.mmap(self._file.fileno(), 2 * SLOTS)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "syncmap.testing.spinning", url, namespace, name, str(flags)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
        )  # fmt: skip
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()  # a blocking read: the map is open over there
        if line.strip() != "ready":
            raise RuntimeError(f"the writer process did not start: {line!r}")
        self._slot = 0

    def write(self, key: str, value: int) -> int:
        """Ask for ``m[key] = value`` once :func:`reads_to_see` raises the slot's go byte (so
        no system call of the spinning thread, which would release the GIL, falls after the
        write); returns the slot, whose byte the writer raises after the acknowledgement."""
        assert self._proc.stdin is not None
        slot, self._slot = self._slot, self._slot + 1
        self._proc.stdin.write(f"{slot} {key} {value}\n")
        self._proc.stdin.flush()
        return slot

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        self._proc.wait(timeout=30)
        self.flags.close()
        self._file.close()


def reads_to_see(m: Any, key: str, value: Any, flags: mmap.mmap, slot: int, cap: int) -> int:
    """Spin on ``m[key]``: the reads made after the writer raised ``slot`` until one returned
    ``value``; ``cap`` (not seen) if it did not come back within ``cap`` reads after it.  Bounded
    by the count (no clock): once the flag is up, at most ``cap`` reads; before it, at most
    ``WAIT_READS`` (the writer process is gone: ``AssertionError``)."""
    after = before = 0
    flags[GO + slot] = 1  # a store to shared memory: the GIL stays with this thread
    while True:
        got = m[key]
        if after:
            if got == value:
                return after
            after += 1
            if after >= cap:
                return cap
        elif flags[slot]:
            after = 1  # this read may have started before the acknowledgement: not counted
            if got == value:
                return 0
        else:
            before += 1
            if before > WAIT_READS:
                raise AssertionError(f"the writer did not acknowledge in {WAIT_READS} reads")


def _main(url: str, namespace: str, name: str, flags_path: str) -> None:
    from syncmap import MapConfig, SyncMap  # noqa: PLC0415 - the child process only

    m = SyncMap(name, url=url, config=MapConfig(namespace=namespace))
    with open(flags_path, "r+b") as f:
        flags = mmap.mmap(f.fileno(), 2 * SLOTS)
        print("ready", flush=True)
        for line in sys.stdin:
            slot, key, value = line.split()
            deadline = time.monotonic() + 30
            while not flags[GO + int(slot)] and time.monotonic() < deadline:
                time.sleep(0.0001)  # polling shared memory in this process, not a handshake
            m[key] = int(value)
            flags[int(slot)] = 1  # after the acknowledgement
    m.close()


if __name__ == "__main__":
    _main(*sys.argv[1:5])
