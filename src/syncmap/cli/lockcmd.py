"""``syncmap lock NAME -- CMD ARGS...``: run a command while holding a distributed lock (flock).

Exit status: the command's own (128+N if signal N killed it); 75 (EX_TEMPFAIL) the lock was not
acquired within --wait; 2 Redis could not be reached or the arguments are wrong; 126/127 the
command could not be run / was not found (as in a shell).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from types import FrameType

import click

from ..errors import LockError, LockLost, LockNotAcquired, SyncMapError
from ..lock import Fence, Lock
from .options import url_option
from .torture import redact, unreachable, unreachable_message

EX_TEMPFAIL = 75
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_LOST: list[LockLost] = []


class _Interrupted(BaseException):
    """A signal arrived before the command was started."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _err(message: str) -> None:
    click.echo(f"syncmap lock: {message}", err=True)


def _terminal_sent_it() -> bool:
    """True if we are the foreground process group of our terminal: a SIGINT from Ctrl-C then
    reached the command as well (same group), so forwarding it would deliver it twice."""
    for stream in (sys.stdin, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if stream.isatty() and os.tcgetpgrp(stream.fileno()) == os.getpgrp():
                return True
    return False


class _Child:
    """The running command, and the signal handler that forwards to it."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.proc is None:
            raise _Interrupted(signum)
        if signum == signal.SIGINT and _terminal_sent_it():
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signum)

    def run(self, command: tuple[str, ...], env: dict[str, str]) -> int:
        """Start the command, wait for it: its exit code (128+N if signal N killed it)."""
        try:
            self.proc = subprocess.Popen(command, env=env)
        except FileNotFoundError:
            _err(f"command not found: {command[0]}")
            return 127
        except OSError as exc:
            _err(f"cannot run {command[0]}: {exc}")
            return 126
        code = self.proc.wait()
        return code if code >= 0 else 128 - code


def _new_lock(name: str, url: str | None, ttl: float) -> Lock:
    """The lock, after checking that Redis answers; exit 2 (saying why and how to fix) if not."""
    if not url:
        _err("no Redis given: pass --url redis://host:6379/0 or set SYNCMAP_URL")
        sys.exit(2)
    why = unreachable(url)
    if why is not None:
        click.echo(unreachable_message("lock", url, why), err=True)
        sys.exit(2)

    def on_lost(exc: LockLost) -> None:
        _LOST.append(exc)
        _err(f"WARNING: lost the lock {name!r} while the command runs (it keeps running; writes "
             "fenced with its SYNCMAP_FENCE are refused once another holder enters)")  # fmt: skip

    try:
        return Lock(name, url, lease=ttl, on_lost=on_lost)
    except SyncMapError as exc:
        _err(f"cannot use lock {name!r} on {redact(url)}: {exc}")
        sys.exit(2)


def _acquire(lock: Lock, url: str, wait: float | None) -> Fence:
    try:
        return lock.acquire(timeout=wait)
    except LockNotAcquired:
        _err(f"lock {lock.name!r} on {redact(url)} is held by another owner and was not "
             f"acquired within --wait {wait:g} s; try again later or wait longer")  # fmt: skip
        sys.exit(EX_TEMPFAIL)
    except SyncMapError as exc:
        _err(f"cannot acquire lock {lock.name!r} on {redact(url)}: {exc}")
        sys.exit(2)


@click.command(
    "lock",
    context_settings={"ignore_unknown_options": True},
)
@click.argument("name")
@click.argument(
    "command", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- CMD [ARGS]..."
)
@url_option("the lock")
@click.option("--ttl", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              metavar="S",
              help="Lease in seconds; renewed in the background as CMD runs.")  # fmt: skip
@click.option("--wait", type=click.FloatRange(min=0), default=None, metavar="S",
              help="Give up (exit 75) if the lock is not acquired within S seconds "
                   "(default: wait forever; 0: try once).")  # fmt: skip
def lock_command(name: str, command: tuple[str, ...], url: str | None, ttl: float,
                 wait: float | None) -> None:  # fmt: skip
    """Run CMD while holding the lock NAME; exit with CMD's exit code.

    \b
    CMD gets in its environment:
      SYNCMAP_FENCE  the fencing token (an int, larger with every acquisition of NAME)
      SYNCMAP_LOCK   NAME
      SYNCMAP_URL    the --url given
    Pass them as fence=(SYNCMAP_LOCK, int(SYNCMAP_FENCE)) to SyncMap writes.

    SIGTERM, SIGINT and SIGHUP are forwarded to CMD; the lock is released when CMD exits, fails
    or is killed.  If the lease is lost while CMD runs (Redis unreachable for longer than --ttl),
    a warning is printed and CMD keeps running: another holder may then enter, and writes
    fenced with this token are refused (StaleFence) once it has.

    Exit status: CMD's (128+N if signal N killed it), 75 the lock was not acquired within
    --wait, 2 Redis unreachable or bad arguments, 126/127 CMD could not be run / not found.
    """
    lock = _new_lock(name, url, ttl)
    assert url is not None  # _new_lock exits without one
    child = _Child()
    previous = {s: signal.signal(s, child.on_signal) for s in FORWARDED}
    try:
        code = 128
        try:
            fence = _acquire(lock, url, wait)
            env = dict(os.environ, SYNCMAP_FENCE=str(int(fence)), SYNCMAP_LOCK=name,
                       SYNCMAP_URL=url)  # fmt: skip
            code = child.run(command, env)
        except _Interrupted as sig:  # before the command started: nothing to forward it to
            code = 128 + sig.signum
        finally:
            _release(lock, name)
        sys.exit(code)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _release(lock: Lock, name: str) -> None:
    if not lock.held:
        return
    try:
        lock.release()
    except LockLost as exc:
        if not _LOST:  # on_lost has said it already
            _err(f"WARNING: the lock {name!r} had been lost before release: {exc}")
    except LockError as exc:
        _err(f"WARNING: could not release {name!r}: {exc}")
    except SyncMapError as exc:
        _err(f"WARNING: could not release {name!r} (its lease will run out): {exc}")
