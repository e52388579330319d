"""Shared fixtures: real redis-server processes on free loopback ports (no in-memory imitation).

A test that injects faults (kill, pause, restart) takes ``redis_server``, its own process.  A test
that only needs a working Redis takes ``shared_redis_url``: one process for the whole session,
flushed before each test.

No binary found: the fixtures skip locally, but fail when ``CI=true`` so CI cannot go green by
silently skipping every integration test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NoReturn

import pytest
import redis

from syncmap.embedded import ENV_VAR, EmbeddedRedis, find_redis_server
from syncmap.errors import RedisServerNotFound


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--redis-binary",
        default=None,
        help=f"redis-server binary for the tests (default: ${ENV_VAR}, then the usual search)",
    )


def pytest_configure(config: pytest.Config) -> None:
    binary = config.getoption("--redis-binary")
    if binary:
        # Pass it on through the environment, so subprocesses started by tests use it too.
        os.environ[ENV_VAR] = binary


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


@pytest.fixture
def redis_server(redis_binary: str) -> Iterator[EmbeddedRedis]:
    """A private redis-server for this test; free to kill, pause and restart."""
    server = EmbeddedRedis(binary=redis_binary)
    server.start()
    try:
        yield server
    finally:
        server.stop()


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
