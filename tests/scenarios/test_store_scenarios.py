"""TESTPLAN §8 store scenarios, short form: S01 (linearizable baseline), S02 (linearizable under
connection kills, a write pause and a kill -9 + restart), S03 (durability per persistence mode).

Each oracle is also shown to fail when it should: a stale read planted in S01's recorded history
must be reported not linearizable, S02 without persistence must report lost writes and
non-linearizable keys, and S03 without persistence must count every acknowledged write as lost.
``pytest -s`` prints each scenario's figures.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from syncmap.testing.recorder import load_records
from syncmap.testing.scenario import ACKED_LOST, ANOMALIES, OPS, UNKNOWN_KEYS, Env, ScenarioResult
from syncmap.testing.scenarios_store import s01, s02, s03
from syncmap.testing.storecheck import check_records, plant_stale_read

pytestmark = pytest.mark.scenario


def show(result: ScenarioResult) -> None:
    print(f"\n{result.summary()}")


@pytest.fixture(scope="module")
def s01_run(redis_binary: str, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[ScenarioResult, Path]:  # fmt: skip
    """One S01 run on a private server, its history saved as JSON lines."""
    path = tmp_path_factory.mktemp("s01") / "history.jsonl"
    return s01(Env(redis_binary=redis_binary), 4.0, history_path=path), path


def test_s01_auth_linearizable_baseline(s01_run: tuple[ScenarioResult, Path]) -> None:
    result, _ = s01_run
    show(result)
    assert result.passed, result.failures
    fig = result.figures
    assert fig[OPS] > 1000 and fig["keys_checked"] >= 5
    assert fig["keys_nonlinearizable"] == 0 and fig[ANOMALIES] == 0
    assert fig[UNKNOWN_KEYS] == 0  # no faults, <= 8 clients per key: every key is decided
    assert fig["ops_info"] == 0 and fig["ops_fail"] == 0


def test_s01_oracle_catches_a_planted_stale_read(s01_run: tuple[ScenarioResult, Path]) -> None:
    """The negative control: the same checker, over the same recorded history with one read
    changed to a value overwritten before the read began, must say "not linearizable"."""
    _, path = s01_run
    records = load_records(path)
    clean = check_records(records)
    assert clean.verdict == "linearizable" and clean.anomalies == 0
    planted, what = plant_stale_read(records)
    checked = check_records(planted)
    print(f"\nplanted: {what}; verdict: {checked.verdict}, sweep: {checked.sweep.summary()}")
    assert checked.verdict == "not linearizable", checked.witness
    assert checked.keys_failed == 1
    assert checked.sweep.stale_beyond_delta == 1  # the version sweep sees it too


def test_s01_on_a_users_redis_leaves_no_key_behind(shared_redis_url: str) -> None:
    """What ``syncmap verify`` runs against a user's Redis: a map of its own, removed afterwards."""
    result = s01(Env(url=shared_redis_url), 1.5)
    show(result)
    assert result.passed, result.failures
    client = redis.Redis.from_url(shared_redis_url)
    try:
        assert client.dbsize() == 0, sorted(client.scan_iter(count=1000))[:10]
    finally:
        client.close()


def test_s02_auth_linearizable_conn_faults(redis_binary: str) -> None:
    result = s02(Env(redis_binary=redis_binary), 6.0)
    show(result)
    assert result.passed, result.failures
    fig = result.figures
    assert fig["restarts"] == 1 and fig["pauses"] == 1 and fig["clients_killed"] > 0
    assert fig["ops_info"] > 0, "connection kills must leave some writes indeterminate"
    assert fig["write_latency_max_ms"] >= 200, "the CLIENT PAUSE WRITE must hold some write"
    assert fig[ACKED_LOST] == 0 and fig[ANOMALIES] == 0


def test_s02_without_persistence_must_fail(redis_binary: str) -> None:
    """The guard-off form: Redis without AOF forgets everything at the kill -9, so C7 and WGL
    must both report it (proves S02's oracles see lost writes)."""
    result = s02(Env(redis_binary=redis_binary), 4.0, guard=False)
    show(result)
    assert not result.passed
    assert result.figures[ACKED_LOST] > 0
    assert result.figures["keys_nonlinearizable"] > 0


def test_s03_durability_modes(redis_binary: str) -> None:
    result = s03(Env(redis_binary=redis_binary), 3.0)
    show(result)
    assert result.passed, result.failures
    fig = result.figures
    assert fig["lost_always"] == 0 and fig[ACKED_LOST] == 0
    # Without persistence the restart forgets everything: the comparison does see losses.
    assert fig["acked_none"] > 0 and fig["lost_none"] == fig["acked_none"]
