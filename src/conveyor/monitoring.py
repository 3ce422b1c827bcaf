"""Turn queue statistics into something a person reads, or a script (JSON)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

from conveyor import clock
from conveyor.records import STAT_NAMES, QueueStats, ScheduleInfo, WorkerInfo


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


# --- one JSON document (``conveyor status --json``) -------------------------------------------


def online(worker: WorkerInfo, now: datetime, lease: float) -> bool:
    """Say whether a running worker beat within the last lease (its jobs are kept for it)."""
    beat = worker.last_beat_at
    return worker.stopped_at is None and beat is not None and beat > now - timedelta(seconds=lease)


def iso(moment: datetime | None) -> str | None:
    """An ISO 8601 time with its offset, or None."""
    return None if moment is None else clock.aware(moment).isoformat()


def status_document(
    stats: QueueStats,
    workers: Sequence[WorkerInfo],
    schedules: Sequence[ScheduleInfo],
    *,
    backend: str,
    queues: Collection[str] = (),
    now: datetime,
    lease: float,
) -> dict[str, Any]:
    """Where a backend stands, as plain JSON values with the same keys every time.

    ``queues`` are listed even when they hold no job. Times are ISO 8601 with an offset.
    """
    by_queue = {name: dict.fromkeys(STAT_NAMES, 0) for name in queues}
    for name, counts in stats.by_queue.items():
        by_queue[name] = {state: counts.get(state, 0) for state in STAT_NAMES}
    return {
        "backend": backend,
        "generated_at": iso(now),
        "queues": dict(sorted(by_queue.items())),
        "totals": {state: getattr(stats, state) for state in STAT_NAMES},
        "workers": [_worker(info, now, lease) for info in workers],
        "schedules": [_schedule(info) for info in schedules],
    }


def _worker(info: WorkerInfo, now: datetime, lease: float) -> dict[str, Any]:
    return {
        "id": info.id,
        "kind": info.kind,
        "host": info.host,
        "pid": info.pid,
        "supervisor": info.supervisor,
        "queues": info.queues,
        "threads": info.threads,
        "started_at": iso(info.started_at),
        "last_beat_at": iso(info.last_beat_at),
        "online": online(info, now, lease),
    }


def _schedule(info: ScheduleInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "task": info.spec.task_path,
        "timetable": describe_timetable(info),
        "state": schedule_state(info),
        "source": info.spec.source,
        "next_run_at": iso(info.next_run_at),
        "last_run_at": iso(info.last_run_at),
        "runs": info.runs,
    }
