"""What every store decides the same way about a schedule: its next run, and what fires.

Each store keeps schedules its own way (rows and a firings table, or in-process dicts) and
asks these functions what to write, so that the rules hold on every backend: a new
schedule's first run, the next run after its definition changed or it was resumed, and the
due times one tick fires, with its catch-up policy and repeat count.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from conveyor.cron import MANUAL, Timetable, plan
from conveyor.records import ScheduleSpec

FIRINGS_KEPT = 100  # due times remembered per schedule, besides its last run
MAX_CATCH_UP = 1000  # runs one schedule fires at once, at most, whatever a row says
MIN_GRACE = 5.0  # seconds: a look for due schedules comes about once a second


def anchored(spec: ScheduleSpec, now: datetime) -> Timetable:
    """The timetable to store: with its first run fixed, if it steps from one."""
    return spec.timetable.anchored(now)


def first_run(
    spec: ScheduleSpec,
    timetable: Timetable,
    now: datetime,
    last_run: datetime | None = None,
    *,
    new: bool = False,
) -> datetime | None:
    """When a schedule just saved (``new``, or changed) runs first.

    Never at or before the last run it fired: a changed timetable does not fire a due time
    again. ``run_at_creation`` makes a new schedule run at once.
    """
    if spec.run_at_creation and new and spec.repeats != 0:
        return now
    if spec.repeats == 0:
        return None
    first = timetable.first(now)
    if first is not None and last_run is not None and first <= last_run:
        first = timetable.next_after(last_run)
    return first


def changed_run(
    spec: ScheduleSpec,
    timetable: Timetable,
    now: datetime,
    last_run: datetime | None,
    pending: datetime | None,
) -> datetime | None:
    """The next run of a schedule whose definition just changed.

    A run that fell due and was not fired yet (``pending``: the workers were down while the
    change was deployed) stays owed, for the catch-up policy; otherwise, as for a new
    schedule, never at or before its last run.
    """
    owed = pending is not None and pending <= now and (last_run is None or pending > last_run)
    if owed and timetable.kind != MANUAL and spec.repeats != 0:
        return pending
    return first_run(spec, timetable, now, last_run)


def repeats_after_change(before: int | None, left: int | None, after: int | None) -> int | None:
    """Runs left once ``repeats`` went from ``before`` to ``after``: a new count, or as was."""
    return left if before == after else after


def resumed_run(timetable: Timetable, next_run: datetime | None, now: datetime) -> datetime | None:
    """The next run of a schedule resumed now: the runs missed while paused are dropped."""
    if next_run is None or next_run > now:
        return next_run
    return timetable.next_after(now)


@dataclass(frozen=True, slots=True)
class Firing:
    """What one tick does for a due schedule: the due times it fires, and what it stores."""

    due: tuple[datetime, ...]
    next_run: datetime | None
    repeats_left: int | None
    missed: int


def firing(
    spec: ScheduleSpec,
    timetable: Timetable,
    next_run: datetime,
    now: datetime,
    repeats_left: int | None,
    fired: set[datetime],
    last_run: datetime | None = None,
) -> Firing:
    """The due times to fire for a schedule whose ``next_run`` is at or before ``now``.

    ``fired`` holds those of its due times already fired (a slot is fired once, whatever
    else changed), and none at or before ``last_run`` fires; a schedule with
    ``repeats_left`` runs no more than that.
    """
    chosen = plan(
        timetable,
        next_run,
        now,
        catch_up=spec.catch_up,
        limit=max(1, min(spec.catch_up_limit, MAX_CATCH_UP)),
        grace=max(spec.grace, MIN_GRACE),
    )
    due = tuple(
        slot for slot in chosen.fire if slot not in fired and (last_run is None or slot > last_run)
    )
    following = chosen.next_run
    if repeats_left is not None:
        due = due[:repeats_left]
        repeats_left -= len(due)
        if repeats_left <= 0:
            following = None
    return Firing(due=due, next_run=following, repeats_left=repeats_left, missed=chosen.missed)
