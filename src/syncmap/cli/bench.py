"""``syncmap bench``: syncmap against the libraries users would otherwise pick, in one run.

Writes ``<out>/<quick|full>.md`` (the tables, the machine and versions), the same as JSON, and
PNG plots.  Without ``--url`` it starts an embedded redis-server; the ``feeds`` section starts
NATS and Tansu (Kafka protocol) for the run when nothing listens on their default ports.
docs/benchmarks.md explains every figure.  Exit status: 0 done, 1 a section failed (the others
still ran; the report says why), 2 bad arguments or no Redis.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from ..benchmarks import runner  # imports the peers and matplotlib only when they are used
from ..errors import SyncMapError
from .torture import redact, unreachable, unreachable_message


@click.command("bench")
@click.option("--url", envvar="SYNCMAP_URL", help="Redis to use (default: start an embedded one). "
              "Keys go under a per-run namespace and are deleted afterwards.")  # fmt: skip
@click.option("--full", is_flag=True, help="More rounds, 16 receivers, 1M-entry maps (~16 min).")
@click.option(
    "--only",
    metavar="SECTIONS",
    help="Comma-separated: reads,writes,propagation,feeds,locks,scaling,asyncio,cluster,fleet "
    "(default: all).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("bench/results"),
    show_default=True,
    help="Where results go.",
)
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
@click.option("--feeds", metavar="URLS", help="Feeds to measure (propagation and feeds sections), "
              "comma-separated; 'redis' is the store's own pub/sub, 'redis+stream' a Stream on "
              "the store's server.  Default: those two for propagation; for feeds also RabbitMQ, "
              "NATS, JetStream and Kafka on their default local ports, starting NATS and Tansu "
              "when nothing listens there.")  # fmt: skip
@click.option(
    "--redlock-urls",
    metavar="URLS",
    help="Independent Redis masters for the Redlock row (default: start 3).",
)
@click.option("--fleet-processes", type=int, metavar="N", help="fleet: idle server processes "
              "(default 10; 2 with --smoke, 20 with --full).")  # fmt: skip
@click.option("--fleet-maps", metavar="COUNTS", help="fleet: maps open per process, one window "
              "each, e.g. 0,1,5,10 (the default; 0: the processes with no map).")  # fmt: skip
@click.option(
    "--fleet-window",
    type=float,
    metavar="SECONDS",
    help="fleet: seconds measured per map count (default 5; 10 with --full).",
)
@click.option("--name", default="", help="Base name of the result files (default: the mode).")
@click.option("--smoke", is_flag=True, hidden=True, help="Tiny plan: proves the command works.")
def bench(url: str | None, full: bool, only: str | None, out: Path, no_plots: bool,
          feeds: str | None, redlock_urls: str | None, fleet_processes: int | None,
          fleet_maps: str | None, fleet_window: float | None, name: str,
          smoke: bool) -> None:  # fmt: skip
    """Benchmark syncmap against dicts, raw redis-py and its caches, cashews, pottery, lock
    libraries and each feed's own broker client; medians and in-run ratios, Markdown + JSON + PNG
    plots; and what idle maps in N processes cost a private Redis (fleet).  Quick by default."""
    try:
        opts = runner.Options(
            url=url, mode="smoke" if smoke else "full" if full else "quick",
            only=runner.parse_only(only), out=out, plots=not no_plots,
            feeds=runner.parse_feeds(feeds),
            redlock_urls=tuple(u for u in (redlock_urls or "").split(",") if u),
            name=name, command=_command(),
            fleet=runner.parse_fleet(fleet_processes, fleet_maps, fleet_window),
        )  # fmt: skip
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    if url and (why := unreachable(url)):
        click.echo(unreachable_message("bench", url, why), err=True)
        sys.exit(2)
    try:
        outcome = runner.run(opts, lambda text: click.echo(text, err=True))
    except SyncMapError as exc:  # e.g. no redis-server to embed
        click.echo(f"syncmap bench: {exc}", err=True)
        sys.exit(2)
    for path in outcome.files:
        click.echo(str(path))
    sys.exit(1 if outcome.failed else 0)


def _command() -> str:
    """The command line as typed, passwords hidden (it goes into the report)."""
    argv = [redact(a) if "://" in a else a for a in sys.argv]
    if argv[1:2] == ["bench"]:  # syncmap bench ..., python -m syncmap.cli bench ...
        return shlex.join(["syncmap", *argv[1:]])
    return shlex.join(["python", *argv])  # a plain script: python bench/run.py ...
