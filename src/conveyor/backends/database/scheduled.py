"""The database backend's schedule verbs: each a transition of ``transitions.schedules``."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any

from django.db import DatabaseError, OperationalError
from django.tasks import Task, TaskResult
from django.tasks.exceptions import InvalidTask
from django.tasks.signals import task_enqueued

from conveyor import clock
from conveyor.backends.base import StoreBackend
from conveyor.backends.database import store, transitions
from conveyor.backends.database.models import Job
from conveyor.backends.database.transitions import schedules
from conveyor.exceptions import TaskNotFound
from conveyor.records import Fired, ScheduleInfo, ScheduleSpec, State, SyncReport

if TYPE_CHECKING:
    from conveyor.backends.database.store import Store
    from conveyor.options import Uniqueness

logger = logging.getLogger(__name__)
# What may keep one run of a schedule from being enqueued: it is skipped and logged.
UNRUNNABLE = (TaskNotFound, InvalidTask, TypeError, ValueError)
FIRE_BUDGET = 1.0  # seconds one look spends firing schedules, at most (about)
QUIET = 600  # seconds between two log lines about the same broken schedule
_LOGGED: dict[str, float] = {}
HELD_BACKOFF = 10.0  # seconds a schedule whose firing waited too long on a lock is left
_WAITING: dict[int, float] = {}  # schedule key -> when to try it again


class DatabaseSchedules(StoreBackend):
    """Schedules kept in the backend's database, fired from every worker's supervisor."""

    if TYPE_CHECKING:  # what ``DatabaseBackend`` has
        worker_store: Store

        @property
        def channel(self) -> str: ...

        @property
        def vendor(self) -> str: ...

        def _raise_if_not_migrated(self, error: DatabaseError) -> None: ...

        def _poke_own(self) -> None: ...

        def _new_row(
            self,
            task: Task,
            call: Any,
            now: datetime,
            options: dict[str, Any],
            unique: Uniqueness | None,
        ) -> Job: ...

    def add_schedule(self, spec: ScheduleSpec, *, paused: bool = False) -> ScheduleInfo:
        return self._schedules_call(schedules.add, spec, paused)

    def change_schedule(self, spec: ScheduleSpec, *, was: str | None = None) -> ScheduleInfo:
        return self._schedules_call(schedules.change, spec, was)

    def sync_schedules(self, specs: Sequence[ScheduleSpec]) -> SyncReport:
        return self._schedules_call(schedules.sync, specs)

    def pause_schedule(self, name: str, paused: bool) -> bool:
        return self._schedules_call(schedules.pause, name, paused)

    def delete_schedule(self, name: str) -> bool:
        return self._schedules_call(schedules.delete, name)

    def schedules(self, *, retired: bool = False) -> list[ScheduleInfo]:
        return self._schedules_call(schedules.listing, retired)

    def get_schedule(self, name: str) -> ScheduleInfo | None:
        return self._schedules_call(schedules.get, name)

    def fire_schedules(self, limit: int = 100) -> list[Fired]:
        """Fire due schedules, each in its own transaction; one that fails is logged, skipped.

        Stops after ``FIRE_BUDGET`` seconds (the rest are fired at the next look), so that
        a supervisor's heartbeats never wait long on a backlog of runs.
        """
        fired: list[Fired] = []
        deadline = time.monotonic() + FIRE_BUDGET
        for key in schedules.due(self.worker_store, limit):
            if _WAITING.get(key, 0.0) > time.monotonic():
                continue  # held by a transaction a moment ago: the others first
            enqueued: list[TaskResult] = []
            try:
                fired += schedules.fire(
                    self.worker_store, key, partial(self._enqueue_runs, enqueued)
                )
            except OperationalError as e:
                if not self.worker_store.dialect.gave_up_waiting(e):
                    raise  # the store is in trouble: every schedule would fail alike
                unfired(key, e)  # a transaction holds what this one needs: later
                _WAITING[key] = time.monotonic() + HELD_BACKOFF
                continue
            except DatabaseError:
                raise
            except Exception as e:
                unfired(key, e)
                continue
            for result in enqueued:
                task_enqueued.send(type(self), task_result=result)
            if time.monotonic() > deadline:
                break
        return fired

    def run_schedule(self, name: str) -> Fired:
        enqueued: list[TaskResult] = []
        fired = self._schedules_call(schedules.run_now, name, partial(self._enqueue_runs, enqueued))
        for result in enqueued:
            task_enqueued.send(type(self), task_result=result)
        return fired

    def _schedules_call(self, verb: Any, *args: Any) -> Any:
        try:
            return verb(self.worker_store, *args)
        except DatabaseError as e:
            self._raise_if_not_migrated(e)
            raise

    def _enqueue_runs(
        self,
        enqueued: list[TaskResult],
        spec: ScheduleSpec,
        due: Sequence[datetime],
        now: datetime,
    ) -> list[str | None]:
        """Insert the jobs of these runs (inside the firing's transaction); their result ids.

        A run whose job cannot be made (its task is gone, its arguments no longer fit) is
        logged and skipped: None. The results of new jobs are added to ``enqueued``.
        """
        at = clock.stored(now)  # as Django keeps datetimes: naive with USE_TZ off
        made: list[tuple[Task, Job] | None] = []
        period: float | None = None
        for slot in due:
            try:
                task, call = self.scheduled_call(spec, slot, at)
                unique = self.uniqueness(task, call)
                row = self._new_row(task, call, at, self.job_options(task), unique)
                period = unique.period if unique is not None else period
            except UNRUNNABLE as e:
                unrunnable(spec, slot, e)
                made.append(None)
                continue
            made.append((task, row))
        rows = [pair[1] for pair in made if pair is not None]
        stored = iter(self._insert_runs(rows, period) if rows else [])
        ids: list[str | None] = []
        for pair in made:
            if pair is None:
                ids.append(None)
                continue
            task, row = pair
            kept = next(stored)
            ids.append(str(kept.uuid))
            if kept.uuid == row.uuid:
                record = store.to_record(kept)
                enqueued.append(self.to_task_result(record, task, State.READY.django_status))
        return ids

    def _insert_runs(self, rows: list[Job], period: float | None) -> list[Job]:
        """Store the jobs of one schedule's runs in one statement (per 500)."""
        notify = (self.channel, rows[0].queue_name) if self.vendor == "postgresql" else None
        stored = transitions.insert(self.worker_store, rows, notify, period)
        self._poke_own()  # a run started from a task, on the worker's own connection
        return stored


def unrunnable(spec: ScheduleSpec, due: datetime, error: Exception) -> None:
    """Log, at most every ``QUIET`` seconds per schedule, that a run was skipped."""
    if _quiet(f"run:{spec.name}"):
        return
    logger.error(
        "Schedule %r: its run due %s cannot be enqueued (task %s): %s. The run is skipped "
        "(repeats of this are logged every %d minutes).",
        spec.name,
        due.isoformat(),
        spec.task_path,
        str(error).rstrip("."),
        QUIET // 60,
    )


def unfired(key: int, error: Exception) -> None:
    if _quiet(f"fire:{key}"):
        return
    logger.error(
        "Could not fire schedule #%d (%s: %s); the others go on, and it is tried again.",
        key,
        type(error).__name__,
        error,
        exc_info=error,
    )


def _quiet(what: str) -> bool:
    """Say whether ``what`` was logged less than ``QUIET`` seconds ago (else note it now)."""
    now = time.monotonic()
    if now - _LOGGED.get(what, -QUIET) < QUIET:
        return True
    _LOGGED[what] = now
    return False
