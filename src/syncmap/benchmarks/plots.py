"""PNG plots of a run (matplotlib, Agg backend, small files), drawn from each section's series."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .method import Section, fmt
from .peers import optional

DPI = 100
SYNCMAP, PEER = "#1f6feb", "#8b949e"
# contender name -> label on the reads chart (dropped: the loop-shape controls)
READ_LABELS = {
    "syncmap hit": "syncmap hit m[k]", "syncmap hit (fast_hits)": "syncmap hit (fast_hits)",
    "dict": "dict d[k]", "dict + Lock": "dict + threading.Lock",
    "cashews hit": "cashews client-side hit", "redis-py cache hit": "redis-py CacheConfig hit",
    "syncmap miss": "syncmap miss", "redis-py HGET": "redis-py HGET",
    "redis-py GET": "redis-py GET",
    "pottery RedisDict": "pottery RedisDict[k]",
}  # fmt: skip


def draw(sections: list[Section], out: Path, prefix: str) -> list[Path]:
    """Every plot the sections have data for; the paths written."""
    optional("matplotlib").use("Agg")
    plt = optional("matplotlib.pyplot")
    by_name = {s.name: s for s in sections}
    makers: list[tuple[str, str, Callable[[Any, dict[str, Any]], None]]] = [
        ("reads", "reads", _reads), ("propagation", "propagation", _propagation),
        ("feeds", "feeds", _feeds),
        ("scaling", "hit-vs-size", _sizes), ("scaling", "write-vs-value-size", _values),
        ("locks", "lock-handoff", _handoff),
    ]  # fmt: skip
    written = []
    for section, name, make in makers:
        if section not in by_name or not by_name[section].series:
            continue
        if section == "feeds" and not by_name[section].series["feeds"]:
            continue  # no feed measured
        fig = plt.figure(figsize=(8, 4.5), dpi=DPI)
        try:
            make(fig, by_name[section].series)
            fig.tight_layout()
            path = out / f"{prefix}-{name}.png"
            fig.savefig(path, dpi=DPI)
            written.append(path)
        finally:
            plt.close(fig)
    return written


def _reads(fig: Any, series: dict[str, Any]) -> None:
    ax = fig.add_subplot()
    medians = series["median_ns"]
    names = [n for n in READ_LABELS if n in medians]
    names.sort(key=lambda n: medians[n])
    ax.barh([READ_LABELS[n] for n in names], [medians[n] for n in names],
            color=[SYNCMAP if n.startswith("syncmap") else PEER for n in names])  # fmt: skip
    for i, n in enumerate(names):
        ax.annotate(fmt(medians[n], "ns"), (medians[n], i), xytext=(3, 0),
                    textcoords="offset points", va="center", fontsize=8)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlim(right=max(medians[n] for n in names) * 4)  # room for the labels
    ax.set_xlabel("median time per read (log scale)")
    absent = "; ".join(f"{READ_LABELS.get(k, k)}: {v}" for k, v in series["absent"].items())
    ax.set_title("Reads: syncmap vs peers" + (f"\nnot measured: {absent}" if absent else ""),
                 fontsize=9 if absent else 11)  # fmt: skip


def _propagation(fig: Any, series: dict[str, Any]) -> None:
    receivers = series["receivers"]
    for i, q in enumerate(("p50", "p99")):
        ax = fig.add_subplot(1, 2, i + 1)
        for name, stats in series["feeds"].items():
            raw = name.startswith("raw")
            ax.plot(receivers, [stats[str(n)][q] for n in receivers], marker="o", label=name,
                    linestyle="--" if raw else "-", color=PEER if raw else None)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(receivers, [str(n) for n in receivers])
        ax.set_xlabel("receiving processes")
        ax.set_ylabel(f"{q} write → visible (ms)")
        ax.set_title(f"Propagation {q}")
        ax.legend(fontsize=8)
    if series["absent"]:
        fig.suptitle("not available: " + ", ".join(series["absent"]), fontsize=8)


def _feeds(fig: Any, series: dict[str, Any]) -> None:
    """Left: syncmap's p50 vs receivers per feed, a bar up to p99; right: each broker's raw
    one-way delay (p50 bar, p99 whisker) with syncmap's delay to 1 receiver beside it."""
    ns, feeds = series["receivers"], series["feeds"]
    colors = {name: f"C{i}" for i, name in enumerate(feeds)}
    ax = fig.add_subplot(1, 2, 1)
    for i, (name, got) in enumerate(feeds.items()):
        shift = 1.0 + 0.035 * (i - (len(feeds) - 1) / 2)  # side by side on the log axis
        p50 = [got["syncmap"][str(n)]["p50"] for n in ns]
        p99 = [got["syncmap"][str(n)]["p99"] for n in ns]
        ax.errorbar([n * shift for n in ns], p50, yerr=[[0] * len(ns), [b - a for a, b in
                    zip(p50, p99, strict=True)]], marker="o", capsize=3, label=name,
                    color=colors[name])  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    _plain_log(ax.yaxis, ax.set_yscale)
    ax.set_xlabel("receiving processes")
    ax.set_ylabel("write → visible (ms, log): p50, bar to p99")
    ax.set_title("syncmap store mode, per feed", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    ax = fig.add_subplot(1, 2, 2)
    names = list(feeds)
    raw = [feeds[n]["raw"][str(ns[0])] for n in names]
    ax.barh(names, [r["p50"] for r in raw], color=[colors[n] for n in names], alpha=0.6,
            xerr=[[0] * len(raw), [r["p99"] - r["p50"] for r in raw]], capsize=3,
            label="raw feed client p50 (whisker: p99)")  # fmt: skip
    ax.plot([feeds[n]["syncmap"][str(ns[0])]["p50"] for n in names], names, "D", color="black",
            label="syncmap p50")  # fmt: skip
    _plain_log(ax.xaxis, ax.set_xscale)
    ax.invert_yaxis()
    ax.set_xlabel(f"one-way delay to {ns[0]} receiver (ms, log)")
    ax.set_title("Each broker through its own client", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    if series["absent"]:
        fig.suptitle("not available: " + ", ".join(series["absent"]), fontsize=8)


def _plain_log(axis: Any, set_scale: Callable[[str], None]) -> None:
    """A log axis labelled 0.2, 0.5, 1, 2, 5 ... rather than in powers of ten."""
    ticker = optional("matplotlib.ticker")
    set_scale("log")
    axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _sizes(fig: Any, series: dict[str, Any]) -> None:
    ax = fig.add_subplot()
    sizes = series["sizes"]
    xs = [int(n) for n in sizes]
    ax.plot(xs, [p["syncmap_ns"] for p in sizes.values()], marker="o", color=SYNCMAP,
            label="syncmap hit m[k]")  # fmt: skip
    ax.plot(xs, [p["dict_ns"] for p in sizes.values()], marker="o", color=PEER, linestyle="--",
            label="dict d[k]")  # fmt: skip
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("entries in the map (random keys read)")
    ax.set_ylabel("median ns per read")
    ax.set_title("Hit latency vs map size")
    ax.legend()


def _values(fig: Any, series: dict[str, Any]) -> None:
    ax = fig.add_subplot()
    values = series["value_sizes"]
    xs = [int(n) for n in values]
    ax.plot(xs, [p["syncmap_Bps"] / 1e6 for p in values.values()], marker="o", color=SYNCMAP,
            label="syncmap m[k] = v")  # fmt: skip
    ax.plot(xs, [p["hset_Bps"] / 1e6 for p in values.values()], marker="o", color=PEER,
            linestyle="--", label="redis-py HSET")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("value size (bytes)")
    ax.set_ylabel("MB/s of values written")
    ax.set_title("Write throughput vs value size")
    ax.legend()


def _handoff(fig: Any, series: dict[str, Any]) -> None:
    ax = fig.add_subplot()
    ns = series["contenders"]
    for kind, color in (("syncmap", SYNCMAP), ("redis-py", PEER)):
        for q, style in (("p50", "-"), ("p99", ":")):
            ax.plot(ns, [series["handoff_ms"][kind][str(n)][q] for n in ns], marker="o",
                    color=color, linestyle=style, label=f"{kind} Lock {q}")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("contending processes")
    ax.set_ylabel("hand-off (ms, log scale)")
    ax.set_title("Contended lock hand-off: release → next holder's acquire returns")
    ax.legend(fontsize=8)
