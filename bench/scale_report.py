"""Turn the figures of a scale run into text and a Markdown section."""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from bench.databases import ENGINE_LABELS
from bench.run import cpu_model, package_version

Figures = dict[str, Any]
Results = dict[str, list[Figures]]  # database -> one entry per (size, backlog)
AIM_RATIO = 0.10  # the aim: at 1M within 10% of 10k
AIM_HOLD = 0.100  # ... and no prune transaction longer than 100 ms


def _ms(key: str) -> Callable[[Figures], str]:
    return lambda f: "n/a" if f.get(key) is None else f"{f[key] * 1000:,.1f}"


def _rate(key: str) -> Callable[[Figures], str]:
    return lambda f: "n/a" if f.get(key) is None else f"{f[key]:,.0f}"


def _beside(f: Figures) -> str:
    count = f["backlog"]
    return f"{count:,} scheduled + {count:,} finished" if count else "nothing"


def _rates(key: str) -> Callable[[Figures], str]:
    """The median of the rounds, and their range when there were several."""

    def cell(f: Figures) -> str:
        values = f.get(f"{key}s") or []
        if f.get(key) is None:
            return "n/a"
        spread = f" ({min(values):,.0f}-{max(values):,.0f})" if len(values) > 1 else ""
        return f"{f[key]:,.0f}{spread}"

    return cell


def _writer(f: Figures) -> str:
    if f.get("writer_prune_max") is None:
        return "n/a"
    return f"{f['writer_before_max'] * 1000:,.1f} / {f['writer_prune_max'] * 1000:,.1f}"


COLUMNS: tuple[tuple[str, Callable[[Figures], str]], ...] = (
    ("Ready jobs", lambda f: f"{f['size']:,}"),
    ("Beside them", _beside),
    ("Enqueue, bulk (jobs/s)", _rate("enqueue_rate")),
    ("Claim 16 p50 (ms)", _ms("claim_p50")),
    ("Claim 16 p99 (ms)", _ms("claim_p99")),
    ("Drain: workers start -> done (jobs/s)", _rates("drain_rate")),
    ("Drain in rows: first start -> last finish (jobs/s)", _rates("drain_span_rate")),
    ("Prune (rows/s)", _rate("prune_rate")),
    ("Prune: longest batch transaction (ms)", _ms("prune_hold_max")),
    ("Prune: longest DELETE statement (ms)", _ms("prune_delete_max")),
    ("Writer's longest statement, before / during prune (ms)", _writer),
)


def rows(figures: Sequence[Figures]) -> list[list[str]]:
    return [[cell(f) for _, cell in COLUMNS] for f in figures if "error" not in f]


def _change(value: float, base: float, higher_is_better: bool) -> str:
    worse = (base - value) / base if higher_is_better else (value - base) / base
    verdict = "meets the 10% aim" if worse <= AIM_RATIO else "MISSES the 10% aim"
    return f"{value / base:.2f}x ({verdict})"


def _overlap(f: Figures, base: Figures, key: str) -> str:
    """A remark when the rounds of the two measurements overlap (a difference within noise)."""
    a, b = f.get(f"{key}s") or [], base.get(f"{key}s") or []
    if len(a) > 1 and len(b) > 1 and max(a) >= min(b) and max(b) >= min(a):
        return " The rounds' ranges overlap."
    return ""


def aims(figures: Sequence[Figures]) -> list[str]:
    """How the largest sizes compare with the smallest size alone, and the prune aim."""
    done = [f for f in figures if "error" not in f]
    base = min((f for f in done if not f["backlog"]), key=lambda f: f["size"], default=None)
    found = []
    for f in done if base else []:
        if f is base or f["size"] != max(g["size"] for g in done):
            continue
        label = f"{f['size']:,} ready beside {_beside(f)} vs {base['size']:,} alone"
        for key, name, higher in (
            ("claim_p50", "claim p50", False),
            ("drain_span_rate", "drain rate in rows", True),
        ):
            if f.get(key) and base.get(key):
                change = _change(f[key], base[key], higher)
                found.append(f"{label}: {name} {change}.{_overlap(f, base, key)}")
    for f in (f for f in done if f.get("prune_hold_max") is not None):
        verdict = "within" if f["prune_hold_max"] <= AIM_HOLD else "OVER"
        found.append(
            f"Prune of {f['pruned']:,} rows beside {f['size']:,} ready: {f['prune_batches']} "
            f"batches, longest {f['prune_hold_max'] * 1000:,.1f} ms ({verdict} the 100 ms aim), "
            f"p50 {f['prune_hold_p50'] * 1000:,.1f} ms; the writer's {f['writer_ops']:,} "
            f"statements meanwhile: p50 {f['writer_prune_p50'] * 1000:,.1f} ms, p99 "
            f"{f['writer_prune_p99'] * 1000:,.1f} ms, longest "
            f"{f['writer_prune_max'] * 1000:,.1f} ms ("
            + ", ".join(f"{op} {t * 1000:,.1f}" for op, t in f["writer_longest"].items())
            + ")."
        )
    return found


