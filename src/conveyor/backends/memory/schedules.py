"""The in-process store's schedules: the database's rules, kept in dicts under one lock."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING

from django.tasks.exceptions import InvalidTask
from django.tasks.signals import task_enqueued

from conveyor import clock
from conveyor.backends import scheduling
from conveyor.backends.base import StoreBackend
from conveyor.exceptions import (
    InvalidSchedule,
    ScheduleChanged,
    ScheduleExists,
    ScheduleNotFound,
    TaskNotFound,
)
from conveyor.records import Fired, ScheduleInfo, ScheduleSpec, SyncReport

if TYPE_CHECKING:
    from django.tasks import TaskResult

    from conveyor.backends.memory.tables import Tables

logger = logging.getLogger(__name__)


@dataclass(slots=True, kw_only=True)
class Kept:
    """One stored schedule and where it stands."""

    spec: ScheduleSpec  # its timetable anchored (a fixed first run) when saved
    fingerprint: str
    created_at: datetime
    updated_at: datetime
    paused: bool = False
    retired: bool = False
    next_run: datetime | None = None
    last_run: datetime | None = None
    last_result_id: str | None = None
    runs: int = 0
    repeats_left: int | None = None
    fired: set[datetime] = field(default_factory=set)

    def info(self, backend: str) -> ScheduleInfo:
        return ScheduleInfo(
            spec=self.spec,
            backend=backend,
            paused=self.paused,
            retired=self.retired,
            next_run_at=self.next_run,
            last_run_at=self.last_run,
            last_result_id=self.last_result_id,
            runs=self.runs,
            repeats_left=self.repeats_left,
            created_at=self.created_at,
            updated_at=self.updated_at,
            fingerprint=self.fingerprint,
        )

    def define(self, spec: ScheduleSpec, now: datetime, *, new: bool = False) -> None:
        timetable = scheduling.anchored(spec, now)
        if new:
            self.next_run = scheduling.first_run(spec, timetable, now, new=True)
            self.repeats_left = spec.repeats
        else:
            before, pending = self.spec.repeats, None if self.retired else self.next_run
            self.next_run = scheduling.changed_run(spec, timetable, now, self.last_run, pending)
            self.repeats_left = scheduling.repeats_after_change(
                before, self.repeats_left, spec.repeats
            )
            if self.repeats_left == 0:
                self.next_run = None
        self.spec = replace(spec, timetable=timetable)
        self.fingerprint = spec.fingerprint()
        self.retired = False
        self.updated_at = now


def _now() -> datetime:
    """The store's clock, aware (what timetables take), whatever ``USE_TZ`` says."""
    return clock.aware(clock.now())


