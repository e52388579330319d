"""Every timeout and lease of every lock kind is checked before anything waits on it.

A NaN timeout once made ``Lock.acquire`` spin at ~12k EVALSHA/s forever (NaN compares False with
everything, so the deadline never passed and every wait returned at once).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from syncmap import ConfigurationError, Lock, Redlock, RWLock, Semaphore
from syncmap.embedded import EmbeddedRedis

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("timeout", [NAN, -1, -0.001, -INF])
@pytest.mark.parametrize("kind", ["lock", "read", "write", "semaphore"])
def test_a_nan_or_negative_acquire_timeout_is_refused(
    shared_redis_url: str, kind: str, timeout: float
) -> None:
    lock = Lock("p", shared_redis_url)
    rw = RWLock("p-rw", shared_redis_url)
    sem = Semaphore("p-sem", 1, shared_redis_url)
    acquire: dict[str, Callable[..., object]] = {
        "lock": lock.acquire, "read": rw.read.acquire, "write": rw.write.acquire,
        "semaphore": sem.acquire,
    }  # fmt: skip
    with pytest.raises(ValueError, match=r"^timeout=") as caught:
        acquire[kind](timeout=timeout)
    assert "seconds" in str(caught.value)
    assert not lock.held and not rw.read.held and not rw.write.held and sem.held == 0


def test_an_infinite_timeout_waits_forever_and_zero_tries_once(shared_redis_url: str) -> None:
    lock = Lock("p", shared_redis_url)
    lock.acquire(timeout=INF)
    lock.release()
    lock.acquire(timeout=0)
    lock.release()
    with pytest.raises(TypeError, match="timeout="):
        lock.acquire(timeout="1")  # type: ignore[arg-type]


def test_a_contended_nan_timeout_is_refused_before_it_could_spin(shared_redis_url: str) -> None:
    holder, waiter = Lock("p", shared_redis_url), Lock("p", shared_redis_url)
    holder.acquire()
    try:
        with pytest.raises(ValueError, match="timeout=nan"):
            waiter.acquire(timeout=NAN)
    finally:
        holder.release()


BAD_SETTINGS: list[tuple[str, dict[str, object]]] = [
    ("lease", {"lease": NAN}),
    ("lease", {"lease": INF}),
    ("lease", {"lease": -1}),
    ("socket_timeout", {"socket_timeout": NAN}),
    ("socket_timeout", {"socket_timeout": INF}),
    ("socket_timeout", {"socket_timeout": 0}),
    ("replica_timeout", {"replica_timeout": NAN}),
    ("replica_timeout", {"replica_timeout": -0.5}),
    ("replica_timeout", {"replica_timeout": INF}),
    ("min_replicas", {"min_replicas": 0}),
    ("min_replicas", {"min_replicas": 1.5}),
]


@pytest.mark.parametrize(("name", "settings"), BAD_SETTINGS)
def test_bad_lock_settings_name_the_parameter(
    shared_redis_url: str, name: str, settings: dict[str, object]
) -> None:
    with pytest.raises(ConfigurationError, match=f"^{name}="):
        Lock("p", shared_redis_url, **settings)  # type: ignore[arg-type]
    if name in ("lease", "socket_timeout"):
        with pytest.raises(ConfigurationError, match=f"^{name}="):
            RWLock("p", shared_redis_url, **settings)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match=f"^{name}="):
            Semaphore("p", 2, shared_redis_url, **settings)  # type: ignore[arg-type]


@pytest.fixture
def three(redis_binary: str) -> list[str]:
    return [f"redis://127.0.0.1:{port}/0" for port in (1, 2, 3)]  # never dialled: refused first


@pytest.mark.parametrize(
    ("name", "settings"),
    [
        ("lease", {"lease": NAN}),
        ("lease", {"lease": INF}),
        ("retries", {"retries": -1}),
        ("retries", {"retries": 1.5}),
        ("retry_delay", {"retry_delay": NAN}),
        ("retry_delay", {"retry_delay": -0.1}),
        ("retry_delay", {"retry_delay": INF}),
        ("node_timeout", {"node_timeout": NAN}),
        ("node_timeout", {"node_timeout": 0}),
        ("node_timeout", {"node_timeout": INF}),
    ],
)
def test_bad_redlock_settings_name_the_parameter(
    three: list[str], name: str, settings: dict[str, object]
) -> None:
    with pytest.raises(ConfigurationError, match=f"^{name}="):
        Redlock("p", three, **settings)  # type: ignore[arg-type]


def test_a_redlock_acquire_refuses_a_nan_or_negative_timeout(redis_binary: str) -> None:
    servers = [EmbeddedRedis(binary=redis_binary) for _ in range(3)]
    for server in servers:
        server.start()
    try:
        lock = Redlock("p", [s.url for s in servers])
        for timeout in (NAN, -1.0):
            with pytest.raises(ValueError, match=r"^timeout="):
                lock.acquire(timeout=timeout)
        lock.acquire(timeout=INF)
        lock.release()
    finally:
        for server in servers:
            server.stop()
