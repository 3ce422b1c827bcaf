"""Turn the figures of a run into a text table and a Markdown document."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.databases import ENGINE_LABELS
from bench.workers import LABELS

Figures = dict[str, Any]
Results = dict[str, dict[str, Figures]]  # database -> system -> figures
HEADER = (
    "Metric",
    "Better",
    LABELS["conveyor"],
    LABELS["tasksdb"],
    f"{LABELS['conveyor']} / {LABELS['tasksdb']}",
)


@dataclass(frozen=True, slots=True)
class Metric:
    """One row of the table: a figure, how to show it, and which way is better."""

    key: str
    label: str
    unit: str
    better: str  # "higher", "lower" or ""
    scale: float = 1.0
    digits: int = 0


METRICS = (
    Metric("enqueue_one_rate", "Enqueue {tasks}, one by one", "tasks/s", "higher"),
    Metric("enqueue_bulk_rate", "Enqueue {tasks}, bulk", "tasks/s", "higher"),
    Metric("drain_seconds", "Drain {tasks}: workers start -> all finished", "s", "lower", digits=2),
    Metric("drain_rate", "Drain throughput, {tasks} / that time", "tasks/s", "higher"),
    Metric(
        "db_span_rate", "Drain throughput in rows, first start -> last finish", "tasks/s", "higher"
    ),
    Metric(
        "worker_exit_seconds",
        "Drain: workers start -> worker exits (--until-done)",
        "s",
        "lower",
        digits=2,
    ),
    Metric("not_successful", "Drain: tasks not successful", "", "lower"),
    Metric(
        "pickup_p50",
        "Pickup p50, stored started_at - enqueued_at",
        "ms",
        "lower",
        scale=1000,
        digits=1,
    ),
    Metric(
        "pickup_p99",
        "Pickup p99, stored started_at - enqueued_at",
        "ms",
        "lower",
        scale=1000,
        digits=1,
    ),
    Metric(
        "stored_p50",
        "Latency p50, stored finished_at - enqueued_at",
        "ms",
        "lower",
        scale=1000,
        digits=1,
    ),
    Metric(
        "stored_p99",
        "Latency p99, stored finished_at - enqueued_at",
        "ms",
        "lower",
        scale=1000,
        digits=1,
    ),
    Metric("wall_p50", "Latency p50, client wall time", "ms", "lower", scale=1000, digits=1),
    Metric("wall_p99", "Latency p99, client wall time", "ms", "lower", scale=1000, digits=1),
    Metric("latency_failed", "Latency: tasks not successful", "", "lower"),
    Metric("idle_cpu_percent", "Idle CPU, all worker processes", "% of a core", "lower", digits=2),
    Metric("processes", "Worker-side processes", "", ""),
    Metric("worker_rss", "Memory per worker process, RSS", "MiB", "lower", digits=1),
    Metric("worker_uss", "Memory per worker process, USS", "MiB", "lower", digits=1),
    Metric("supervisor_rss", "Supervisor process, RSS", "MiB", "lower", digits=1),
    Metric("supervisor_uss", "Supervisor process, USS", "MiB", "lower", digits=1),
    Metric("total_uss", "All worker-side processes, USS", "MiB", "lower", digits=1),
    Metric("total_pss", "All worker-side processes, PSS", "MiB", "lower", digits=1),
)

WHY_NOT = {
    ("tasksdb", "enqueue_bulk_rate"): "n/a (no bulk API)",
    ("tasksdb", "worker_exit_seconds"): "n/a (SIGTERM)",
    ("tasksdb", "supervisor_rss"): "n/a (none)",
    ("tasksdb", "supervisor_uss"): "n/a (none)",
}


def derive(figures: Figures, tasks: int) -> Figures:
    """Add the figures the table shows that are computed from raw ones."""
    out = dict(figures)
    if "successful" in figures:
        out["not_successful"] = tasks - figures["successful"]
    entries = figures.get("memory") or []
    workers = [e for e in entries if e["role"] == "worker"]
    supervisors = [e for e in entries if e["role"] == "supervisor"]
    if entries:
        out.update(
            processes=len(entries),
            total_uss=sum(e["uss"] for e in entries),
            total_pss=sum(e["pss"] for e in entries),
        )
    if workers:
        out.update(
            worker_rss=statistics.mean(e["rss"] for e in workers),
            worker_uss=statistics.mean(e["uss"] for e in workers),
        )
    if supervisors:
        out.update(supervisor_rss=supervisors[0]["rss"], supervisor_uss=supervisors[0]["uss"])
    return out


def _cell(metric: Metric, system: str, figures: Figures) -> str:
    value = figures.get(metric.key)
    if value is None:
        return WHY_NOT.get((system, metric.key), "n/a")
    return f"{value * metric.scale:,.{metric.digits}f}"


def _ratio(metric: Metric, conveyor: Figures, tasksdb: Figures) -> str:
    a, b = conveyor.get(metric.key), tasksdb.get(metric.key)
    if a is None or b is None or not metric.better:
        return "n/a"
    if b == 0:
        return "n/a" if a else "="
    ratio = a / b
    if ratio >= 10:
        return f"{ratio:.1f}x"
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.2g}x"


def table_rows(per_system: dict[str, Figures], tasks: int) -> list[tuple[str, ...]]:
    """The rows of one database's table (after the header)."""
    conveyor = derive(per_system.get("conveyor", {}), tasks)
    tasksdb = derive(per_system.get("tasksdb", {}), tasks)
    rows: list[tuple[str, ...]] = []
    for metric in METRICS:
        label = metric.label.format(tasks=f"{tasks:,}")
        if metric.unit:
            label = f"{label} ({metric.unit})"
        rows.append(
            (
                label,
                metric.better,
                _cell(metric, "conveyor", conveyor),
                _cell(metric, "tasksdb", tasksdb),
                _ratio(metric, conveyor, tasksdb),
            )
        )
    return rows