class MemorySchedules(StoreBackend):
    """Schedules of the in-process store."""

    if TYPE_CHECKING:
        _tables: Tables  # what ``MemoryBackend`` has

    def add_schedule(self, spec: ScheduleSpec, *, paused: bool = False) -> ScheduleInfo:
        with self._tables.lock:
            if spec.name in self._tables.schedules:
                raise ScheduleExists(
                    f"Schedule {spec.name!r} already exists on backend {self.alias!r}; "
                    "change it, or delete it first."
                )
            kept = self._keep(spec, _now(), paused=paused)
            return kept.info(self.alias)

    def _keep(self, spec: ScheduleSpec, now: datetime, *, paused: bool) -> Kept:
        kept = Kept(spec=spec, fingerprint="", created_at=now, updated_at=now, paused=paused)
        kept.define(spec, now, new=True)
        self._tables.schedules[spec.name] = kept
        return kept

    def change_schedule(self, spec: ScheduleSpec, *, was: str | None = None) -> ScheduleInfo:
        with self._tables.lock:
            kept = self._tables.schedules.get(spec.name)
            if kept is None:
                raise ScheduleNotFound(f"No schedule {spec.name!r} on backend {self.alias!r}.")
            if was is not None and kept.fingerprint != was:
                raise ScheduleChanged(f"Schedule {spec.name!r} was changed meanwhile.")
            if kept.spec.source == "code" and spec.source != "code":
                raise InvalidSchedule(
                    f"Schedule {spec.name!r} is declared in code (@schedule): change it there."
                )
            kept.define(spec, _now())
            return kept.info(self.alias)

    def sync_schedules(self, specs: Sequence[ScheduleSpec]) -> SyncReport:
        now, added, changed = _now(), [], []
        with self._tables.lock:
            kept_all = self._tables.schedules
            for spec in specs:
                kept = kept_all.get(spec.name)
                if kept is not None and kept.spec.source != "code":
                    logger.error(
                        "Schedule %r is declared in code (@schedule) but a schedule made at run "
                        "time on backend %r has that name: the code one is left out; rename "
                        "one of them.",
                        spec.name,
                        self.alias,
                    )
                elif kept is None:
                    self._keep(spec, now, paused=False)
                    added.append(spec.name)
                elif kept.fingerprint != spec.fingerprint() or kept.retired:
                    kept.define(spec, now)
                    changed.append(spec.name)
            names = {spec.name for spec in specs}
            retired = sorted(
                name
                for name, kept in kept_all.items()
                if kept.spec.source == "code" and not kept.retired and name not in names
            )
            for name in retired:
                kept_all[name].retired, kept_all[name].next_run = True, None
                kept_all[name].updated_at = now
        return SyncReport(added=tuple(added), changed=tuple(changed), retired=tuple(retired))

    def pause_schedule(self, name: str, paused: bool) -> bool:
        with self._tables.lock:
            kept = self._tables.schedules.get(name)
            if kept is None:
                return False
            now = _now()
            if kept.paused and not paused:
                kept.next_run = scheduling.resumed_run(kept.spec.timetable, kept.next_run, now)
            kept.paused, kept.updated_at = paused, now
            return True

    def delete_schedule(self, name: str) -> bool:
        with self._tables.lock:
            kept = self._tables.schedules.get(name)
            if kept is None:
                return False
            if kept.spec.source == "code" and not kept.retired:
                raise InvalidSchedule(
                    f"Schedule {name!r} is declared in code (@schedule): remove it there; it "
                    "is retired at the next start-up, and can be deleted then."
                )
            del self._tables.schedules[name]
            return True

    def schedules(self, *, retired: bool = False) -> list[ScheduleInfo]:
        with self._tables.lock:
            return [
                kept.info(self.alias)
                for _, kept in sorted(self._tables.schedules.items())
                if retired or not kept.retired
            ]

    def get_schedule(self, name: str) -> ScheduleInfo | None:
        with self._tables.lock:
            kept = self._tables.schedules.get(name)
            return kept.info(self.alias) if kept is not None else None

    def fire_schedules(self, limit: int = 100) -> list[Fired]:
        now, fired = _now(), []
        with self._tables.lock:
            due = sorted(
                (kept.next_run, name)
                for name, kept in self._tables.schedules.items()
                if kept.next_run is not None
                and kept.next_run <= now
                and not kept.paused
                and not kept.retired
            )[:limit]
            for _, name in due:
                fired += self._fire(self._tables.schedules[name], now)
        self._announce_runs()
        return fired

    def _fire(self, kept: Kept, now: datetime) -> list[Fired]:
        assert kept.next_run is not None
        spec, timetable = kept.spec, kept.spec.timetable
        owed = scheduling.firing(
            spec, timetable, kept.next_run, now, kept.repeats_left, kept.fired, kept.last_run
        )
        ids = [self._enqueue_run(spec, slot, now) for slot in owed.due]
        kept.fired.update(owed.due)
        if len(kept.fired) > scheduling.FIRINGS_KEPT:
            kept.fired = set(sorted(kept.fired)[-scheduling.FIRINGS_KEPT :])
        kept.next_run, kept.repeats_left, kept.updated_at = owed.next_run, owed.repeats_left, now
        if owed.due:
            kept.last_run = max(owed.due)
            kept.runs += sum(1 for result_id in ids if result_id)
            kept.last_result_id = next((i for i in reversed(ids) if i), kept.last_result_id)
        return [
            Fired(schedule=spec.name, task_path=spec.task_path, due_at=slot, result_id=result_id)
            for slot, result_id in zip(owed.due, ids, strict=True)
        ]

    def _enqueue_run(self, spec: ScheduleSpec, due: datetime, now: datetime) -> str | None:
        """Store the job of one run (the tables' lock held); its result id, or None."""
        now = clock.stored(now)  # as Django keeps datetimes: naive with USE_TZ off
        try:
            task, (args, kwargs) = self.scheduled_call(spec, due, now)
            how = self.uniqueness(task, (args, kwargs))
        except (TaskNotFound, InvalidTask, TypeError, ValueError) as e:
            logger.error(
                "Schedule %r: its run due %s cannot be enqueued (task %s): %s. The run is skipped.",
                spec.name,
                due.isoformat(),
                spec.task_path,
                str(e).rstrip("."),
            )
            return None
        held = self._tables.holder(how, now) if how is not None else None
        if held is not None:
            return held.id
        row = self._tables.new_row(task, args, kwargs, now, self.job_options(task), how)
        self._tables.add(row)
        self._tables.new_runs.append(row.id)
        return row.id

    def run_schedule(self, name: str) -> Fired:
        with self._tables.lock:
            kept = self._tables.schedules.get(name)
            if kept is None or kept.retired:
                raise ScheduleNotFound(f"No schedule {name!r} on backend {self.alias!r}.")
            now = _now()
            result_id = self._enqueue_run(replace(kept.spec, jitter=0.0), now, now)
            if result_id is None:
                raise InvalidSchedule(
                    f"Schedule {name!r}: its task {kept.spec.task_path} could not be enqueued "
                    "(see the log); nothing was stored."
                )
            kept.runs += 1
            kept.last_result_id = result_id or kept.last_result_id
            kept.updated_at = now
            fired = Fired(
                schedule=name,
                task_path=kept.spec.task_path,
                due_at=now,
                result_id=result_id,
                on_demand=True,
            )
        self._announce_runs()
        return fired

    def _announce_runs(self) -> None:
        """Send ``task_enqueued`` for the jobs runs added (a unique job's holder is not new)."""
        with self._tables.lock:
            new, self._tables.new_runs = self._tables.new_runs, []
        for result_id in new:
            result: TaskResult = self.get_result(result_id)
            task_enqueued.send(type(self), task_result=result)
