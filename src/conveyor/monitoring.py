"""Show where a queue stands to a person: status and schedule lines, the live view."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Protocol, TypeGuard

from django.utils import timezone
from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.table import Table
from rich.text import Text

from conveyor import clock
from conveyor.records import (
    FailedJob,
    PickupLatency,
    QueueSelector,
    QueueStats,
    RunningJob,
    ScheduleInfo,
    WorkerInfo,
)


class Writer(Protocol):
    def write(self, text: str, /) -> Any: ...


COLUMNS = ("ready", "scheduled", "running", "successful", "failed")


def printable(text: str) -> str:
    r"""``text`` safe to show on a terminal: every character that is not printable escaped.

    Control characters (an escape sequence could clear or rewrite the screen), line and
    paragraph separators and format characters (bidi overrides reorder what is shown)
    become ``\x1b``, ``\u202e`` and so on; a backslash is doubled so that no name reads
    like another.
    """
    return "".join(ch if ch.isprintable() and ch != "\\" else _escaped(ch) for ch in text)


def _escaped(ch: str) -> str:
    code = ord(ch)
    if ch == "\\":
        return "\\\\"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def render_stats(stats: QueueStats, alias: str, out: Writer) -> None:
    """Write a table of job counts per queue, with totals; names are shown escaped."""
    rows = sorted(
        ((printable(name), counts) for name, counts in stats.by_queue.items()),
        key=lambda row: row[0],
    )
    width = max([5, *(len(name) for name, _ in rows)])
    out.write(f"Backend '{printable(alias)}'\n")
    out.write("queue".ljust(width) + "".join(c.rjust(12) for c in COLUMNS) + "\n")
    for name, counts in rows:
        out.write(name.ljust(width) + "".join(str(counts[c]).rjust(12) for c in COLUMNS) + "\n")
    totals = [getattr(stats, c) for c in COLUMNS]
    out.write("total".ljust(width) + "".join(str(t).rjust(12) for t in totals) + "\n")


def describe_timetable(info: ScheduleInfo) -> str:
    """A schedule's timetable in a few words: ``cron 30 2 * * * (Europe/Paris)`` and so on."""
    tt = info.spec.timetable
    if tt.kind == "cron":
        what = f"cron {tt.cron}"
    elif tt.kind == "every" and tt.every is not None:
        what = f"every {tt.every}"
    elif tt.kind == "once" and tt.start is not None:
        what = f"once at {tt.start.isoformat()}"
    else:
        what = tt.kind
    return what if tt.kind in ("every", "hourly", "once", "manual") else f"{what} ({tt.timezone})"


def schedule_state(info: ScheduleInfo) -> str:
    """``active``, ``paused`` or ``retired``."""
    return "retired" if info.retired else "paused" if info.paused else "active"


def render_schedules(schedules: Sequence[ScheduleInfo], alias: str, out: Writer) -> None:
    """Write one line per schedule: name, task, timetable, state, next and last runs."""
    out.write(f"Backend '{printable(alias)}': {len(schedules)} schedule(s)\n")
    for info in schedules:
        state = schedule_state(info)
        nxt = info.next_run_at.isoformat(timespec="seconds") if info.next_run_at else "-"
        last = info.last_run_at.isoformat(timespec="seconds") if info.last_run_at else "-"
        out.write(
            f"{printable(info.name)}  {printable(info.spec.task_path)}  "
            f"{printable(describe_timetable(info))}  [{state}, {info.spec.source}]  "
            f"next {nxt}  last {last}  runs {info.runs}\n"
        )


# --- the live view (``conveyor monitor``) -------------------------------------------------------

WINDOW = 60.0  # seconds: the rates and the pickup latency are those of the last minute
BOX = box.SIMPLE_HEAD  # a line under the headers only: more rows fit on the screen
WORKERS_SHOWN = 20
NARROW = 110  # columns: on a screen narrower than this, tables go one under another


def online(worker: WorkerInfo, now: datetime, lease: float) -> bool:
    """Say whether a running worker beat within the last lease (its jobs are kept for it)."""
    beat = worker.last_beat_at
    return worker.stopped_at is None and beat is not None and beat > now - timedelta(seconds=lease)


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """What one look at a backend saw; times are on the stores' clock.

    ``stats`` counts the pending jobs and those that finished in the last ``WINDOW``
    seconds. After a failed look, ``error`` says why and the rest is the last good look
    (``taken_at`` says when that was, None if there was none; ``checked_at`` is now).
    """

    backend: str
    taken_at: datetime | None
    checked_at: datetime
    interval: float
    lease: float
    queues: tuple[str, ...] = ()  # listed even when they hold no job
    selector: QueueSelector = field(default_factory=QueueSelector)
    stats: QueueStats = field(default_factory=QueueStats)
    workers: tuple[WorkerInfo, ...] = ()
    running: tuple[RunningJob, ...] = ()
    failures: tuple[FailedJob, ...] = ()
    latency: PickupLatency = field(default_factory=PickupLatency)
    schedules: tuple[ScheduleInfo, ...] = ()
    error: str = ""


