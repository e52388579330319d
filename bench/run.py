"""``syncmap bench`` as a plain script, for a source checkout:

    python bench/run.py [--full] [--url URL] [--only reads,writes,propagation,locks,scaling,feeds]
                        [--out DIR] [--no-plots] [--feeds URLS] [--redlock-urls URLS]

The benchmarks live in the package (``syncmap.benchmarks``) so that ``syncmap bench`` works from
an installed wheel too; this script only runs that command.  Without an installed syncmap it uses
the checkout's ``src/``.  docs/benchmarks.md explains every figure.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

try:
    import syncmap  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from syncmap.cli.bench import bench


def run(args: Sequence[str], prog: str) -> None:
    """Run ``syncmap bench`` with ``args`` (exits with its status)."""
    bench.main(args=list(args), prog_name=prog)


def legacy(only: str, name: str, prog: str) -> None:
    """The older per-area scripts (core.py, locks.py): a full run of some sections unless
    ``--quick``, results in bench/results/<name>.md."""
    args = sys.argv[1:]
    if "--quick" in args:
        args.remove("--quick")
    elif "--full" not in args:
        args.append("--full")
    run(["--only", only, "--name", name, *args], prog)


if __name__ == "__main__":
    run(sys.argv[1:], "bench/run.py")