def problems(figures: Sequence[Figures]) -> list[str]:
    """Failed measurements and figures that show something went wrong."""
    found = []
    for f in figures:
        where = f"{f['size']:,} ready, backlog {f['backlog']:,}"
        if "error" in f:
            found.append(f"{where}: {f['error']}")
            continue
        if f.get("claims_odd"):
            found.append(f"{where}: {f['claims_odd']} claims took fewer or other jobs than due")
        if any(states.get("succeeded") != f["drain"] for states in f["drain_states"]):
            found.append(f"{where}: drained jobs ended as {f['drain_states']} (by round)")
        if f.get("pruned") is not None and f["pruned"] < f["prune_expected"]:
            found.append(f"{where}: pruned {f['pruned']:,} of {f['prune_expected']:,}")
    return found


def render_text(results: Results) -> str:
    """One aligned table per database: a line per figure, a column per measurement."""
    parts = []
    for db, figures in results.items():
        table = list(zip(*[[name for name, _ in COLUMNS], *rows(figures)], strict=True))
        widths = [max(len(cell) for cell in column) for column in zip(*table, strict=True)]
        lines = [f"== {ENGINE_LABELS[db]} =="]
        for line in table:
            cells = [line[0].ljust(widths[0])]
            cells += [c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)]
            lines.append("  ".join(cells))
        lines += [f"* {note}" for note in aims(figures) + problems(figures)]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _md_table(table: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(table[0]) + " |", "|---|---|" + "---:|" * (len(table[0]) - 2)]
    return lines + ["| " + " | ".join(row) + " |" for row in table[1:]]


def machine_facts(
    versions: dict[str, str], sources: list[tuple[str, str]], load_before: str, load_after: str
) -> list[tuple[str, str]]:
    import psutil

    facts = [
        ("CPU", f"{os.cpu_count()} logical CPUs, {cpu_model()}"),
        ("Memory", f"{psutil.virtual_memory().total / 2**30:.1f} GiB"),
        ("OS", platform.platform()),
        ("Python", platform.python_version()),
        ("Django", package_version("django")),
        *sources,
    ]
    facts += [(ENGINE_LABELS[db], version) for db, version in versions.items()]
    return [*facts, ("Load average (1/5/15 min) before / after", f"{load_before}; {load_after}")]


METHOD = """\
Conveyor's `DatabaseBackend` as the jobs table grows. For each database and each number N
of ready jobs, on a fresh migrated database, first with nothing else in the table, then
beside {backlog:,} scheduled jobs (due in a year, at a higher priority than any ready job)
and {backlog:,} jobs that succeeded 30 days ago, inserted with set-based `INSERT ... SELECT`:

1. **Enqueue**: the N ready no-op jobs go in with `conveyor.bulk_enqueue`, {chunk:,} calls per
   call; the first {drain:,} at priority 10, the rest at 0. Then `ANALYZE` on PostgreSQL and
   MySQL (what autovacuum or InnoDB would soon do); nothing on SQLite.
2. **Claim**: {claims} times `backend.claim(worker, QueueSelector(), 16)` from the client
   process, each claim given back untimed with `backend.unclaim(jobs)`.
3. **Drain**: `manage.py conveyor worker --processes {processes}` (real processes) runs the
   {drain:,} priority-10 jobs; it is stopped with SIGTERM once they are all finished (without
   `--until-done`, which would go on through the rest of N). Reported: {drain:,} / (workers
   start -> the table shows them finished, polled every 25 ms), and {drain:,} / (their first
   `started_at` -> last `finished_at`), which leaves process start-up out.

   Steps 2 and 3 run {rounds} times on each database, the {drain:,} jobs made ready again
   (one `UPDATE`) between rounds: claim p50/p99 are over all {rounds} x {claims} claims; drain
   rates are the median of the rounds, with their range in brackets.
4. **Prune** (with the backlog): `backend.prune(now - 1 day)`, with its default batch size
   and pause between batches, deletes the {backlog:,} finished jobs. Each batch's write
   transaction is timed from the moment it holds its lock (after `BEGIN IMMEDIATE` on SQLite)
   to the end of its `COMMIT` (on SQLite the commit also writes the WAL, and may run an
   automatic checkpoint), and its `DELETE` statement alone.
   Meanwhile a writer thread on its own connection enqueues a job, claims one and completes
   it every 5 ms, timing each statement: its longest statement in the 2 s before the prune
   and during it is the longest any producer or worker would have waited.
   (A thread of the client process: it may also wait up to a few ms for Python's GIL.)

Settings as in the main run: `CONN_MAX_AGE = None`, SQLite in WAL mode with
`synchronous=NORMAL`. Each row is one database, filled and pruned once; a machine shared
with other work (see the load average) adds noise. "Meets the 10% aim" compares the largest
N with the smallest N alone.
"""


def render_markdown(
    results: Results,
    args: argparse.Namespace,
    command: str,
    facts: Sequence[tuple[str, str]],
    started: datetime,
) -> str:
    from bench.fill import ENQUEUE_CHUNK

    lines = [f"## Scale: run started {started:%Y-%m-%d %H:%M} UTC", ""]
    lines += METHOD.format(chunk=ENQUEUE_CHUNK, **vars(args)).splitlines()
    lines += ["", f"Command: `{command}`", "", "| Machine | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in facts]
    for db, figures in results.items():
        lines += ["", f"### Scale: {ENGINE_LABELS[db]}", ""]
        lines += _md_table([[name for name, _ in COLUMNS], *rows(figures)])
        notes = aims(figures) + problems(figures)
        lines += ["", *(f"- {note}" for note in notes)] if notes else []
    return "\n".join(lines) + "\n"