def render(snapshot: Snapshot) -> RenderableType:
    """The whole view of one snapshot: every name escaped, nothing read as markup."""
    s = snapshot
    return Group(
        _header(s),
        SideBySide((_queues(s), 3), (_throughput(s), 2)),
        _running(s),
        _workers(s),
        SideBySide((_failures(s), 3), (_schedules(s), 2)),
    )


class SideBySide:
    """Renderables next to each other, each given a share of the width; one under the
    other on a narrow screen."""

    def __init__(self, *parts: tuple[RenderableType, int]) -> None:
        self.parts = parts

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if options.max_width < NARROW:
            for part, _ in self.parts:
                yield part
            return
        grid = Table.grid(expand=True, padding=(0, 2))
        for _, ratio in self.parts:
            grid.add_column(ratio=ratio)
        grid.add_row(*(part for part, _ in self.parts))
        yield grid


def safe(text: object, style: str = "") -> Text:
    """``text`` as shown: escaped (``printable``), and never read as markup."""
    return Text(printable(str(text)), style=style)


def _header(s: Snapshot) -> Text:
    shown = "all queues" if s.selector == QueueSelector() else f"queues {s.selector.describe()}"
    line = Text.assemble(
        ("Conveyor", "bold"),
        "  backend ",
        safe(s.backend, "bold"),
        f"  {printable(shown)}  {clock_time(s.checked_at)}  every {duration(s.interval)}"
        "  Ctrl-C to quit",
    )
    if s.error:
        seen = f"last read {clock_time(s.taken_at)}" if s.taken_at else "nothing read yet"
        line.append("\n")
        line.append_text(safe(f"Cannot reach the store: {s.error}", "bold red"))
        line.append(f"  (retrying every {duration(s.interval)}; {seen})", style="red")
    return line


def _table(title: str, **options: Any) -> Table:
    return Table(
        box=BOX,
        show_edge=False,
        title=title,
        title_justify="left",
        title_style="bold",
        expand=True,
        **options,
    )


def _queues(s: Snapshot) -> Table:
    table = _table("Queues")
    table.add_column("queue", overflow="fold")
    for name in ("ready", "scheduled", "running", "succeeded/min", "failed/min"):
        table.add_column(name, justify="right")
    per_minute = 60 / WINDOW
    for name in sorted(set(s.queues) | set(s.stats.by_queue)):
        counts = s.stats.by_queue.get(name, {})
        table.add_row(safe(name), *_counts(counts.get, per_minute))
    table.add_row(Text("total", "bold"), *_counts(partial(getattr, s.stats), per_minute))
    return table


def _counts(count: Callable[[str], Any], per_minute: float) -> list[str]:
    pending = [str(count(name) or 0) for name in ("ready", "scheduled", "running")]
    rates = [f"{(count(name) or 0) * per_minute:g}" for name in ("successful", "failed")]
    return pending + rates


