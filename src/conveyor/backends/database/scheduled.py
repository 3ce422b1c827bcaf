"""The database backend's schedule verbs: each a transition of ``transitions.schedules``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.db import DatabaseError
from django.tasks import Task
from django.tasks.exceptions import InvalidTask
from django.tasks.signals import task_enqueued

from conveyor.backends.base import StoreBackend
from conveyor.backends.database import transitions
from conveyor.backends.database.transitions import schedules
from conveyor.exceptions import TaskNotFound
from conveyor.records import Fired, ScheduleInfo, ScheduleSpec, SyncReport

if TYPE_CHECKING:
    from conveyor.backends.database.models import Job
    from conveyor.backends.database.store import Store
    from conveyor.options import Uniqueness

logger = logging.getLogger(__name__)
# What may keep one run of a schedule from being enqueued: it is skipped and logged.
UNRUNNABLE = (TaskNotFound, InvalidTask, TypeError, ValueError)


class DatabaseSchedules(StoreBackend):
    """Schedules kept in the backend's database, fired from every worker's supervisor."""

    if TYPE_CHECKING:  # what ``DatabaseBackend`` has
        worker_store: Store

        @property
        def channel(self) -> str: ...

        @property
        def vendor(self) -> str: ...

        def _raise_if_not_migrated(self, error: DatabaseError) -> None: ...

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

    def change_schedule(self, spec: ScheduleSpec) -> ScheduleInfo:
        return self._schedules_call(schedules.change, spec)

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
        fired: list[Fired] = []
        for key in schedules.due(self.worker_store, limit):
            fired += schedules.fire(self.worker_store, key, self._enqueue_runs)
        self._announce_runs(fired)
        return fired

    def run_schedule(self, name: str) -> Fired:
        fired = self._schedules_call(schedules.run_now, name, self._enqueue_runs)
        self._announce_runs([fired])
        return fired

    def _schedules_call(self, verb: Any, *args: Any) -> Any:
        try:
            return verb(self.worker_store, *args)
        except DatabaseError as e:
            self._raise_if_not_migrated(e)
            raise

    def _enqueue_runs(
        self, spec: ScheduleSpec, due: Sequence[datetime], now: datetime
    ) -> list[str | None]:
        """Insert the job of each run (inside the firing's transaction); its result id."""
        ids: list[str | None] = []
        for slot in due:
            try:
                task, call = self.scheduled_call(spec, slot, now)
            except UNRUNNABLE as e:
                logger.error(
                    "Schedule %r: its run due %s cannot be enqueued (task %s): %s. The run "
                    "is skipped.",
                    spec.name,
                    slot.isoformat(),
                    spec.task_path,
                    e,
                )
                ids.append(None)
                continue
            ids.append(self._insert_run(task, call, now))
        return ids

    def _insert_run(self, task: Task, call: Any, now: datetime) -> str:
        unique = self.uniqueness(task, call)
        row = self._new_row(task, call, now, self.job_options(task), unique)
        notify = (self.channel, task.queue_name) if self.vendor == "postgresql" else None
        period = unique.period if unique is not None else None
        (stored,) = transitions.insert(self.worker_store, [row], notify, period)
        return str(stored.uuid)

    def _announce_runs(self, fired: Sequence[Fired]) -> None:
        """Send ``task_enqueued`` for the jobs the runs enqueued, once they are committed."""
        for run in fired:
            if run.result_id is None:
                continue
            try:
                result = self.get_result(run.result_id)
            except Exception:  # pruned already, or the store went away: nothing to tell
                continue
            task_enqueued.send(type(self), task_result=result)
            logger.info(
                "Schedule %r fired its run due %s: job %s (%s).",
                run.schedule,
                run.due_at.isoformat(),
                run.result_id,
                run.task_path,
            )
