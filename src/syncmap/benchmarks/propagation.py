"""Propagation: how long until a write is visible in other server processes, for every feed.

One writer (this process) and N receiver processes (``spawn``).  For each feed and each N, a
segment: the first N receivers open the map with that feed and subscribe (``inline=True``: the
callback runs the moment the change is applied, i.e. when a read would see it), the writer makes
``writes`` writes spaced ``gap`` apart (±25 % jitter), each to a new integer key, stamping
``time.monotonic_ns()`` just before the call; each receiver stamps the event's arrival.  The
baseline is raw redis-py: ``PUBLISH`` to N plain subscribers, in the same rounds.  Segments are
interleaved (every feed and N in one round, the order reversed every other round).

By default the feeds on the store's own Redis (pub/sub and a Stream): the brokers' feeds are
measured by the ``feeds`` section (``feedbench.py``) against their own broker's raw delay, which
this section's machinery (:func:`measure`, the receivers) serves as well.  A feed whose map cannot
be opened here (its broker is not running, its client library is not installed) is reported as
"not available" with the reason.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from typing import Any

import redis

from .. import Event, MapConfig, SyncMap, SyncMapError
from ..feed.base import FeedHandler, open_feed
from ..store.topology import open_topology
from .brokers import drop_streams, label, reachable, stream_on
from .context import Bench
from .method import Row, Section, pct
from .workers import Pool, WorkerError, serve

RAW = "raw redis-py PUBLISH"
TARGET_N = 8  # DESIGN §4: propagation to 8 servers, p50 ≤ 0.5 ms and p99 ≤ 2 ms on loopback
Deliveries = list[tuple[int, int]]  # (write id, CLOCK_MONOTONIC ns when the receiver saw it)


@dataclass(frozen=True, slots=True)
class PropagationPlan:
    rounds: int
    writes: int  # writes per segment
    gap: float  # seconds between writes (mean)
    receivers: tuple[int, ...]


def default_feeds(url: str) -> list[str | None]:
    """Redis pub/sub on the store (None) and a Redis Stream on the same server."""
    stream = stream_on(url)
    return [None, *([stream] if stream else [])]


# ---- receivers (other processes) ------------------------------------------------------------


class _Listener:
    """What one receiver process has open during one segment."""

    def __init__(self, url: str, ns: str, cmd: tuple[Any, ...]) -> None:
        self.got: Deliveries = []
        self._close: Callable[[], None]
        if cmd[1] == "raw":
            self._raw(url, cmd[2])
        elif cmd[1] == "sraw":  # a Redis Cluster's sharded channel (the cluster section)
            self._sharded_raw(url, cmd[2])
        elif cmd[1] == "feed":  # the feed's own client, no map: ("open", "feed", url, topic)
            feed = open_feed(cmd[2], cmd[3])
            feed.subscribe(FeedHandler(self._on_payload))
            self._close = feed.close
        else:
            m = SyncMap(cmd[2], url=url, feed=cmd[3],
                        config=MapConfig(namespace=ns, presence=False))  # fmt: skip
            m.subscribe(self._on_event, inline=True)
            self._close = m.close

    def _on_event(self, event: Event) -> None:
        now = time.monotonic_ns()
        if isinstance(event.key, int):
            self.got.append((event.key, now))

    def _on_payload(self, payload: bytes, position: str | None) -> None:
        now = time.monotonic_ns()
        if payload.isdigit():  # not a writer's warm-up message
            self.got.append((int(payload), now))

    def _raw(self, url: str, channel: str) -> None:
        client = redis.Redis.from_url(url)
        pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call,unused-ignore]

        def on_message(msg: dict[str, Any]) -> None:
            self.got.append((int(msg["data"]), time.monotonic_ns()))

        pubsub.subscribe(**{channel: on_message})
        pubsub.get_message(timeout=5)  # the confirmation: from now on PUBLISH reaches us
        thread = pubsub.run_in_thread(sleep_time=1.0, daemon=True)

        def close() -> None:
            thread.stop()
            thread.join(5)
            pubsub.close()
            client.close()

        self._close = close

    def _sharded_raw(self, url: str, channel: str) -> None:
        # ClusterTopology.client: a redis-py RedisCluster (ClusterPubSub) on the cluster ``url``.
        client = open_topology(url, timeout=None).client()  # type: ignore[attr-defined]
        pubsub = client.pubsub(ignore_subscribe_messages=True)

        def on_message(msg: dict[str, Any]) -> None:
            self.got.append((int(msg["data"]), time.monotonic_ns()))

        pubsub.ssubscribe(**{channel: on_message})
        pubsub.get_sharded_message(timeout=5)  # the confirmation: from now on SPUBLISH reaches us
        thread = pubsub.run_in_thread(sleep_time=1.0, daemon=True, sharded_pubsub=True)

        def close() -> None:
            thread.stop()
            thread.join(5)
            pubsub.close()
            client.close()

        self._close = close

    def close(self) -> Deliveries:
        self._close()
        return self.got


def receiver(wid: int, cmds: Queue[Any], out: Queue[Any], url: str, ns: str) -> None:
    current: list[_Listener] = []

    def handle(cmd: tuple[Any, ...]) -> Any:
        if cmd[0] == "open":
            current.append(_Listener(url, ns, cmd))
            return None
        return current.pop().close()

    serve(wid, cmds, out, handle)


# ---- the writer (this process) --------------------------------------------------------------


@dataclass(slots=True)
class Contender:
    """A feed (or the raw baseline) and what its segments found, per receiver count."""

    name: str
    open_cmd: tuple[Any, ...]
    writer: Callable[[], contextlib.AbstractContextManager[Callable[[int], Any]]]
    delays: dict[int, list[float]] = field(default_factory=dict)  # N -> ms, every delivery
    missing: dict[int, int] = field(default_factory=dict)

    def record(self, n: int, sent: dict[int, int], got: dict[int, Deliveries]) -> None:
        delays = [(t - sent[i]) / 1e6 for d in got.values() for i, t in d if i in sent]
        self.delays.setdefault(n, []).extend(delays)
        self.missing[n] = self.missing.get(n, 0) + len(sent) * len(got) - len(delays)

    def stats(self, n: int) -> dict[str, float]:
        xs = sorted(self.delays.get(n, []))
        return {"p50": pct(xs, 0.5), "p99": pct(xs, 0.99), "max": xs[-1] if xs else float("nan"),
                "deliveries": len(xs), "missing": self.missing.get(n, 0)}  # fmt: skip


def map_contender(b: Bench, name: str, map_name: str, feed: str | None) -> Contender | str:
    """The segments' contender for syncmap's map ``map_name`` on ``feed``; or why it cannot run."""
    writer = functools.partial(_map_writer, b, map_name, feed)
    try:
        with writer():
            pass
    except (SyncMapError, ImportError, OSError) as exc:
        return f"not available: {type(exc).__name__}: {exc}"
    return Contender(name, ("open", "map", map_name, feed), writer)


def _contenders(b: Bench, feeds: Sequence[str | None]) -> tuple[list[Contender], dict[str, str]]:
    found: list[Contender] = []
    absent: dict[str, str] = {}
    for i, feed in enumerate(feeds):
        name = label(feed)
        why = reachable(feed) if feed is not None else ""
        c = why or map_contender(b, name, f"prop-{i}", feed)
        if isinstance(c, str):
            absent[name] = c
        else:
            found.append(c)
    channel = b.raw("prop-ch")
    publish = functools.partial(_publish, b.client, channel)
    found.append(Contender(RAW, ("open", "raw", channel), lambda: contextlib.nullcontext(publish)))
    return found, absent


@contextlib.contextmanager
def _map_writer(b: Bench, name: str, feed: str | None) -> Iterator[Callable[[int], Any]]:
    """The writer's map, open only during its own segments: an idle feed client (its threads,
    its broker's work) must not run inside another feed's segment."""
    m = SyncMap(name, url=b.url, feed=feed, config=MapConfig(namespace=b.ns, presence=False))
    try:
        yield lambda i: m.set(i, 0)
    finally:
        m.close()


def _publish(client: redis.Redis, channel: str, i: int) -> None:
    client.publish(channel, str(i))


def _segment(pool: Pool, c: Contender, n: int, writes: int, gap: float,
             ids: Iterator[int]) -> tuple[dict[int, int], dict[int, Deliveries]]:  # fmt: skip
    wids = range(n)
    sent: dict[int, int] = {}
    with c.writer() as write:
        pool.ask(wids, c.open_cmd, 60)
        try:
            time.sleep(0.05)  # connections and threads of the new maps settle
            for _ in range(writes):
                i = next(ids)
                t = time.monotonic_ns()
                write(i)
                sent[i] = t
                time.sleep(gap * random.uniform(0.75, 1.25))
            time.sleep(0.15)  # the last deliveries land
        finally:
            got = pool.ask(wids, ("close",), 60)
    return sent, got


def run(b: Bench, plan: PropagationPlan, feeds: Sequence[str | None]) -> Section:
    contenders, absent = _contenders(b, feeds)
    pool = Pool.start(receiver, max(plan.receivers), (b.url, b.ns))
    try:
        measure(pool, contenders, plan, absent)
    finally:
        pool.stop()
        drop_streams(feeds, b.ns)  # a JetStream feed's streams
    live = [c for c in contenders if c.name not in absent]
    return _section(live, absent, plan)


def measure(pool: Pool, contenders: Sequence[Contender], plan: PropagationPlan,
            absent: dict[str, str]) -> None:  # fmt: skip
    """Every contender's segments at every N, interleaved: one round has them all, the order
    reversed every other round; round 0 is a short warm-up at the largest N, thrown away.  A
    contender whose receivers fail is moved to ``absent``."""
    ids = itertools.count()
    for r in range(plan.rounds + 1):
        configs = [(c, n) for n in plan.receivers for c in contenders]
        for c, n in configs[::-1] if r % 2 else configs:
            if c.name in absent or (r == 0 and n != max(plan.receivers)):
                continue
            try:
                sent, got = _segment(pool, c, n, plan.writes if r else plan.writes // 5 or 1,
                                     plan.gap, ids)  # fmt: skip
            except WorkerError as exc:
                absent[c.name] = f"not available: a receiver failed: {exc}"
                continue
            if r:
                c.record(n, sent, got)


def _section(live: list[Contender], absent: dict[str, str], plan: PropagationPlan) -> Section:
    raw = next(c for c in live if c.name == RAW)
    rows: list[Row] = []
    series = {c.name: {str(n): c.stats(n) for n in plan.receivers} for c in live}
    for c in live:
        if c is raw:
            continue
        for n in plan.receivers:
            rows += _rows(c, raw, n)
    for name, why in absent.items():
        if name != RAW:
            rows.append(Row(f"{name}: write → visible", "ms", None, None,
                            key=f"propagation.{name}", absent=why))  # fmt: skip
    notes = [
        f"The peer of every row is {RAW} to N plain redis-py subscribers (a thread each, "
        "`run_in_thread`) in the same rounds; ratio = quotient of the percentiles."
    ]
    return Section(
        "propagation",
        "Propagation (write → visible in N other processes)",
        rows,
        {"receivers": list(plan.receivers), "feeds": series, "absent": absent},
        notes,
    )


def _rows(c: Contender, raw: Contender, n: int) -> list[Row]:
    mine, base = c.stats(n), raw.stats(n)
    note = (f"max {mine['max']:.3g} ms (raw {base['max']:.3g} ms); {mine['deliveries']:,.0f} "
            f"deliveries")  # fmt: skip
    if mine["missing"] or base["missing"]:
        note += f"; **MISSING deliveries: {mine['missing']:,.0f} (raw {base['missing']:,.0f})**"
    target = n == TARGET_N
    key = f"propagation.{c.name}.{n}"
    return [
        Row(f"{c.name} → {receivers(n)}: p50", "ms", mine["p50"], base["p50"], key=key + ".p50",
            at_most=0.5 if target else None, note=note),
        Row(f"  {c.name} → {receivers(n)}: p99", "ms", mine["p99"], base["p99"],
            key=key + ".p99", at_most=2.0 if target else None),
    ]  # fmt: skip


def receivers(n: int) -> str:
    return f"{n} receiver" + ("" if n == 1 else "s")
