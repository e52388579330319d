"""One benchmark run: start what it needs, run the chosen sections, write the report.

The plans say how much work each section does: ``quick`` (the default, a few minutes), ``full``
(more rounds, 16 receivers, 1M-entry maps) and ``smoke`` (tiny: only proves the command works).
Brokers the ``feeds`` section starts (NATS, Tansu) are stopped when that section ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

from ..embedded import EmbeddedRedis
from ..errors import SyncMapError
from . import (
    aiobench,
    brokers,
    clusterbench,
    feedbench,
    fleet,
    locks,
    plots,
    propagation,
    reads,
    report,
    scaling,
    writes,
)
from .aiohandoff import AsyncHandoffPlan
from .clusterbulk import BulkPlan
from .context import Bench, environment, load_average
from .handoff import HandoffPlan
from .herd import HerdPlan
from .method import Section
from .peers import Unavailable
from .spinning import SpinPlan

SECTIONS = (
    "reads",
    "writes",
    "propagation",
    "feeds",
    "locks",
    "scaling",
    "asyncio",
    "cluster",
    "fleet",
)
KiB, MiB = 1 << 10, 1 << 20
VALUE_SIZES = (100, KiB, 10 * KiB, 100 * KiB, MiB)


@dataclass(frozen=True, slots=True)
class Plan:
    reads: reads.ReadPlan
    writes: writes.WritePlan
    propagation: propagation.PropagationPlan
    feeds: feedbench.FeedPlan
    locks: locks.LockPlan
    scaling: scaling.ScalePlan
    aio: aiobench.AsyncPlan
    cluster: clusterbench.ClusterPlan
    fleet: fleet.FleetPlan


PLANS = {
    "smoke": Plan(
        reads.ReadPlan(rounds=1, hit_reps=2, io_ops=10, spin=SpinPlan(writes=20, gap=0.004)),
        writes.WritePlan(rounds=1, ops=10, bulk_n=1000, bulk_rounds=1),
        propagation.PropagationPlan(rounds=1, writes=10, gap=0.002, receivers=(1, 2)),
        feedbench.FeedPlan(propagation.PropagationPlan(rounds=1, writes=5, gap=0.002,
                                                       receivers=(1,)),
                           write_rounds=1, store_ops=10, replica_ops=5),
        locks.LockPlan(rounds=1, ops=5, redlock_ops=5, handoff=HandoffPlan(
            rounds=1, seconds=0.3, polling_seconds=0.4, warmup_seconds=0.1, contenders=(2,)),
            herd=HerdPlan(rounds=1, seconds=0.3, polling_seconds=0.4, warmup_seconds=0.1,
                          waiters=(2,))),
        scaling.ScalePlan(sizes=(100, 1000), rounds=1, reads=1000, value_sizes=(100, 10 * KiB),
                          value_bytes=50 * KiB, mem_n=1000, cache_n=2000, idle_seconds=0.3),
        aiobench.AsyncPlan(rounds=1, hit_reps=2, io_ops=10, tasks=100, task_reads=2,
                           concurrent_rounds=1, handoff=AsyncHandoffPlan(
                               rounds=1, seconds=0.2, warmup_seconds=0.1)),
        clusterbench.ClusterPlan(rounds=1, hit_reps=2, io_ops=10,
                                 propagation=propagation.PropagationPlan(
                                     rounds=1, writes=10, gap=0.002, receivers=(1,)),
                                 bulk=BulkPlan(writers=(1, 2, 4), writer_seconds=0.1,
                                               writer_rounds=1, n=1000, rounds=1)),
        fleet.FleetPlan(processes=2, maps=(1, 2), window=1.0, settle=0.3,
                        monitor=0.5),
    ),
    "quick": Plan(
        reads.ReadPlan(rounds=21, hit_reps=30, io_ops=150, spin=SpinPlan(writes=300, gap=0.004)),
        writes.WritePlan(rounds=15, ops=150, bulk_n=100_000, bulk_rounds=1),
        propagation.PropagationPlan(rounds=3, writes=100, gap=0.003, receivers=(1, 4, 8)),
        feedbench.FeedPlan(propagation.PropagationPlan(rounds=2, writes=100, gap=0.003,
                                                       receivers=(1, 4, 8)),
                           write_rounds=5, store_ops=100, replica_ops=50),
        locks.LockPlan(rounds=7, ops=100, redlock_ops=50, handoff=HandoffPlan(
            rounds=1, seconds=1.0, polling_seconds=2.5, warmup_seconds=0.3,
            contenders=(2, 4, 8)),
            herd=HerdPlan(rounds=1, seconds=1.5, polling_seconds=2.5, warmup_seconds=0.5)),
        scaling.ScalePlan(sizes=(1000, 10_000, 100_000), rounds=5, reads=50_000,
                          value_sizes=VALUE_SIZES, value_bytes=2 * MiB, mem_n=100_000,
                          cache_n=100_000),
        aiobench.AsyncPlan(rounds=9, hit_reps=30, io_ops=100, tasks=1000, task_reads=2,
                           concurrent_rounds=3, handoff=AsyncHandoffPlan(
                               rounds=2, seconds=0.4, warmup_seconds=0.2)),
        clusterbench.ClusterPlan(rounds=9, hit_reps=30, io_ops=150,
                                 propagation=propagation.PropagationPlan(
                                     rounds=3, writes=100, gap=0.003, receivers=(1, 4)),
                                 bulk=BulkPlan(writers=(1, 2, 4), writer_seconds=0.5,
                                               writer_rounds=3, n=100_000, rounds=3)),
        fleet.FleetPlan(processes=10, maps=(0, 1, 5, 10), window=10.0, settle=1.0,
                        monitor=2.0),
    ),
    "full": Plan(
        reads.ReadPlan(rounds=31, hit_reps=100, io_ops=300, spin=SpinPlan(writes=1000, gap=0.004)),
        writes.WritePlan(rounds=21, ops=300, bulk_n=100_000, bulk_rounds=3),
        propagation.PropagationPlan(rounds=5, writes=200, gap=0.003, receivers=(1, 2, 4, 8, 16)),
        feedbench.FeedPlan(propagation.PropagationPlan(rounds=3, writes=200, gap=0.003,
                                                       receivers=(1, 4, 8, 16)),
                           write_rounds=11, store_ops=200, replica_ops=100),
        locks.LockPlan(rounds=21, ops=200, redlock_ops=100, handoff=HandoffPlan(
            rounds=3, seconds=1.5, polling_seconds=4.0, warmup_seconds=0.4,
            contenders=(2, 4, 8)),
            herd=HerdPlan(rounds=3, seconds=2.0, polling_seconds=4.0, warmup_seconds=0.5)),
        scaling.ScalePlan(sizes=(1000, 10_000, 100_000, 1_000_000), rounds=11, reads=100_000,
                          value_sizes=VALUE_SIZES, value_bytes=8 * MiB, mem_n=1_000_000,
                          cache_n=1_000_000, idle_seconds=4.5),
        aiobench.AsyncPlan(rounds=21, hit_reps=100, io_ops=300, tasks=1000, task_reads=10,
                           concurrent_rounds=7, handoff=AsyncHandoffPlan(
                               rounds=3, seconds=1.5, warmup_seconds=0.4)),
        clusterbench.ClusterPlan(rounds=21, hit_reps=100, io_ops=300,
                                 propagation=propagation.PropagationPlan(
                                     rounds=5, writes=200, gap=0.003, receivers=(1, 4, 8)),
                                 bulk=BulkPlan(writers=(1, 2, 4), writer_seconds=1.5,
                                               writer_rounds=5, n=1_000_000, rounds=2)),
        fleet.FleetPlan(processes=20, maps=(0, 1, 5, 10), window=20.0, settle=2.0,
                        monitor=2.0),
    ),
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class FleetSize:
    """``--fleet-processes``, ``--fleet-maps``, ``--fleet-window``: the plan's unless given."""

    processes: int | None = None
    maps: tuple[int, ...] | None = None
    window: float | None = None

    def apply(self, plan: fleet.FleetPlan) -> fleet.FleetPlan:
        return dataclasses.replace(
            plan,
            processes=plan.processes if self.processes is None else self.processes,
            maps=plan.maps if self.maps is None else self.maps,
            window=plan.window if self.window is None else self.window,
        )


