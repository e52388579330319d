"""``update()`` and ``clear()`` over several buckets when one part's outcome is unknown.

On a Cluster one master may hang after its part of a multi-bucket write was sent: the executor
reports ``WriteOutcomeUnknown`` in that part's places (``partial=True``) and the other masters'
replies as usual (``store/clusterexec.py``).  The flows must then (``flows/writes.py``) drop the
unknown part's keys from the near cache (``clear``: the whole bucket, ``forget_bucket``), account
for the parts that were applied, and raise ``WriteOutcomeUnknown`` naming the unknown buckets.

The store is the in-memory one; :class:`PartlyUnknown` is an executor double that runs every
command (a hung master's part may have run) and then puts ``WriteOutcomeUnknown`` in the places
of the chosen buckets' scripts.  The integration test with a real hung master is
``tests/integration/test_cluster_hung_master.py``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from syncmap.codec import make_codec
from syncmap.config import MapConfig
from syncmap.core.nearcache import INF, NearCache
from syncmap.errors import WriteOutcomeUnknown
from syncmap.flows import admin, reads, writes
from syncmap.flows.state import MapState
from syncmap.keys import Layout, bucket_of, encode_key
from syncmap.store.commands import Command, MapCommands
from syncmap.store.memory import MemoryExecutor, MemoryStore
from syncmap.sync.run import run

BUCKETS = 4


class PartlyUnknown:
    """A :class:`MemoryExecutor` whose partial writes end ``WriteOutcomeUnknown`` in the places
    of ``unknown`` buckets' scripts, after running them."""

    def __init__(self, store: MemoryStore, layout: Layout) -> None:
        self.inner = MemoryExecutor(store)
        self.layout = layout
        self.unknown: set[int] = set()

    def call(self, commands: Sequence[Command], *, write: bool, partial: bool = False) -> list[Any]:
        replies = self.inner.call(commands, write=write, partial=partial)
        if write and partial:
            hung = {self.layout.bucket_keys(b)[0] for b in self.unknown}
            for i, cmd in enumerate(commands):
                if cmd[0] == "EVALSHA" and cmd[3] in hung:
                    replies[i] = WriteOutcomeUnknown(
                        "connection to master B failed after the write was sent (scripted)"
                    )
        return replies


class Map:
    """One server's map state on the memory store, its leases taken by a probe."""

    def __init__(self) -> None:
        self.now = 0.0
        self.store = MemoryStore(lambda: int(self.now * 1000))
        self.layout = Layout("t", "m", BUCKETS)
        core = NearCache(BUCKETS, capacity=100, max_staleness=1.0)
        cmds = MapCommands(self.layout, "s1")  # in-script publish (nothing relayed)
        self.s = MapState("m", core, cmds, make_codec(None, None), MapConfig(),
                          clock=lambda: self.now, wall=lambda: self.now)  # fmt: skip
        self.ex = PartlyUnknown(self.store, self.layout)
        core.on_feed_up()
        run(admin.probe(self.s), self.ex)

    def key_in(self, bucket: int, n: int = 0) -> str:
        found = [k for i in range(1000) if bucket_of(encode_key(k := f"k{i}", 1000), BUCKETS)
                 == bucket]  # fmt: skip
        return found[n]

    def update(self, values: dict[str, Any]) -> list[Any]:
        items = writes.items_of(values.items(), self.s)
        return run(writes.update(self.s, items, ttl_ms=0, fence=None), self.ex)

    def read(self, key: str) -> Any:
        field = encode_key(key, 1000)
        value, _, _ = run(reads.read(self.s, field, key, bucket_of(field, BUCKETS),
                                     consistent=False), self.ex)  # fmt: skip
        return value

    def cache(self, *keys: str) -> None:
        """Read ``keys`` so that they are cached (their buckets are under lease)."""
        for key in keys:
            self.read(key)
        assert set(keys) <= set(self.s.core.entries), "the reads cached nothing"


@pytest.fixture
def m() -> Map:
    return Map()


def test_update_drops_the_unknown_parts_keys_and_accounts_for_the_applied(m: Map) -> None:
    applied, hung = m.key_in(0), m.key_in(1)
    m.update({applied: 1, hung: 1})
    m.cache(applied, hung)
    core = m.s.core
    # Fills in flight when the update goes out: the applied key's learns the write's version,
    # the unknown one's can never install (its key may hold the new value or the old).
    fill_applied, fill_hung = core.begin_fill(applied, 0), core.begin_fill(hung, 1)
    m.ex.unknown = {1}
    with pytest.raises(WriteOutcomeUnknown) as err:
        m.update({applied: 2, hung: 2})
    assert hung not in core.entries, "the unknown part's key is still cached"
    assert fill_hung.max_seen == INF
    assert fill_applied.max_seen == 2  # the applied part's write (version 2) was noted
    text = str(err.value)
    assert f"update(): the parts of bucket(s) 1 (keys {hung!r}) may or may not" in text
    assert "of 2 bucket parts 1 were applied, 0 refused" in text
    assert m.read(applied) == 2 and m.read(hung) == 2  # read again: the store's values


def test_clear_forgets_the_unknown_buckets_and_accounts_for_the_applied(m: Map) -> None:
    keys = [m.key_in(b) for b in range(BUCKETS)]
    m.update(dict.fromkeys(keys, 1))
    m.cache(*keys)
    core = m.s.core
    gens = [b.gen for b in core.buckets]
    m.ex.unknown = {2}
    with pytest.raises(WriteOutcomeUnknown) as err:
        run(writes.clear(m.s, fence=None), m.ex)
    assert keys[2] not in core.entries, "the unknown bucket's entry is still cached"
    assert not core.held(2)
    for b in (0, 1, 3):  # applied: cleared here as the store was
        assert keys[b] not in core.entries and core.buckets[b].gen > gens[b]
    text = str(err.value)
    assert "clear(): the parts of bucket(s) 2 may or may not have been applied" in text
    assert f"of {BUCKETS} bucket parts 3 were applied, 0 refused" in text
    assert all(m.read(k) is reads.MISSING for k in keys)
