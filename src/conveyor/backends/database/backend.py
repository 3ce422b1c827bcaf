"""The database backend: SQLite (the embedded default), PostgreSQL and MySQL/MariaDB."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from django.core import checks
from django.db import DatabaseError, DataError, IntegrityError, connections
from django.tasks import Task, TaskResult
from django.tasks.exceptions import TaskResultDoesNotExist
from django.tasks.signals import task_enqueued

from conveyor import clock
from conveyor.backends.base import Call, Held
from conveyor.backends.database import operations, store, transitions
from conveyor.backends.database.controls import DatabaseControls
from conveyor.backends.database.dialects import SUPPORTED_VENDORS, dialect_for
from conveyor.backends.database.housekeeping import DatabaseHousekeeping
from conveyor.backends.database.models import Job
from conveyor.backends.database.processes import DatabaseProcesses
from conveyor.backends.database.scheduled import DatabaseSchedules
from conveyor.backends.tasks import due_later
from conveyor.conf import BackendOptions
from conveyor.exceptions import NotMigrated
from conveyor.options import Uniqueness
from conveyor.records import Job as JobRecord
from conveyor.records import Outcome, PutBack, QueueSelector, State, Success

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class DatabaseOptions(BackendOptions):
    """``DATABASE``: the alias in ``DATABASES`` that holds the jobs."""

    database: str = "default"


class DatabaseBackend(DatabaseControls, DatabaseHousekeeping, DatabaseProcesses, DatabaseSchedules):
    """Store jobs in a Django database; workers claim them with row locks and leases."""

    options_class: ClassVar[type[BackendOptions]] = DatabaseOptions
    supports_defer = True  # run_after is honoured.
    supports_async_task = True  # async def tasks run on an event loop in the worker.
    supports_get_result = True  # any process can read a result back.
    supports_priority = True  # higher priority is claimed first.

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        options = self.conveyor_options
        assert isinstance(options, DatabaseOptions)
        self.database: str = options.database
        self.store = store.Store(
            backend=alias,
            using=self.database,
            lease=options.lease,
            max_attempts=options.max_attempts,
        )
        # The worker's own bookkeeping (claims, outcomes, leases); after a fork it gets a
        # connection of its own, which task code never touches (see ``after_fork``).
        self.worker_store = self.store

    @property
    def vendor(self) -> str:
        return connections[self.database].vendor

    @property
    def channel(self) -> str:
        """The LISTEN/NOTIFY channel of this backend."""
        return f"conveyor_{self.alias}"[:63]

    # --- the django.tasks face ----------------------------------------------------------

    def bulk_enqueue(self, task: Task, calls: Iterable[Call]) -> list[TaskResult]:
        """Store many calls of one task in one statement per 500: all of them, or none.

        Inside ``atomic()`` they exist only if that commits. A call of a unique task whose
        key a stored job holds adds nothing and gets that job's result.
        """
        encoded = [self.encode_call(task, args, kwargs) for args, kwargs in calls]
        unique = [self.uniqueness(task, call) for call in encoded]
        now, options = clock.now(), self.job_options(task)
        if len(encoded) == 1 and unique[0] is None:
            return [self._enqueue_one(task, encoded[0], now, options)]
        rows = [
            self._new_row(task, call, now, options, how)
            for call, how in zip(encoded, unique, strict=True)
        ]
        notify = (self.channel, task.queue_name) if self.vendor == "postgresql" else None
        period = next((how.period for how in unique if how is not None), None)
        try:
            stored = transitions.insert(self.store, rows, notify, period)
        except DatabaseError as e:
            self._raise_if_not_migrated(e)
            raise
        results = [
            self.to_task_result(store.to_record(row), task, State.READY.django_status)
            if row.uuid == new.uuid
            else self.row_to_result(row)
            for row, new in zip(stored, rows, strict=True)
        ]
        for result, row, new in zip(results, stored, rows, strict=True):
            if row.uuid == new.uuid:
                task_enqueued.send(type(self), task_result=result)
        return results

    def _enqueue_one(
        self, task: Task, call: Call, now: datetime, options: dict[str, Any]
    ) -> TaskResult:
        """Store one call that is not unique: ``enqueue()``'s path, with no model instance.

        Its result is made before the row is stored, not after: the commit wakes idle
        workers, which take the CPUs from the caller, who would then wait to finish.
        """
        values = self._new_values(task, call, now, options, None)
        record = store.record_of(store.new_row_values(values))
        result = self.to_task_result(record, task, State.READY.django_status)
        notify = (self.channel, task.queue_name) if self.vendor == "postgresql" else None
        try:
            transitions.insert_one(self.store, values, notify)
        except DatabaseError as e:
            self._raise_if_not_migrated(e)
            raise
        task_enqueued.send(type(self), task_result=result)
        return result

    def _new_row(
        self,
        task: Task,
        call: Call,
        now: datetime,
        options: dict[str, Any],
        unique: Uniqueness | None,
    ) -> Job:
        return new_job(self._new_values(task, call, now, options, unique))

    def _new_values(
        self,
        task: Task,
        call: Call,
        now: datetime,
        options: dict[str, Any],
        unique: Uniqueness | None,
    ) -> dict[str, Any]:
        """The columns of a new job that are not left at their defaults."""
        due = due_later(task, now)
        if unique is not None:
            options = {**options, "unique": unique.stored()}
        return {
            "uuid": uuid.uuid4(),
            "backend_name": self.alias,
            "queue_name": task.queue_name,
            "task_path": task.module_path,
            "priority": task.priority,
            "state": State.SCHEDULED if due else State.READY,
            "args": call[0],
            "kwargs": call[1],
            "enqueued_at": now,
            "run_after": task.run_after,
            "available_at": due or now,
            "options": options,
            "unique_slot": unique.key if unique else None,
            "unique_states": unique.states if unique else "",
        }

    def _raise_if_not_migrated(self, error: DatabaseError) -> None:
        if dialect_for(connections[self.database]).missing_table(error):
            raise NotMigrated(
                f"Conveyor's tables do not exist in database {self.database!r} (backend "
                f"{self.alias!r}): run `python manage.py migrate`. Nothing was stored."
            ) from error

    def get_result(self, result_id: str) -> TaskResult:
        """Read a result back by id, from any process."""
        try:
            row = operations.find(self.store, uuid.UUID(str(result_id)))
        except ValueError as e:
            raise TaskResultDoesNotExist(result_id) from e
        except DatabaseError as e:
            self._raise_if_not_migrated(e)
            raise
        if row is None:
            raise TaskResultDoesNotExist(result_id)
        return self.values_to_result(row)

    def row_to_result(self, row: Job) -> TaskResult:
        """The ``TaskResult`` a stored job stands for, even if its task is gone."""
        return self.values_to_result(store.fields_of(row))

    def values_to_result(self, values: Mapping[str, Any]) -> TaskResult:
        """``row_to_result`` for a row read as its values by column name."""
        status = State(values["state"]).django_status
        record = store.record_of(values)
        return self.stored_result(record, status, values["finished_at"], values["return_value"])

    # --- the worker store ---------------------------------------------------------------

    def claim(self, worker_id: str, queues: QueueSelector, limit: int) -> list[JobRecord]:
        return transitions.claim(self.worker_store, worker_id, queues.narrowed(self.queues), limit)

    def stage(self, limit: int = 1000) -> int:
        return self._notify(transitions.stage(self.worker_store, limit))

    def next_due(self, queues: QueueSelector) -> datetime | None:
        return transitions.next_due(self.worker_store)

    def complete(self, successes: Sequence[Success]) -> set[str]:
        return transitions.complete(self.worker_store, successes)

    def fail(self, job: JobRecord, outcome: Outcome) -> bool:
        return transitions.fail(self.worker_store, job, outcome)

    def retry(self, job: JobRecord, outcome: Outcome) -> bool:
        return self._notify(transitions.retry(self.worker_store, job, outcome), [job])

    def unclaim(self, jobs: Sequence[JobRecord]) -> int:
        return self._notify(transitions.unclaim(self.worker_store, jobs), jobs)

    def requeue(self, job: JobRecord, reason: str, *, counts_as_attempt: bool = True) -> bool:
        put_back = transitions.requeue(self.worker_store, job, reason, counts_as_attempt)
        woken = [job] if put_back is not None and not put_back.failed else []
        return self._notify(put_back is not None, woken)

    def release(
        self,
        worker_id: str,
        reason: str,
        *,
        executing: Collection[tuple[int, str]] = (),
        counts_as_attempt: bool = True,
        finished: Mapping[tuple[int, str], Outcome] | None = None,
    ) -> list[PutBack]:
        put_back = transitions.release(
            self.worker_store, worker_id, reason, executing, counts_as_attempt, finished or {}
        )
        self._notify(put_back, [p.job for p in put_back if not p.failed])  # retries too
        return put_back

    def give_back(self, worker_id: str, deliveries: Collection[tuple[int, str]]) -> list[JobRecord]:
        jobs = transitions.give_back(self.worker_store, worker_id, deliveries)
        return self._notify(jobs, jobs)

    def reclaim(self, worker_ids: Sequence[str]) -> list[JobRecord]:
        jobs = transitions.reclaim(self.worker_store, worker_ids)
        return self._notify(jobs, jobs)

    def heartbeat(self, worker_ids: Sequence[str], deliveries: Sequence[Held] = ()) -> int:
        return transitions.heartbeat(self.worker_store, worker_ids, deliveries)

    def refuses(self, error: Exception) -> bool:
        # A value the column or JSON type cannot hold, or a broken constraint; a lost
        # connection, lock timeout or deadlock is an OperationalError and passes.
        return isinstance(error, DataError | IntegrityError) or super().refuses(error)

    def reachable(self) -> bool:
        return operations.reachable(self.worker_store)

    def recover(self) -> int:
        return self._notify(transitions.recover(self.worker_store))

    # --- configuration ----------------------------------------------------------------

    def check(self, **kwargs: Any) -> list[checks.CheckMessage]:
        from django.conf import settings

        errors: list[checks.CheckMessage] = []
        if self.database not in settings.DATABASES:
            errors.append(
                checks.Error(
                    f"TASKS[{self.alias!r}] stores jobs in database {self.database!r}, which is "
                    "not in DATABASES.",
                    hint="Set OPTIONS['DATABASE'] to a DATABASES alias.",
                    id="conveyor.E001",
                )
            )
        elif self.vendor not in SUPPORTED_VENDORS:
            errors.append(
                checks.Error(
                    f"TASKS[{self.alias!r}] uses a {self.vendor} database; Conveyor supports "
                    f"{', '.join(SUPPORTED_VENDORS)}.",
                    id="conveyor.E002",
                )
            )
        if "conveyor" not in settings.INSTALLED_APPS:
            errors.append(
                checks.Error(
                    f"TASKS[{self.alias!r}] uses Conveyor's DatabaseBackend, but 'conveyor' is "
                    "not in INSTALLED_APPS.",
                    hint="Add 'conveyor' to INSTALLED_APPS.",
                    id="conveyor.E003",
                )
            )
        return errors


def new_job(values: dict[str, Any]) -> Job:
    """An unsaved ``Job`` with ``values``, every other column at its default.

    Built from positional values, Django's quick way to make a model instance (an
    enqueue makes one per call).
    """
    columns: Any = [
        values[field.attname] if field.attname in values else field.get_default()
        for field in Job._meta.concrete_fields
    ]
    return Job(*columns)