@dataclass(frozen=True, slots=True)
class Options:
    """What ``syncmap bench`` was asked to do."""

    url: str | None = None
    mode: str = "quick"
    only: tuple[str, ...] = SECTIONS
    out: Path = Path("bench/results")
    plots: bool = True
    feeds: tuple[str | None, ...] | None = None  # None: each section's defaults
    redlock_urls: tuple[str, ...] = ()
    name: str = ""  # base name of the result files; default: the mode
    command: str = "syncmap bench"
    fleet: FleetSize = FleetSize()


@dataclass(slots=True)
class Outcome:
    sections: list[Section] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def run(opts: Options, say: Callable[[str], None]) -> Outcome:
    """Run the sections; write ``<name>.md``, ``<name>.json`` and the plots into ``opts.out``."""
    t0, started = time.monotonic(), datetime.datetime.now().astimezone().isoformat("T", "seconds")
    plan, outcome = PLANS[opts.mode], Outcome()
    with contextlib.ExitStack() as stack:
        url = opts.url or stack.enter_context(EmbeddedRedis()).url
        client = redis.Redis.from_url(url)
        stack.callback(client.close)
        b = Bench(url, f"smbench-{uuid.uuid4().hex[:8]}", client)
        stack.callback(b.close)
        env = environment(b)
        say(f"benchmarking against {b.server_version} at {_where(url, opts)} "
            f"({opts.mode}: {', '.join(opts.only)})")  # fmt: skip
        for name in opts.only:
            _section(name, functools.partial(_call, name, b, plan, opts, stack), outcome, say)
        env["load average at end"] = load_average()
        env.update({f"broker of {k}": v for s in outcome.sections if s.name == "feeds"
                    for k, v in s.series["brokers"].items()})  # fmt: skip
    meta = report.Meta(opts.command, opts.mode, time.monotonic() - t0, started)
    outcome.files = _write(opts, outcome, env, meta, say)
    return outcome


