"""A throw-away server child process on a loopback port: the life cycle the embedded servers share.

:class:`syncmap.embedded.EmbeddedRedis`, :class:`syncmap.testing.nats_server.NatsServer` and
:class:`syncmap.testing.tansu.TansuServer` are subclasses of :class:`ServerProcess`.  A subclass
says how to find and run its binary and how to tell that *its* process answers; this class picks a
free port (and another one if some other process took it before the server bound it), spawns the
binary in a temp dir of its own, waits until it is ready, and stops, kills, pauses and restarts it
on the same port and dir, which is what failover, recovery and resume tests need.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import Future
from pathlib import Path
from typing import IO, Any, ClassVar, Self, cast

from .errors import ConfigurationError

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
# How many times start() picks another port when the free one was taken before the server bound it.
PORT_RACE_RETRIES = 3


def free_port(host: str = HOST) -> int:
    """A port that was free a moment ago (the OS picks it; racy, so callers retry on clashes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def executable(path: Path) -> bool:
    """Whether *path* is a file this process may execute."""
    return path.is_file() and os.access(path, os.X_OK)


def die_with_parent(command: list[str]) -> list[str]:
    """Run ``command`` so Linux stops it when this process dies without stopping it (SIGKILL, or a
    timeout's SIGTERM, which skips atexit): util-linux's ``setpriv --pdeathsig`` sets the signal
    and execs the server, which keeps it.  Unchanged where setpriv is missing."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *command] if setpriv else command


class _Spawner:
    """Starts every server process from one daemon thread (per process), so that
    :func:`die_with_parent` means "with this process".

    ``setpriv --pdeathsig`` sets Linux's PR_SET_PDEATHSIG, which fires when the *thread* that
    forked the child exits, not its process.  The order of events this prevents: a scenario's
    fault thread kills a server and restarts it (the new process's parent is that thread) -> the
    fault is done and the thread returns -> Linux sends the server SIGTERM -> the server shuts
    down while the scenario still reads from it (found by S02-cluster: its restarted master
    gone after the run, its final snapshot refused).  The daemon thread lives until the
    interpreter exits, after ``atexit`` stopped every server anyway."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._pid = 0

    def popen(self, command: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._pid != os.getpid():  # first use, or a forked child (threads do not follow)
                self._queue = queue.SimpleQueue()
                thread = threading.Thread(target=self._serve, args=(self._queue,),
                                          name="syncmap-spawner", daemon=True)  # fmt: skip
                thread.start()
                self._pid = os.getpid()
            jobs = self._queue
        done: Future[subprocess.Popen[bytes]] = Future()
        jobs.put((command, kw, done))
        return done.result()

    @staticmethod
    def _serve(jobs: queue.SimpleQueue[_Job]) -> None:
        while True:
            command, kw, done = jobs.get()
            try:
                done.set_result(cast("subprocess.Popen[bytes]", subprocess.Popen(command, **kw)))
            except BaseException as exc:  # handed to the caller, which raises it
                done.set_exception(exc)


_Job = tuple[list[str], dict[str, Any], "Future[subprocess.Popen[bytes]]"]
_SPAWNER = _Spawner()


# Servers still running, stopped at interpreter exit so that none outlives Python.
_LIVE: set[ServerProcess] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for server in live:
        with contextlib.suppress(Exception):
            server.stop()


class ServerProcess(ABC):
    """A server child process bound to 127.0.0.1, with a temp dir of its own for its files.

    Subclasses set the class attributes below and implement :meth:`_find_binary`,
    :meth:`_command` and :meth:`_ready`.
    """

    name: ClassVar[str]  # of the binary, for messages: "redis-server"
    _dir_prefix: ClassVar[str]  # of the temp dir's name
    _log_name: ClassVar[str]  # the server's log file, in the temp dir
    _output_name: ClassVar[str | None] = None  # where stdout and stderr go, if not to the log
    _clash: ClassVar[str]  # what the log says when another process had the port
    _stop_timeout: ClassVar[float] = 5.0  # from SIGTERM to SIGKILL
    _poll: ClassVar[tuple[float, float]] = (0.005, 0.1)  # first and longest sleep between probes

    host = HOST

    def __init__(self, *, port: int | None = None, binary: str | None = None) -> None:
        self._fixed_port = port
        self._port = port
        self._binary = binary
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._version = ""
        self._paused = False

    # ---- what a subclass says ----------------------------------------------------------------

    @abstractmethod
    def _find_binary(self) -> str:
        """The binary to run; else the subclass's "not found" error, which says how to get one."""

    def _pick_port(self) -> int:
        """A free port for the server (a subclass whose server needs more ports picks them so)."""
        return free_port()

    def _prepare(self, binary: str) -> None:
        """Called by :meth:`start` with the binary, before the temp dir exists."""
        return None  # nothing to do here

    @abstractmethod
    def _command(self, binary: str) -> list[str]:
        """The command line; :attr:`port`, :attr:`dir` and :attr:`log_path` are set by now."""

    @abstractmethod
    def _ready(self) -> bool:
        """One probe: True once the server answers *and* is our process (another one may have
        taken the port, and then ours is about to exit).  May raise ConfigurationError."""

    def _environment(self) -> dict[str, str] | None:
        """The server's environment; None: this process's."""
        return None

    def _describe(self) -> str:
        """Where the server is, for ``repr()``."""
        return f"{HOST}:{self._port}"

    # ---- the public life cycle -----------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the server listens on."""
        if self._port is None:
            raise RuntimeError(f"{self.name} not started")
        return self._port

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def dir(self) -> Path:
        if self._dir is None:
            raise RuntimeError(f"{self.name} not started")
        return self._dir

    @property
    def version(self) -> str:
        return self._version

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def paused(self) -> bool:
        """Whether :meth:`pause` stopped it (and :meth:`resume` has not continued it yet)."""
        return self._paused

    @property
    def log_path(self) -> Path:
        return self.dir / self._log_name

    def start(self) -> Self:
        """Start the server (no-op if running) and wait until it answers (see :meth:`_ready`)."""
        if self.running:
            return self
        binary = self._find_binary()
        self._prepare(binary)
        first = self._dir is None
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix=self._dir_prefix))
        try:
            self._launch(binary)
        except BaseException:
            if first:
                self.stop()  # a failed first start leaves no temp dir behind
            raise
        return self

    def stop(self, *, keep: bool = False) -> None:
        """SIGTERM (SIGKILL if the server is still up after ``_stop_timeout``), then remove the
        temp dir.  Idempotent.  ``keep=True`` leaves the dir on disk (and usable by
        :meth:`restart`)."""
        self._terminate()
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if not keep and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def kill(self) -> None:
        """SIGKILL the server, like a crash; the temp dir stays for :meth:`restart`."""
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        self._reap()

    def restart(self) -> Self:
        """Stop (if running) and start again on the same port and temp dir."""
        if self.running:
            self._terminate()
        if self._port is not None:
            # Pin the port: a restarted server on a new port would be a different endpoint.
            self._fixed_port = self._port
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets open but answers nothing."""
        self._signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self._signal(signal.SIGCONT)
        self._paused = False

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the server exits (or *timeout*); its exit code, None if still running."""
        if self._proc is None:
            return None
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self._proc.wait(timeout)
        return None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self._describe()} {state} pid={self.pid}>"

    # ---- the machinery -------------------------------------------------------------------------

    def _launch(self, binary: str) -> None:
        for attempt in range(PORT_RACE_RETRIES + 1):
            if self._port is None or (attempt and self._fixed_port is None):
                self._port = self._pick_port()
            self._spawn(binary)
            try:
                self._wait_ready()
                return
            except ConfigurationError:
                self._reap()
                # Only an auto-picked port that someone else grabbed is worth another try.
                if self._fixed_port is not None or self._clash not in self._log_tail():
                    raise
        raise ConfigurationError(f"{self.name} could not bind a free port:\n{self._log_tail()}")

    def _spawn(self, binary: str) -> None:
        self._log = (self.dir / (self._output_name or self._log_name)).open("ab")
        self._proc = _SPAWNER.popen(
            die_with_parent(self._command(binary)),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self._environment(),
            # Own session: a Ctrl-C in the terminal reaches Python, which then stops the server
            # in order, instead of killing the server behind our back.
            start_new_session=True,
        )
        self._paused = False
        with _LIVE_LOCK:
            _LIVE.add(self)

    def _wait_ready(self) -> None:
        """Probe until :meth:`_ready`, the process exits or the deadline (never a fixed sleep)."""
        deadline = time.monotonic() + START_TIMEOUT
        delay, longest = self._poll
        while True:
            if self._proc is None or self._proc.poll() is not None:
                raise ConfigurationError(f"{self.name} exited during start:\n{self._log_tail()}")
            if self._ready():
                return
            if time.monotonic() > deadline:
                raise ConfigurationError(
                    f"{self.name} did not answer within {START_TIMEOUT}s:\n{self._log_tail()}"
                )
            time.sleep(delay)  # back-off between connection attempts, not a wait for an event
            delay = min(delay * 2, longest)

    def _terminate(self) -> None:
        if self._proc is None:
            return
        if self._paused:
            # A stopped process only acts on SIGTERM once continued.
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGCONT)
        with contextlib.suppress(ProcessLookupError):
            self._proc.terminate()
        try:
            self._proc.wait(self._stop_timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._reap()

    def _reap(self) -> None:
        if self._proc is not None:
            self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        self._paused = False

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError(f"{self.name} not running")
        self._proc.send_signal(sig)

    def _log_tail(self, lines: int = 20) -> str:
        """The last lines of the log (and of the captured output, where that is another file)."""
        text = ""
        for name in dict.fromkeys((self._log_name, self._output_name or self._log_name)):
            with contextlib.suppress(OSError, RuntimeError):
                text += (self.dir / name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:]) or "(no log)"
