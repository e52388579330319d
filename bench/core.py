"""The core figures of syncmap (reads, writes, propagation, scaling) against plain Python, raw
redis-py and the peers, measured in one run:

    python bench/core.py [--quick] [--url URL] [other `syncmap bench` options]

The same as ``syncmap bench --full --only reads,writes,propagation,scaling --name core``
(``--quick``: without ``--full``); writes bench/results/core.md, .json and plots.  The code is in
``syncmap.benchmarks``; docs/benchmarks.md explains every figure.
"""

from run import legacy

if __name__ == "__main__":
    legacy("reads,writes,propagation,scaling", "core", "bench/core.py")
