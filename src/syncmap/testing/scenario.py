"""The shape every named scenario (TESTPLAN §8) shares, so tests, ``syncmap torture`` and
``syncmap verify`` run the same code.

A scenario is a function ``(env, seconds) -> ScenarioResult`` registered under its TESTPLAN id
with :func:`scenario`.  It starts what it needs through ``env`` (private ``redis-server``
processes it may kill, pause and restart, or the user's Redis for the scenarios that inject no
server faults), runs for about ``seconds``, and reports:

* ``figures``: what TESTPLAN says the scenario reports.  The standard names below are the columns
  of the torture table; a scenario adds its own as it likes.
* ``failures``: every "must" that did not hold, in words.  Empty means the scenario passed.

A scenario that guards against a bug takes ``guard=False`` in its keyword arguments (where it
applies): it then runs with that protection switched off and *must* report failures.  Tests run
both forms; the guard-off one asserts ``not result.passed``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ..embedded import EmbeddedRedis, find_redis_server
from ..errors import ConfigurationError
from .clusterset import ClusterSet
from .sentinelset import SentinelSet

#: Standard figure names (the torture table's columns).  Use them when they apply.
OPS = "ops"  # operations checked
ANOMALIES = "anomalies"  # violations of a "must 0"
STALE_P50 = "staleness_p50_ms"
STALE_P99 = "staleness_p99_ms"
STALE_MAX = "staleness_max_ms"
ACKED_LOST = "acked_writes_lost"
FENCED_ACCEPTED = "stale_fenced_accepted"
FENCED_REJECTED = "stale_fenced_rejected"
UNKNOWN_KEYS = "keys_unknown"  # the linearizability checker ran out of budget on these
STANDARD = (OPS, ANOMALIES, STALE_P50, STALE_P99, STALE_MAX, ACKED_LOST, FENCED_ACCEPTED,
            FENCED_REJECTED, UNKNOWN_KEYS)  # fmt: skip


@dataclass(slots=True)
class ScenarioResult:
    id: str  # "S04"
    name: str  # "nearcache-staleness-load"
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def require(self, ok: bool, what: str) -> None:
        """Record a "must": ``what`` says what had to hold (with the numbers)."""
        if not ok:
            self.failures.append(what)

    def summary(self) -> str:
        figs = ", ".join(f"{k}={v}" for k, v in self.figures.items())
        verdict = "PASS" if self.passed else "FAIL: " + "; ".join(self.failures)
        return f"{self.id} {self.name} ({self.seconds:.1f} s): {figs} -> {verdict}"


Topology = Literal["standalone", "sentinel", "cluster"]


class Store(Protocol):
    """A private store a scenario may fault (``EmbeddedRedis``, ``SentinelSet``,
    ``ClusterSet``): ``url`` for its maps, its checkers and its faults (``faults.master_clients``
    reaches every master that takes writes now, ``faults.admin_client`` one key's)."""

    @property
    def url(self) -> str: ...


@dataclass(slots=True)
class Env:
    """Where a scenario runs.  ``redis_binary`` for private servers; ``url`` for a user's Redis
    (only scenarios that inject no server fault may use it; they must clean up their keys).

    ``topology``: what :meth:`store` starts, one ``redis-server``, a Sentinel set (a master,
    a replica and three Sentinels; the maps open ``redis+sentinel://``) or a Redis Cluster (3
    masters + 3 replicas; ``redis+cluster://``).  Only the scenarios that take their store
    from :meth:`store` run on Sentinel or Cluster (S01, S04, S07, S12, S13, S14 and the
    asyncio variants; S16-cluster has a module of its own); the others need one node to
    kill, restart or put a proxy in front of, and :meth:`server` refuses such an ``Env``
    rather than quietly run them standalone."""

    redis_binary: str | None = None
    url: str | None = None
    namespace: str = "sm"
    topology: Topology = "standalone"
    cluster: ClusterSet | None = None
    """A running cluster that :meth:`store` yields (``topology="cluster"``) instead of starting
    one: a test module shares one across scenarios that inject no node fault and put back what
    they change (S12-, S14-, S16-cluster).  ``None``: a private cluster per store."""

    @contextlib.contextmanager
    def store(self, *, down_after_ms: int = 1000) -> Iterator[Store]:
        """A private store of :attr:`topology`, stopped afterwards.  ``down_after_ms``: the
        Sentinels' down-after (Sentinel only): the maps' data sockets time out at half of it
        whatever their ``socket_timeout`` (``store/sentinel.py``)."""
        if self.topology == "sentinel":
            with SentinelSet(binary=self.redis_binary, down_after_ms=down_after_ms) as sentinels:
                yield sentinels
        elif self.topology == "cluster" and self.cluster is not None:
            yield self.cluster
        elif self.topology == "cluster":
            with ClusterSet(binary=self.redis_binary) as cluster:
                yield cluster
        else:
            with self._server() as server:
                yield server

    def server(self, **kwargs: Any) -> contextlib.AbstractContextManager[EmbeddedRedis]:
        """A private redis-server, stopped afterwards (kwargs: EmbeddedRedis's)."""
        if self.topology != "standalone":
            raise ConfigurationError(
                f"this scenario runs on one redis-server only, not on Env(topology="
                f"{self.topology!r}): run it with Env(topology='standalone')"
            )
        return self._server(**kwargs)

    @contextlib.contextmanager
    def _server(self, **kwargs: Any) -> Iterator[EmbeddedRedis]:
        binary = self.redis_binary or find_redis_server()
        server = EmbeddedRedis(binary=binary, **kwargs)
        server.start()
        try:
            yield server
        finally:
            server.stop()


Scenario = Callable[..., ScenarioResult]


@dataclass(frozen=True, slots=True)
class Registered:
    id: str
    name: str
    run: Scenario
    faults_server: bool  # needs a private server (kills, pauses, restarts it)


REGISTRY: dict[str, Registered] = {}


def scenario(sid: str, name: str, *, faults_server: bool = True) -> Callable[[Scenario], Scenario]:
    """Register ``fn(env, seconds, **options) -> ScenarioResult`` as scenario ``sid``."""

    def register(fn: Scenario) -> Scenario:
        REGISTRY[sid] = Registered(sid, name, fn, faults_server)
        return fn

    return register


def timed(sid: str, name: str) -> tuple[ScenarioResult, float]:
    """A fresh result and the start time (``result.seconds`` is set by :func:`finish`)."""
    return ScenarioResult(sid, name), time.monotonic()


def finish(result: ScenarioResult, started: float) -> ScenarioResult:
    result.seconds = time.monotonic() - started
    return result
