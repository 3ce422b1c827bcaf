"""The ORM backend: SQLite (the embedded default), PostgreSQL and MySQL/MariaDB."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from django.core import checks
from django.db import connections
from django.tasks import Task, TaskResult, TaskResultStatus
from django.tasks.base import TaskError
from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist
from django.tasks.signals import task_enqueued
from django.utils import timezone

from conveyor.backends.base import (
    Call,
    ConveyorBackend,
    Success,
    Waiter,
    resolve_task,
    unavailable_task,
)
from conveyor.conf import BackendOptions
from conveyor.exceptions import TaskNotFound
from conveyor.models import Job, JobQuerySet
from conveyor.records import Job as JobRecord
from conveyor.records import QueueSelector, QueueStats

logger = logging.getLogger(__name__)

SUPPORTED_VENDORS = ("sqlite", "postgresql", "mysql")


@dataclass(frozen=True, slots=True, kw_only=True)
class DatabaseOptions(BackendOptions):
    """``DATABASE``: the alias in ``DATABASES`` that holds the jobs."""

    database: str = "default"


class DatabaseBackend(ConveyorBackend):
    """Store jobs in a Django database; workers claim them with row locks and leases."""

    options_class: ClassVar[type[BackendOptions]] = DatabaseOptions
    supports_defer = True  # run_after is honoured.
    supports_async_task = True  # async def tasks run on an event loop in the worker.
    supports_get_result = True  # any process can read a result back.
    supports_priority = True  # higher priority is claimed first.

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        self.database: str = self.conveyor_options.database  # type: ignore[attr-defined]

    @property
    def vendor(self) -> str:
        return connections[self.database].vendor

    @property
    def supports_wakeup(self) -> bool:  # type: ignore[override]
        return self.vendor == "postgresql" or self._sqlite_file() is not None

    def _sqlite_file(self) -> str | None:
        conn = connections[self.database]
        if conn.vendor != "sqlite" or conn.is_in_memory_db():  # type: ignore[attr-defined]
            return None
        return str(conn.settings_dict["NAME"])

    def jobs(self) -> JobQuerySet:
        """This backend's jobs."""
        return Job.objects.using(self.database).for_backend(self.alias)

    # --- enqueue ---------------------------------------------------------------------

    def enqueue(self, task: Task, args: Sequence[Any], kwargs: dict[str, Any]) -> TaskResult:
        """Store one call of ``task``; inside ``atomic()`` it exists only if that commits."""
        return self.bulk_enqueue(task, [(args, kwargs)])[0]

    def bulk_enqueue(self, task: Task, calls: Iterable[Call]) -> list[TaskResult]:
        """Store many calls of one task in one statement per 500: all of them, or none."""
        encoded = [self.encode_call(task, args, kwargs) for args, kwargs in calls]
        now = timezone.now()
        rows = [self._new_row(task, args, kwargs, now) for args, kwargs in encoded]
        notify = self.channel if self.vendor == "postgresql" else None
        Job.objects.using(self.database).insert(rows, notify, task.queue_name)
        results = [
            self.to_task_result(row.to_record(), task, TaskResultStatus.READY) for row in rows
        ]
        for result in results:
            task_enqueued.send(type(self), task_result=result)
        return results

    def _new_row(self, task: Task, args: Any, kwargs: Any, now: datetime) -> Job:
        return Job(
            uuid=uuid.uuid4(),
            backend_name=self.alias,
            queue_name=task.queue_name,
            task_path=task.module_path,
            priority=task.priority,
            args=args,
            kwargs=kwargs,
            enqueued_at=now,
            run_after=task.run_after,
            available_at=task.run_after or now,
        )

    def _notify(self, count: int) -> int:
        """Wake idle workers after jobs were made ready again; return ``count``."""
        if count and self.vendor == "postgresql":
            with connections[self.database].cursor() as cursor:
                cursor.execute("SELECT pg_notify(%s, %s)", [self.channel, ""])
        return count

    @property
    def channel(self) -> str:
        """The LISTEN/NOTIFY channel of this backend."""
        return f"conveyor_{self.alias}"[:63]

    # --- results ---------------------------------------------------------------------

    def get_result(self, result_id: str) -> TaskResult:
        """Read a result back by id, from any process."""
        try:
            row = self.jobs().get(uuid=uuid.UUID(str(result_id)))
        except (Job.DoesNotExist, ValueError) as e:
            raise TaskResultDoesNotExist(result_id) from e
        return self.row_to_result(row)

    def row_to_result(self, row: Job) -> TaskResult:
        """The ``TaskResult`` a stored job stands for, even if its task is gone."""
        try:
            task = resolve_task(row.task_path).using(
                priority=row.priority,
                queue_name=row.queue_name,
                run_after=row.run_after,
                backend=self.alias,
            )
        except (TaskNotFound, InvalidTask):
            task = unavailable_task(row.task_path, self.alias, row.queue_name, row.priority)
        return self.to_task_result(
            row.to_record(),
            task,
            TaskResultStatus(row.status),
            finished_at=row.finished_at,
            return_value=row.return_value,
        )

    # --- worker verbs -----------------------------------------------------------------

    def claim(self, worker_id: str, queues: QueueSelector, limit: int) -> list[JobRecord]:
        return (
            self.jobs()
            .for_queues(queues)
            .claim(worker_id, limit, self.conveyor_options.lease, timezone.now())
        )

    def complete_many(self, worker_id: str, successes: Sequence[Success]) -> set[str]:
        by_pk = {self._pk(job): (job, value, finished) for job, value, finished in successes}
        saved = self.jobs().complete_many(
            [(pk, value, finished) for pk, (_, value, finished) in by_pk.items()]
        )
        return {by_pk[pk][0].id for pk in saved}

    def fail(self, job: JobRecord, worker_id: str, error: TaskError, finished_at: datetime) -> bool:
        return self.jobs().fail(self._pk(job), worker_id, error, finished_at)

    def retry(self, job: JobRecord, worker_id: str, error: TaskError, run_after: datetime) -> bool:
        return bool(self._notify(self.jobs().retry(self._pk(job), worker_id, error, run_after)))

    def unclaim(self, job: JobRecord, worker_id: str) -> bool:
        return bool(self._notify(self.jobs().unclaim(self._pk(job), worker_id)))

    def heartbeat(self, worker_ids: Sequence[str]) -> int:
        if not worker_ids:
            return 0
        return self.jobs().heartbeat(worker_ids, self.conveyor_options.lease, timezone.now())

    def release(self, worker_id: str, reason: str, *, counts_as_attempt: bool = True) -> int:
        limit = self.conveyor_options.max_attempts if counts_as_attempt else None
        return self._notify(
            self.jobs().held_by(worker_id).requeue_lost(reason, limit, timezone.now())
        )

    def recover_stale(self) -> int:
        now = timezone.now()
        reason = "its lease expired without a heartbeat (the worker or its machine stopped)"
        return self._notify(
            self.jobs().expired(now).requeue_lost(reason, self.conveyor_options.max_attempts, now)
        )

    def stats(self, queues: QueueSelector | None = None) -> QueueStats:
        return self.jobs().for_queues(queues).stats(timezone.now())

    def prune(self, finished_before: datetime) -> int:
        deleted, _ = self.jobs().finished().filter(finished_at__lt=finished_before).delete()
        return deleted

    def next_due(self, queues: QueueSelector) -> datetime | None:
        return self.jobs().for_queues(queues).next_due()

    def waiter(self, queues: QueueSelector) -> Waiter:
        if self.vendor == "postgresql":
            from conveyor.backends.pgnotify import NotifyWaiter

            return NotifyWaiter(connections[self.database].get_connection_params(), self.channel)
        if (path := self._sqlite_file()) is not None:
            from conveyor.backends.sqlitewake import FileChangeWaiter

            return FileChangeWaiter(path)
        return Waiter()

    def _pk(self, job: JobRecord) -> int:
        # Jobs claimed here carry their row key; others are looked up by public id.
        if job.key is not None:
            return int(job.key)
        return int(self.jobs().values_list("pk", flat=True).get(uuid=uuid.UUID(job.id)))

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
