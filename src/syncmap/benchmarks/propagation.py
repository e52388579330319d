"""Propagation: how long until a write is visible in other server processes, for every feed.

One writer (this process) and N receiver processes (``spawn``).  For each feed and each N, a
segment: the first N receivers open the map with that feed and subscribe (``inline=True``: the
callback runs the moment the change is applied, i.e. when a read would see it), the writer makes
``writes`` writes spaced ``gap`` apart (±25 % jitter), each to a new integer key, stamping
``time.monotonic_ns()`` just before the call; each receiver stamps the event's arrival.  The
baseline is raw redis-py: ``PUBLISH`` to N plain subscribers, in the same rounds.  Segments are
interleaved (every feed and N in one round, the order reversed every other round).

A feed whose map cannot be opened here (its broker is not running, its client library is not
installed, the scheme is not built yet) is reported as "not available" with the reason.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import random
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from typing import Any
from urllib.parse import urlsplit

import redis

from .. import Event, MapConfig, SyncMap, SyncMapError
from .context import Bench
from .method import Row, Section, pct
from .workers import Pool, WorkerError, serve

RAW = "raw redis-py PUBLISH"
DEFAULT_BROKERS = ("amqp://guest:guest@127.0.0.1:5672/%2F", "nats://127.0.0.1:4222",
                   "nats+jetstream://127.0.0.1:4222", "kafka://127.0.0.1:9092")  # fmt: skip
TARGET_N = 8  # DESIGN §4: propagation to 8 servers, p50 ≤ 0.5 ms and p99 ≤ 2 ms on loopback
Deliveries = list[tuple[int, int]]  # (write id, CLOCK_MONOTONIC ns when the receiver saw it)


@dataclass(frozen=True, slots=True)
class PropagationPlan:
    rounds: int
    writes: int  # writes per segment
    gap: float  # seconds between writes (mean)
    receivers: tuple[int, ...]


def default_feeds(url: str) -> list[str | None]:
    """Redis pub/sub on the store (None), a Redis Stream on the same server, the usual brokers."""
    stream = "redis+stream" + url[url.index("://") :] if url.startswith("redis://") else None
    return [None, *([stream] if stream else []), *DEFAULT_BROKERS]


def label(feed: str | None) -> str:
    return "redis pub/sub" if feed is None else urlsplit(feed).scheme


# ---- receivers (other processes) ------------------------------------------------------------


class _Listener:
    """What one receiver process has open during one segment."""

    def __init__(self, url: str, ns: str, cmd: tuple[Any, ...]) -> None:
        self.got: Deliveries = []
        self._close: Callable[[], None]
        if cmd[1] == "raw":
            self._raw(url, cmd[2])
        else:
            m = SyncMap(cmd[2], url=url, feed=cmd[3],
                        config=MapConfig(namespace=ns, presence=False))  # fmt: skip
            m.subscribe(self._on_event, inline=True)
            self._close = m.close

    def _on_event(self, event: Event) -> None:
        now = time.monotonic_ns()
        if isinstance(event.key, int):
            self.got.append((event.key, now))

    def _raw(self, url: str, channel: str) -> None:
        client = redis.Redis.from_url(url)
        pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]

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

    def close(self) -> Deliveries:
        self._close()
        return self.got


def _receiver(wid: int, cmds: Queue[Any], out: Queue[Any], url: str, ns: str) -> None:
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


def _reachable(feed: str) -> str:
    """'' when something listens at the feed URL's host:port, else why not."""
    parts = urlsplit(feed)
    host, port = parts.hostname or "127.0.0.1", parts.port
    if port is None:
        return ""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return ""
    except OSError:
        return f"not available: nothing listening on {host}:{port}"


def _contenders(b: Bench, feeds: Sequence[str | None]) -> tuple[list[Contender], dict[str, str]]:
    found: list[Contender] = []
    absent: dict[str, str] = {}
    for i, feed in enumerate(feeds):
        name, map_name = label(feed), f"prop-{i}"
        if feed is not None and (why := _reachable(feed)):
            absent[name] = why
            continue
        writer = functools.partial(_map_writer, b, map_name, feed)
        try:
            with writer():
                pass
        except (SyncMapError, ImportError, OSError) as exc:
            absent[name] = f"not available: {type(exc).__name__}: {exc}"
            continue
        found.append(Contender(name, ("open", "map", map_name, feed), writer))
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
    pool = Pool.start(_receiver, max(plan.receivers), (b.url, b.ns))
    ids = itertools.count()
    try:
        for r in range(plan.rounds + 1):  # round 0: a short warm-up segment of each contender
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
    finally:
        pool.stop()
    live = [c for c in contenders if c.name not in absent]
    return _section(live, absent, plan)


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
        Row(f"{c.name} → {_receivers(n)}: p50", "ms", mine["p50"], base["p50"], key=key + ".p50",
            at_most=0.5 if target else None, note=note),
        Row(f"  {c.name} → {_receivers(n)}: p99", "ms", mine["p99"], base["p99"],
            key=key + ".p99", at_most=2.0 if target else None),
    ]  # fmt: skip


def _receivers(n: int) -> str:
    return f"{n} receiver" + ("" if n == 1 else "s")
