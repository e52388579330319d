"""Lock benchmarks: syncmap's locks against redis-py, python-redis-lock and pottery, in one run:

    python bench/locks.py [--quick] [--url URL] [--redlock-urls U1,U2,U3]

The same as ``syncmap bench --full --only locks --name locks`` (``--quick``: without ``--full``);
writes bench/results/locks.md, .json and the hand-off plot.  The code is in
``syncmap.benchmarks.locks`` and ``.handoff``; docs/benchmarks.md explains every figure.
"""

from run import legacy

if __name__ == "__main__":
    legacy("locks", "locks", "bench/locks.py")