def _throughput(s: Snapshot) -> Table:
    latency, per_minute = s.latency, 60 / WINDOW
    failed = s.stats.failed * per_minute
    table = _table("Last minute", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("succeeded / min", f"{s.stats.successful * per_minute:g}")
    table.add_row("failed / min", Text(f"{failed:g}", "bold red" if failed else ""))
    table.add_row("pickup latency p50", seconds(latency.p50))
    table.add_row("pickup latency p95", seconds(latency.p95))
    table.add_row("longest wait", seconds(latency.longest))
    table.add_row("starts measured", str(latency.samples))
    return table


def _running(s: Snapshot) -> Table:
    more = s.stats.running - len(s.running)
    table = _table(f"Running ({s.stats.running})", caption=f"and {more} more" if more > 0 else None)
    table.add_column("task", overflow="fold", ratio=3)
    table.add_column("queue", overflow="fold")
    table.add_column("worker", overflow="ellipsis", no_wrap=True, max_width=32)
    table.add_column("for", justify="right")
    table.add_column("try", justify="right")
    table.add_column("progress", ratio=2)
    for job in s.running:
        ran = duration(since(job.started_at, s.checked_at)) if job.started_at else "starting"
        table.add_row(
            safe(job.task_path, "bold"),
            safe(job.queue_name),
            safe(job.worker_id),
            ran,
            str(job.attempt),
            progress(job.progress),
        )
    return table


def _workers(s: Snapshot) -> Table:
    up = {w.id for w in s.workers if online(w, s.checked_at, s.lease)}
    down = len(s.workers) - len(up)
    # Online first: rows of workers whose machine vanished stay until someone deletes them.
    shown = sorted(s.workers, key=lambda w: (w.id not in up, w.id))[:WORKERS_SHOWN]
    more = len(s.workers) - len(shown)
    table = _table(
        f"Workers ({len(up)} online{f', {down} not' if down else ''})",
        caption=f"and {more} more" if more else None,
    )
    table.add_column("id", overflow="ellipsis", no_wrap=True, ratio=2)
    table.add_column("kind", no_wrap=True)
    table.add_column("host", overflow="ellipsis", no_wrap=True, ratio=1)
    table.add_column("pid", justify="right", no_wrap=True)
    table.add_column("queues", overflow="fold", ratio=1)
    table.add_column("last beat", justify="right", no_wrap=True)
    table.add_column("online", no_wrap=True)
    for worker in shown:
        beat = since(worker.last_beat_at, s.checked_at) if worker.last_beat_at else None
        table.add_row(
            safe(worker.id),
            safe(worker.kind),
            safe(worker.host),
            str(worker.pid),
            safe(worker.queues),
            "-" if beat is None else f"{duration(beat)} ago",
            Text("yes", "green") if worker.id in up else Text("no", "bold red"),
        )
    return table


def _schedules(s: Snapshot) -> Table:
    table = _table("Next schedules")
    table.add_column("name", overflow="ellipsis", no_wrap=True, ratio=1)
    table.add_column("next", justify="right", no_wrap=True)
    table.add_column("last", justify="right", no_wrap=True)
    table.add_column("state", no_wrap=True)
    for info in s.schedules:
        table.add_row(
            safe(info.name),
            relative(info.next_run_at, s.checked_at),
            relative(info.last_run_at, s.checked_at),
            schedule_state(info),
        )
    return table


def _failures(s: Snapshot) -> Table:
    table = _table("Recent failures")
    table.add_column("when", justify="right", no_wrap=True)
    table.add_column("task", overflow="fold", ratio=3)
    table.add_column("error", overflow="ellipsis", no_wrap=True, ratio=1)
    table.add_column("message", overflow="ellipsis", no_wrap=True, ratio=2)
    for failed in s.failures:
        error = "cancelled" if failed.cancelled else failed.error_class.rpartition(".")[2]
        table.add_row(
            relative(failed.finished_at, s.checked_at),
            safe(failed.task_path, "bold"),
            safe(error, "red"),
            safe(failed.message),
        )
    return table


def progress(reported: Mapping[str, Any] | None) -> Text:
    """``3/10 30% copying`` from what a task reported; empty if it reported nothing."""
    if not reported:
        return Text("")
    done, total = reported.get("done"), reported.get("total")
    message = reported.get("message") or ""
    if _number(done) and _number(total) and total:
        text = f"{done:g}/{total:g} {100 * done / total:.0f}%"
    elif _number(done):
        text = f"{done:g}"
    else:
        text = ""
    line = Text(text, "cyan")
    if message:
        line.append(" ")
        line.append_text(safe(message))
    return line


def _number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def since(moment: datetime, now: datetime) -> float:
    """Seconds from ``moment`` to ``now`` (negative if ``moment`` is later)."""
    return (clock.aware(now) - clock.aware(moment)).total_seconds()


def relative(moment: datetime | None, now: datetime) -> str:
    """``12s ago``, ``in 4m 05s``, or ``-`` for no time."""
    if moment is None:
        return "-"
    gap = since(moment, now)
    return f"in {duration(-gap)}" if gap < 0 else f"{duration(gap)} ago"


def duration(value: float) -> str:
    """``0.4s``, ``12s``, ``4m 05s``, ``2h 03m``, ``3d 04h``."""
    value = max(value, 0.0)
    if value < 10:
        return f"{value:.1f}s"
    whole = int(value)
    for size, unit, small, small_unit in (
        (86400, "d", 3600, "h"),
        (3600, "h", 60, "m"),
        (60, "m", 1, "s"),
    ):
        if whole >= size:
            return f"{whole // size}{unit} {whole % size // small:02d}{small_unit}"
    return f"{whole}s"


def seconds(value: float | None) -> str:
    """A latency: ``-`` when nothing was measured, else milliseconds or seconds."""
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else duration(value)


def clock_time(moment: datetime | None) -> str:
    """``12:03:04`` in the project's time zone."""
    if moment is None:
        return "-"
    return timezone.localtime(clock.aware(moment)).strftime("%H:%M:%S")
