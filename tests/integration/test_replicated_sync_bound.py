"""Replicated mode: sync requests cannot pile up.  Each answer re-sends the whole map, so one
pending answer per peer covers all of that peer's requests, and at most MAX_PENDING_ANSWERS
peers wait at once; past that a request is dropped and counted."""

from __future__ import annotations

import pytest
import redis

from syncmap import ReplicatedMap, replicalogic
from syncmap.core.replica import R_SYNC, ReplicaMessage
from syncmap.testing.wait import wait_until


def _requests(m: ReplicatedMap, peers: list[str]) -> list[bytes]:
    return [m._seal(ReplicaMessage(R_SYNC, 0, peer)) for peer in peers]


def test_sync_requests_are_coalesced_per_peer_and_bounded(
    redis_url: str, admin: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replicalogic, "MAX_PENDING_ANSWERS", 4)
    with ReplicatedMap("sync-bound", redis_url, snapshot={}) as m:
        topic = m._feed.topic
        pipe = admin.pipeline(transaction=False)
        for data in _requests(m, ["one-peer"] * 300 + [f"peer-{i}" for i in range(300)]):
            pipe.publish(topic, data)
        pipe.execute()
        # Every request either became (or joined) a pending answer, or was dropped and counted.
        wait_until(lambda: m.statistics().sync_requests_dropped > 0, 10, "a dropped request")
        wait_until(lambda: m._work.empty() and not m._answers_due, 20, "the answers sent")
        stats = m.statistics()
        # 600 requests: some joined an answer already pending for their peer (coalesced), so
        # answers plus drops are fewer than the requests.
        assert stats.syncs_answered + stats.sync_requests_dropped < 600