def notes(per_system: dict[str, Figures]) -> list[str]:
    """Sentences to print under a table: cross ratios, failed phases, worker log lines."""
    found = []
    bulk = per_system.get("conveyor", {}).get("enqueue_bulk_rate")
    one = per_system.get("tasksdb", {}).get("enqueue_one_rate")
    if bulk and one:
        found.append(
            f"{LABELS['conveyor']} bulk vs {LABELS['tasksdb']} one by one: {bulk / one:.2f}x."
        )
    for system, figures in per_system.items():
        found.extend(f"{LABELS[system]}: {error}" for error in figures.get("errors", []))
        found.extend(
            f"{LABELS[system]} worker log: `{line}`" for line in figures.get("log_notes", [])
        )
    return found


# --- text ----------------------------------------------------------------------------------


def render_text(results: Results, tasks: int) -> str:
    """Aligned plain-text tables, one per database."""
    parts = []
    for db, per_system in results.items():
        rows = [HEADER, *table_rows(per_system, tasks)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
        lines = [f"== {ENGINE_LABELS[db]} =="]
        for n, row in enumerate(rows):
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
            cells += [cell.rjust(width) for cell, width in zip(row[2:], widths[2:], strict=True)]
            lines.append("  ".join(cells))
            if n == 0:
                lines.append("  ".join("-" * width for width in widths))
        lines.extend(f"* {note}" for note in notes(per_system))
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


# --- Markdown ---------------------------------------------------------------------------------


def _md_table(rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" + "---|" + "---:|" * 3]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def render_markdown(
    results: Results,
    tasks: int,
    command: str,
    date: str,
    facts: Sequence[tuple[str, str]],
) -> str:
    """One run's section: command, date, machine facts and a table per database."""
    lines = [
        f"## Run of {date}",
        "",
        f"Command: `{command}`",
        "",
        "| Machine | |",
        "|---|---|",
    ]
    lines += [f"| {name} | {value} |" for name, value in facts]
    for db, per_system in results.items():
        lines += ["", f"### {ENGINE_LABELS[db]}", "", *_md_table(table_rows(per_system, tasks))]
        extra = notes(per_system)
        if extra:
            lines += ["", *(f"- {note}" for note in extra)]
    return "\n".join(lines) + "\n"