def _where(url: str, opts: Options) -> str:
    return url.rsplit("@", maxsplit=1)[-1] + ("" if opts.url else " (embedded)")


def _section(name: str, body: Callable[[], Section], outcome: Outcome,
             say: Callable[[str], None]) -> None:  # fmt: skip
    """Run one section; a crash is reported (and makes the run fail) but the others still run."""
    t0 = time.monotonic()
    try:
        section = body()
    except Exception as exc:
        outcome.failed[name] = "".join(traceback.format_exception(exc)).strip()
        say(f"  {name}: FAILED after {time.monotonic() - t0:.1f} s: {type(exc).__name__}: {exc}")
        return
    section.seconds = time.monotonic() - t0
    outcome.sections.append(section)
    say(f"  {name}: {section.seconds:.1f} s")


def _call(name: str, b: Bench, plan: Plan, opts: Options,
          stack: contextlib.ExitStack) -> Section:  # fmt: skip
    plain: dict[str, Callable[[], Section]] = {
        "reads": lambda: reads.run(b, plan.reads),
        "writes": lambda: writes.run(b, plan.writes),
        "feeds": lambda: feedbench.run(b, plan.feeds, opts.feeds),
        "scaling": lambda: scaling.run(b, plan.scaling),
        "asyncio": lambda: aiobench.run(b, plan.aio),
        "cluster": lambda: clusterbench.run(b, plan.cluster),
        "fleet": lambda: fleet.run(b, opts.fleet.apply(plan.fleet)),
    }
    if name in plain:
        return plain[name]()
    if name == "propagation":
        feeds = opts.feeds if opts.feeds is not None else propagation.default_feeds(b.url)
        return propagation.run(b, plan.propagation, brokers.resolve(feeds, b.url))
    urls, why = _redlock_servers(opts, stack)  # locks
    return locks.run(b, plan.locks, urls, why)


def _redlock_servers(opts: Options, stack: contextlib.ExitStack) -> tuple[list[str], str]:
    """A Redlock needs independent masters: ``--redlock-urls``, else 3 embedded servers."""
    if opts.redlock_urls:
        return list(opts.redlock_urls), ""
    try:
        return [stack.enter_context(EmbeddedRedis()).url for _ in range(3)], ""
    except SyncMapError as exc:
        return [], f"not measured: no 3 Redis masters ({exc}); pass --redlock-urls"


def _write(opts: Options, outcome: Outcome, env: dict[str, object], meta: report.Meta,
           say: Callable[[str], None]) -> list[Path]:  # fmt: skip
    opts.out.mkdir(parents=True, exist_ok=True)
    prefix = opts.name or opts.mode
    drawn: list[Path] = []
    if opts.plots:
        try:
            drawn = plots.draw(outcome.sections, opts.out, prefix)
        except Unavailable as exc:
            say(f"no plots: matplotlib {exc}")
    md = opts.out / f"{prefix}.md"
    md.write_text(report.markdown(outcome.sections, env, meta, drawn, outcome.failed))
    js = opts.out / f"{prefix}.json"
    js.write_text(report.as_json(outcome.sections, env, meta, outcome.failed) + "\n")
    return [md, js, *drawn]


def parse_only(text: str | None) -> tuple[str, ...]:
    """``--only reads,locks`` -> the sections in their usual order; ValueError names a typo."""
    if not text:
        return SECTIONS
    asked = {s.strip() for s in text.split(",") if s.strip()}
    if unknown := asked - set(SECTIONS):
        raise ValueError(f"unknown section(s) {', '.join(sorted(unknown))}: use "
                         f"{','.join(SECTIONS)}")  # fmt: skip
    return tuple(s for s in SECTIONS if s in asked)


def parse_feeds(text: str | None) -> tuple[str | None, ...] | None:
    """``--feeds redis,redis+stream,amqp://...``: ``redis`` (or ``default``) is the store's own
    pub/sub, a bare ``redis+stream`` a Stream on the store's server."""
    if text is None:
        return None
    items: Sequence[str] = [s.strip() for s in text.split(",") if s.strip()]
    return tuple(None if s in ("redis", "default") else s for s in items)


def parse_fleet(processes: int | None, maps: str | None, window: float | None) -> FleetSize:
    """``--fleet-processes 10 --fleet-maps 0,1,5,10 --fleet-window 5``; ValueError says what is
    wrong."""
    if processes is not None and processes < 1:
        raise ValueError(f"--fleet-processes {processes}: use 1 or more")
    if window is not None and not window > 0:
        raise ValueError(f"--fleet-window {window}: use more than 0 seconds")
    counts = None
    if maps is not None:
        try:
            counts = tuple(int(s) for s in maps.split(",") if s.strip())
        except ValueError:
            raise ValueError(f"--fleet-maps {maps!r}: use map counts such as 0,1,5,10") from None
        if not counts or min(counts) < 0 or not any(counts):
            raise ValueError(f"--fleet-maps {maps!r}: use map counts ≥ 0, at least one ≥ 1")
    return FleetSize(processes, counts, window)
