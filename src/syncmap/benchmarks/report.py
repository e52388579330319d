"""The report of a run: one Markdown file (headline, every section, plots, machine and versions)
and the same as JSON, with every round's sample, so anyone can check how noisy the run was."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .method import CAVEAT, TIMES, Row, Section, fmt_ratio, table

HEADLINE = (
    "reads.hit_dict", "reads.hit_locked", "reads.hit_csc", "reads.hit_cashews",
    "reads.hit_pottery", "reads.spin_p50", "reads.spin_p99", "reads.miss_hget",
    "writes.set_hset", "writes.update", "writes.cas",
    "propagation.redis pub/sub.8.p50", "propagation.redis pub/sub.8.p99", "locks.uncontended",
    "locks.vs_pottery", "locks.handoff.8.p50", "scaling.load", "scaling.memory",
)  # fmt: skip
RATIO_TEXT = (
    "Ratio = syncmap's cost ÷ the peer's (time, delay, bytes; for rates the peer's rate ÷ "
    f"syncmap's): below 1{TIMES} syncmap is faster or smaller, above 1{TIMES} slower or larger. "
    "Where both "
    "ran in interleaved rounds it is the median of the per-round ratios, so it can differ a "
    "little from the quotient of the two medians shown; for percentiles (propagation, hand-off) "
    "it is the quotient of the percentiles over every delivery of every round."
)
LEADS, TRAILS = 0.9, 1.1


@dataclass(frozen=True, slots=True)
class Meta:
    """How the run was made."""

    command: str
    mode: str
    seconds: float
    started: str  # ISO date and time


def headline(sections: Sequence[Section]) -> list[Row]:
    rows = {r.key: r for s in sections for r in s.rows}
    hits = [r for r in rows.values() if r.key.startswith("scaling.hit.")]
    picked = [rows[k] for k in HEADLINE if k in rows]
    return picked + hits[-1:]


def standings(rows: Sequence[Row]) -> list[str]:
    """Where syncmap leads and trails, by the ratio column, best first."""
    rated = [(r.ratio, r) for r in rows if r.ratio is not None and not math.isnan(r.ratio)]
    rated.sort(key=lambda x: x[0])
    groups: dict[str, list[str]] = {
        f"**Leads** (ratio < {LEADS:g}{TIMES})": [],
        f"**Trails** (ratio > {TRAILS:g}{TIMES})": [],
        "**On par** (within ±10 %)": [],
    }
    titles = list(groups)
    for ratio, r in rated:
        title = titles[0] if ratio < LEADS else titles[1] if ratio > TRAILS else titles[2]
        groups[title].append(f"{r.metric.strip()} ({fmt_ratio(ratio)})")
    return [f"- {title}: " + "; ".join(items) + "." for title, items in groups.items() if items]


def markdown(sections: Sequence[Section], env: dict[str, Any], meta: Meta,
             plots: Sequence[Path], failed: dict[str, str]) -> str:  # fmt: skip
    top = headline(sections)
    lines = [f"# syncmap benchmarks ({meta.mode} run)", "",
             f"Made by `{meta.command}` on {meta.started}, {meta.seconds:.0f} s wall time, "
             f"against {env.get('redis server', '?')}. Every peer was measured in the same "
             "run, interleaved with syncmap.", ""]  # fmt: skip
    if top:  # a partial run (``--only feeds``) may have no headline row
        lines += [*table("## Headline", top), "", RATIO_TEXT, "", *standings(top), ""]
    else:
        lines += [RATIO_TEXT, ""]
    for s in sections:
        lines += [*table(f"## {s.title} ({s.seconds:.0f} s)", s.rows)]
        lines += [*(["", *s.extra] if s.extra else []), *_notes(s.notes), ""]
    lines += [f"## {name}: FAILED\n\n```\n{why}\n```\n" for name, why in failed.items()]
    if plots:
        lines += ["## Plots", "", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    lines += ["## Machine and versions", "", *[f"- {k}: {v}" for k, v in env.items()], "",
              f"Caveat: {CAVEAT}", ""]  # fmt: skip
    return "\n".join(lines)


def _notes(notes: Sequence[str]) -> list[str]:
    return ["", *[f"- {n}" for n in notes]] if notes else []


def as_json(sections: Sequence[Section], env: dict[str, Any], meta: Meta,
            failed: dict[str, str]) -> str:  # fmt: skip
    doc = {
        "command": meta.command, "mode": meta.mode, "seconds": meta.seconds,
        "started": meta.started, "caveat": CAVEAT, "environment": env, "failed": failed,
        "headline": [r.key for r in headline(sections)],
        "sections": [{"name": s.name, "title": s.title, "seconds": s.seconds,
                      "rows": [r.as_json() for r in s.rows], "series": s.series,
                      "notes": s.notes} for s in sections],
    }  # fmt: skip
    return json.dumps(_finite(doc), indent=1, default=str)


def _finite(obj: Any) -> Any:
    """NaN (a figure with no samples) becomes null: strict JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj
