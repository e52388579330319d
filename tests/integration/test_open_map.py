"""Construction without tricks: ``SyncMap`` is store mode, ``ReplicatedMap`` replicated mode, and
``open_map`` chooses *after* reading ``SYNCMAP_URL`` (issue: adding ``feed=`` to a service that
ran on ``SYNCMAP_URL`` silently dropped its store)."""

from __future__ import annotations

import inspect

import pytest

from syncmap import ConfigurationError, MapConfig, ReplicatedMap, SyncMap, open_map

CFG = MapConfig(presence=False)


def test_syncmap_is_store_mode_and_help_shows_its_real_signature() -> None:
    assert "__new__" not in SyncMap.__dict__
    params = inspect.signature(SyncMap).parameters
    assert list(params)[:2] == ["name", "url"] and "feed" in params and "redis" in params


def test_syncmap_without_a_store_says_how_to_get_replicated_mode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SYNCMAP_URL", raising=False)
    with pytest.raises(ConfigurationError, match=r"no Redis given.*ReplicatedMap.*open_map"):
        SyncMap("m", feed="nats://127.0.0.1:4222", config=CFG)


def test_open_map_reads_syncmap_url_before_choosing_the_mode(
    monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """A feed and SYNCMAP_URL: store mode with that feed, never a silent replicated map."""
    monkeypatch.setenv("SYNCMAP_URL", redis_url)
    with open_map("m", feed=redis_url, config=CFG) as m:
        assert type(m) is SyncMap
        m["k"] = 1
        assert m.get("k", consistent=True) == 1


def test_open_map_without_a_store_but_a_feed_is_replicated(monkeypatch: pytest.MonkeyPatch,
                                                            redis_url: str) -> None:  # fmt: skip
    monkeypatch.delenv("SYNCMAP_URL", raising=False)
    with open_map("m", feed=redis_url, snapshot={}, config=CFG) as m:
        assert type(m) is ReplicatedMap


def test_open_map_with_neither_names_both_fixes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SYNCMAP_URL", raising=False)
    with pytest.raises(ConfigurationError, match=r"SYNCMAP_URL.*replicated"):
        open_map("m")


def test_fast_hits_is_the_same_class_to_callers(redis_url: str) -> None:
    with SyncMap("m", redis_url, config=MapConfig(presence=False, fast_hits=True)) as m:
        assert isinstance(m, SyncMap)
        m["k"] = 2
        assert m["k"] == 2
