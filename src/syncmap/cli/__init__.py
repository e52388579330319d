"""The ``syncmap`` command.  ``syncmap demo`` is the README's first command."""

from __future__ import annotations

import os
import sys

import click

from .. import __version__
from ..errors import SyncMapError
from .bench import bench as bench_command
from .check import check_command
from .data import COMMANDS as DATA_COMMANDS
from .demo import demo as run_demo
from .doctor import doctor
from .lockcmd import lock_command
from .top import top
from .torture import torture
from .verify import verify


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="syncmap")
def main() -> None:
    """syncmap: a Python dict shared by many servers, kept in sync through Redis."""


@main.command()
@click.option("--url", envvar="SYNCMAP_URL", help="Redis to use (default: start an embedded one).")
@click.option("--nodes", default=4, show_default=True, help="Server processes sharing the map.")
@click.option("--seconds", default=10.0, show_default=True, help="How long they run.")
@click.option(
    "--chaos",
    is_flag=True,
    help="Now and then kill the pub/sub connections or pause a server; watch it heal.  With "
    "--sentinel: pause the master once; watch Sentinel fail over.  With --cluster: kill one "
    "master first; watch its replica take over its shard.",
)
@click.option(
    "--sentinel",
    is_flag=True,
    help="Start a master, a replica and three Sentinels instead of one Redis; the maps find the "
    "master through the Sentinels (redis+sentinel:// URL).",
)
@click.option(
    "--cluster",
    is_flag=True,
    help="Start a Redis Cluster (3 masters, a replica each) instead of one Redis; the map "
    "spreads over its masters (redis+cluster:// URL).",
)
def demo(url: str | None, nodes: int, seconds: float, chaos: bool, sentinel: bool,
         cluster: bool) -> None:  # fmt: skip
    """Servers in separate processes share one map; ends with a convergence verdict.

    A live table on a terminal (needs the ``cli`` extra: rich), plain periodic lines otherwise.
    """
    try:
        ok = run_demo(url, nodes, seconds, click.echo, chaos=chaos, sentinel=sentinel,
                      cluster=cluster)  # fmt: skip
    except SyncMapError as exc:
        click.echo(f"syncmap demo: {exc}", err=True)
        sys.exit(2)
    sys.exit(0 if ok else 1)


main.add_command(check_command)
main.add_command(bench_command)
for _command in DATA_COMMANDS:
    main.add_command(_command)
main.add_command(lock_command)
main.add_command(doctor)
main.add_command(top)
main.add_command(torture)
main.add_command(verify)


if __name__ == "__main__":  # pragma: no cover
    main(prog_name=os.path.basename(sys.argv[0]))
