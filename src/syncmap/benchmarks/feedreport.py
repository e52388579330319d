"""The ``feeds`` section's report: its rows, a one-line-per-feed summary table, notes, series."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .brokers import Broker
from .method import TIMES, Row, Section, fmt, fmt_ratio, median
from .propagation import Contender, receivers

# Plain-client one-way delays quoted by issue 5, for orientation (p50, ms).
ORIENTATION = {"redis pub/sub": 0.15, "redis+stream": 0.17, "nats": 0.23, "nats+jetstream": 0.38,
               "amqp": 0.38}  # fmt: skip
STORE = "store-mode writes `m[k] = v`"
REPLICATED = "replicated writes `ReplicatedMap[k] = v`"


def raw_name(label: str) -> str:
    return f"{label} (raw feed client)"


def store_row(label: str, mine: Sequence[float], base: Sequence[float], absent: str = "") -> Row:
    """``m[k] = v`` with feed ``label`` against the default route; no ``base``: the route itself."""
    key = f"feeds.{label}.store_writes"
    if absent:
        return Row(f"{label}: {STORE} vs the redis pub/sub route", "/s", None, key=key,
                   absent=absent)  # fmt: skip
    if not base:
        return Row(f"{label}: {STORE} (the peer of the other feeds' rows)", "/s", median(mine),
                   key=key, spread={"syncmap": list(mine)})  # fmt: skip
    return Row.paired(f"{label}: {STORE} vs the redis pub/sub route", "/s", mine, base, key=key)


def replicated_row(label: str, mine: Sequence[float], raw: Sequence[float],
                   absent: str = "") -> Row:  # fmt: skip
    metric = f"{label}: {REPLICATED} vs the feed's own confirmed publish"
    key = f"feeds.{label}.replicated_writes"
    if absent:
        return Row(metric, "/s", None, key=key, absent=absent)
    return Row.paired(metric, "/s", mine, raw, key=key)


def section(found: Sequence[Broker], ns: Sequence[int],
            delays: dict[str, tuple[Contender, Contender]], absent: dict[str, str],
            store: dict[str, Row], replicated: dict[str, Row],
            notes: list[str]) -> Section:  # fmt: skip
    rows: list[Row] = []
    series: dict[str, Any] = {"receivers": list(ns), "feeds": {}, "absent": {}, "brokers": {},
                              "store_writes": {}, "replicated_writes": {}}  # fmt: skip
    summary = _summary_head(ns)
    for x in found:
        series["brokers"][x.label] = x.where or x.absent
        if x.absent:
            series["absent"][x.label] = x.absent
            rows.append(Row(f"{x.label}: write → visible", "ms", None, key=f"feeds.{x.label}",
                            absent=x.absent))  # fmt: skip
            summary.append(f"| {x.label} | {x.absent} |" + " — |" * (len(ns) + 3))
            continue
        pair = delays.get(x.label)
        why = absent.get(x.label) or absent.get(raw_name(x.label)) or ""
        if pair is None or why:
            series["absent"][x.label] = why
            rows.append(Row(f"{x.label}: write → visible", "ms", None, key=f"feeds.{x.label}",
                            absent=why or "not measured"))  # fmt: skip
        else:
            mine, raw = pair
            series["feeds"][x.label] = {
                "syncmap": {str(n): mine.stats(n) for n in ns},
                "raw": {str(n): raw.stats(n) for n in ns},
            }
            rows += [r for n in ns for r in _delay_rows(x.label, mine, raw, n)]
        for kind, found_rows in (("store_writes", store), ("replicated_writes", replicated)):
            if (row := found_rows.get(x.label)) is not None:
                rows.append(row)
                series[kind][x.label] = {"syncmap": row.syncmap, "baseline": row.baseline,
                                         "ratio": row.ratio}  # fmt: skip
        summary.append(_summary_line(x, ns, series, store.get(x.label),
                                     replicated.get(x.label)))  # fmt: skip
    return Section("feeds", "Feeds: syncmap on each broker vs that broker's own client", rows,
                   series, notes, extra=summary)  # fmt: skip


def _delay_rows(label: str, mine: Contender, raw: Contender, n: int) -> list[Row]:
    a, b = mine.stats(n), raw.stats(n)
    note = (f"max {a['max']:.3g} ms (raw {b['max']:.3g} ms); {a['deliveries']:,.0f} "
            "deliveries")  # fmt: skip
    if a["missing"] or b["missing"]:
        note += f"; **MISSING deliveries: {a['missing']:,.0f} (raw {b['missing']:,.0f})**"
    key = f"feeds.{label}.{n}"
    return [
        Row(f"{label} → {receivers(n)}: p50", "ms", a["p50"], b["p50"], key=key + ".p50",
            note=note),
        Row(f"  {label} → {receivers(n)}: p99", "ms", a["p99"], b["p99"], key=key + ".p99"),
    ]  # fmt: skip


def _summary_head(ns: Sequence[int]) -> list[str]:
    cols = " | ".join(f"syncmap → {n}" for n in ns)
    return [
        "Per feed (delays in ms, p50 / p99; in brackets syncmap's p50 ÷ the raw client's p50 at "
        "the same number of receivers):",
        "",
        f"| feed | broker | raw one-way | {cols} | store-mode writes/s (÷ redis pub/sub's) | "
        "replicated writes/s (÷ raw confirmed publish's) |",
        "|---|---|---:|" + "---:|" * len(ns) + "---:|---:|",
    ]


def _summary_line(x: Broker, ns: Sequence[int], series: dict[str, Any], store: Row | None,
                  replicated: Row | None) -> str:  # fmt: skip
    got = series["feeds"].get(x.label)
    cells = [x.label, x.where]
    if got is None:
        cells += ["—"] * (len(ns) + 1)
    else:
        raw, mine = got["raw"], got["syncmap"]
        cells.append(_pair(raw[str(ns[0])]) + (f" ({receivers(ns[0])})" if ns[0] != 1 else ""))
        for n in ns:
            ratio = mine[str(n)]["p50"] / raw[str(n)]["p50"] if raw[str(n)]["p50"] else math.nan
            cells.append(f"{_pair(mine[str(n)])} ({fmt_ratio(ratio)})")
    for row in (store, replicated):
        if row is None or row.syncmap is None:
            cells.append(row.absent if row is not None and row.absent else "—")
        else:
            ratio = fmt_ratio(row.ratio) if row.baseline else "peer"
            cells.append(f"{fmt(row.syncmap, row.unit)} ({ratio})")
    return "| " + " | ".join(cells) + " |"


def _pair(stats: dict[str, float]) -> str:
    return f"{stats['p50']:.3g} / {stats['p99']:.3g}"


def notes(writes: int, store_ops: int, replica_ops: int, payload: int) -> list[str]:
    quoted = ", ".join(f"{k} {v:g} ms" for k, v in ORIENTATION.items())
    return [
        "Propagation rows: syncmap store mode (`SyncMap(name, url=<the Redis>, feed=<feed>)`, "
        "subscribed `inline=True`) against the feed's own client with no map (`open_feed(url, "
        "topic)`: `publish(confirm=False)` as syncmap's relay publishes, a `FeedHandler` in each "
        f"receiving process), {writes} writes per segment, both in the same interleaved rounds "
        "at every N; ratio = quotient of the percentiles at the same N. The raw figure at 1 "
        "receiver is the broker's one-way delay through that client.",
        "Routes: on `redis pub/sub` and `redis+stream` the write script publishes (PUBLISH / XADD "
        "in the same atomic step); every other feed is relayed: the writer publishes after the "
        "write's Redis round trip, so its delay is at least the raw one plus that round trip.",
        f"Store-mode writes: one writer, `m[k] = v` over 1,000 keys, {store_ops} per timed "
        "block, each feed interleaved with blocks on the default route (redis pub/sub); ratio = "
        f"that route's rate ÷ the feed's (above 1{TIMES}: slower). Relayed feeds publish with "
        "`confirm=False`, so the broker's confirm is not waited for.",
        f"Replicated writes: `ReplicatedMap(name, feed, snapshot={{}})`, {replica_ops} writes "
        "per timed block; each waits for the broker's confirm before it applies. Peer: the same "
        f"feed's `publish({payload}-byte payload, key, confirm=True)` on a topic the same feed "
        "object subscribes to (the map hears its own writes too), interleaved.",
        f"For orientation, one-way p50 with plain clients quoted in issue 5: {quoted}. The raw "
        "column here is measured across processes through syncmap's feed clients.",
    ]


def kafka_note(wait: str) -> str:
    return (
        f"kafka: the consumers' `fetch.wait.max.ms` was {wait}. Tansu answers a fetch only when "
        "that wait ends, even if a message came in meanwhile, so a message waits for the end of "
        "the fetch in progress: that knob, not syncmap or the network, sets kafka's delays here "
        "(Apache Kafka answers a fetch as soon as data is there). Set it per URL, e.g. "
        "`kafka://host:port?fetch.wait.max.ms=2`: less delay, more idle CPU in every client and "
        "in the broker."
    )
