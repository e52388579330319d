"""Benchmarks of syncmap against what users would otherwise pick, run by ``syncmap bench``.

Every figure is measured next to its peers **in the same run**, contenders interleaved (A B, then
B A, ...), and reported as a median and a paired ratio; see docs/benchmarks.md.  The sections:

* :mod:`.reads`: near-cache hits and misses vs dicts, raw redis-py, redis-py's client-side cache,
  cashews' client-side cache and pottery's ``RedisDict``;
* :mod:`.writes`: ``set``, ``update()`` and ``compare_and_set`` vs HSET/SET, a pipeline and a
  WATCH/MULTI loop;
* :mod:`.propagation`: write-to-visible delay to 1..16 processes for every feed that runs;
* :mod:`.locks` and :mod:`.handoff`: vs redis-py ``Lock``, python-redis-lock and pottery;
* :mod:`.scaling`: hit latency vs map size, write throughput vs value size, loading a near cache,
  memory per cached entry.
* :mod:`.fleet`: what idle maps in N processes cost a private Redis (commands/s, CPU,
  connections, threads), extrapolated to 1,000 processes x 10 maps.

The peers are the ``bench`` extra (``pip install 'syncmap[bench]'``); a peer that is missing or
cannot run on the server is reported as such in the table, not skipped silently.
"""
