"""The database backend: SQLite (the embedded default), PostgreSQL and MySQL/MariaDB."""

from __future__ import annotations

import copy
import dataclasses
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
from conveyor.backends.base import Call, Held, Waiter
from conveyor.backends.database import operations, registry, store, transitions
from conveyor.backends.database import queues as queue_admin
from conveyor.backends.database.dialects import SUPPORTED_VENDORS, dialect_for
from conveyor.backends.database.models import Job
from conveyor.backends.database.scheduled import DatabaseSchedules
from conveyor.backends.tasks import due_later
from conveyor.conf import BackendOptions
from conveyor.exceptions import NotMigrated
from conveyor.options import Uniqueness
from conveyor.records import (
    FailedJob,
    Outcome,
    PickupLatency,
    PutBack,
    QueueSelector,
    QueueStats,
    RunningJob,
    State,
    Success,
    Throughput,
    WorkerInfo,
)
from conveyor.records import Job as JobRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class DatabaseOptions(BackendOptions):
    """``DATABASE``: the alias in ``DATABASES`` that holds the jobs."""

    database: str = "default"


@dataclass(frozen=True, slots=True)
class _QueueOnly:
    """Enough of a job for ``_notify``: the queue whose idle workers to wake."""

    queue_name: str


class DatabaseBackend(DatabaseSchedules):
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
    def supports_wakeup(self) -> bool:  # type: ignore[override]
        if self.vendor == "postgresql":  # LISTEN/NOTIFY needs psycopg 3 (conveyor.W004)
            from conveyor.backends.database.waiters import psycopg_installed

            return psycopg_installed()
        return self._sqlite_file() is not None

    def _sqlite_file(self) -> str | None:
        conn = connections[self.database]
        if conn.vendor != "sqlite" or conn.is_in_memory_db():  # type: ignore[attr-defined]
            return None
        return str(conn.settings_dict["NAME"])

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

    def _new_row(
        self,
        task: Task,
        call: Call,
        now: datetime,
        options: dict[str, Any],
        unique: Uniqueness | None,
    ) -> Job:
        due = due_later(task, now)
        if unique is not None:
            options = {**options, "unique": unique.stored()}
        return Job(
            uuid=uuid.uuid4(),
            backend_name=self.alias,
            queue_name=task.queue_name,
            task_path=task.module_path,
            priority=task.priority,
            state=State.SCHEDULED if due else State.READY,
            args=call[0],
            kwargs=call[1],
            enqueued_at=now,
            run_after=task.run_after,
            available_at=due or now,
            options=options,
            unique_slot=unique.key if unique else None,
            unique_states=unique.states if unique else "",
        )

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
        return self.row_to_result(row)

    def row_to_result(self, row: Job) -> TaskResult:
        """The ``TaskResult`` a stored job stands for, even if its task is gone."""
        status = State(row.state).django_status
        return self.stored_result(store.to_record(row), status, row.finished_at, row.return_value)

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

    def register_worker(self, info: WorkerInfo) -> None:
        try:
            registry.register_worker(self.worker_store, info)
        except DatabaseError as e:
            self._raise_if_not_migrated(e)
            raise

    def end_worker(self, worker_id: str, ended: str) -> None:
        registry.end_worker(self.worker_store, worker_id, ended)

    def workers(self, *, alive: bool = True) -> list[WorkerInfo]:
        return registry.workers(self.worker_store, alive)

    def cancel(self, result_id: str) -> bool:
        return transitions.cancel(self.worker_store, self._key(result_id))

    def request_cancel(self, result_id: str) -> bool:
        return transitions.request_cancel(self.worker_store, self._key(result_id))

    def run_now(self, result_ids: Collection[str]) -> int:
        field, conn = Job._meta.get_field("uuid"), connections[self.worker_store.using]
        keys = []
        for result_id in result_ids:
            try:
                keys.append(field.get_db_prep_value(uuid.UUID(str(result_id)), conn))
            except ValueError:
                continue  # not a result id: no job has it
        return self._notify(transitions.run_now(self.worker_store, keys) if keys else 0)

    def cancels(self, deliveries: Collection[tuple[int, str]]) -> set[tuple[int, str]]:
        return transitions.cancels(self.worker_store, list(deliveries))

    def report_progress(self, job: JobRecord, progress: dict[str, Any]) -> bool:
        return transitions.report_progress(self.worker_store, job, progress)

    def get_progress(self, result_id: str) -> dict[str, Any] | None:
        found = self._values(result_id, "progress")
        return dict(found) if found else None

    def _key(self, result_id: str) -> int:
        return int(self._values(result_id, "pk"))

    def _values(self, result_id: str, field: str) -> Any:
        try:
            return (
                Job.objects.using(self.database)
                .filter(backend_name=self.alias, uuid=uuid.UUID(str(result_id)))
                .values_list(field, flat=True)
                .get()
            )
        except (Job.DoesNotExist, ValueError) as e:
            raise TaskResultDoesNotExist(result_id) from e

    def pause_queue(
        self, queue: str, until: datetime | None = None, *, seconds: float | None = None
    ) -> datetime | None:
        return queue_admin.pause(self.worker_store, queue, until, seconds)

    def resume_queue(self, queue: str) -> bool:
        resumed = queue_admin.resume(self.worker_store, queue)
        if resumed and self.vendor == "postgresql":  # idle workers look again at once
            self._notify(1, [_QueueOnly(queue)])  # type: ignore[list-item]
        return resumed

    def paused_queues(self) -> dict[str, datetime | None]:
        return queue_admin.paused(self.worker_store)

    def clear_queue(self, queue: str) -> int:
        return queue_admin.clear(self.worker_store, queue)

    def remove_duplicates(self, queue: str) -> int:
        return queue_admin.remove_duplicates(self.worker_store, queue)

    def stats(
        self, queues: QueueSelector | None = None, *, finished_since: datetime | None = None
    ) -> QueueStats:
        return operations.stats(self.worker_store, queues, finished_since)

    def running(self, queues: QueueSelector | None = None, *, limit: int = 100) -> list[RunningJob]:
        return operations.running(self.worker_store, queues, limit)

    def recent_failures(
        self, since: datetime, queues: QueueSelector | None = None, *, limit: int = 20
    ) -> list[FailedJob]:
        return operations.recent_failures(self.worker_store, since, queues, limit)

    def pickup_latency(
        self, since: datetime, queues: QueueSelector | None = None, *, limit: int = 500
    ) -> PickupLatency:
        return operations.pickup_latency(self.worker_store, since, queues, limit)

    def throughput(
        self, since: datetime, *, step: int = 60, queues: QueueSelector | None = None
    ) -> list[Throughput]:
        return operations.throughput(self.worker_store, since, step, queues)

    def prune(self, finished_before: datetime, *, batch: int = 1000, pause: float = 0.01) -> int:
        return operations.prune(self.worker_store, finished_before, batch, pause)

    def expire(self, *, batch: int = 1000, pause: float = 0.01, limit: int | None = None) -> int:
        return operations.expire(self.worker_store, batch, pause, limit)

    def _notify[T](self, count: T, jobs: Iterable[JobRecord] | None = None) -> T:
        """Wake idle workers after jobs were made ready again; return ``count``.

        The payload names the queue, so only workers serving it wake; without ``jobs``
        (queues unknown) it is empty, and every idle worker wakes.
        """
        if not count or self.vendor != "postgresql":
            return count
        names = sorted({job.queue_name for job in jobs}) if jobs is not None else [""]
        if names:
            calls = ", ".join(["pg_notify(%s, %s)"] * len(names))
            with connections[self.worker_store.using].cursor() as cursor:
                cursor.execute(
                    f"SELECT {calls}", [p for name in names for p in (self.channel, name)]
                )
        return count

    def await_job(self, result_id: str) -> None:
        if self.vendor == "postgresql":
            Job.objects.using(self.database).filter(
                backend_name=self.alias, uuid=uuid.UUID(str(result_id)), awaited=False
            ).update(awaited=True)

    def result_waiter(self) -> Waiter:
        if self.vendor == "postgresql":
            from conveyor.backends.database import waiters

            if waiters.psycopg_installed():
                params = connections[self.database].get_connection_params()
                channel = transitions.done_channel(self.store)
                return waiters.NotifyWaiter(params, channel)
            return Waiter()
        if (path := self._sqlite_file()) is not None:
            from conveyor.backends.database.waiters import FileChangeWaiter

            return FileChangeWaiter(path)
        return Waiter()

    def waiter(self, queues: QueueSelector) -> Waiter:
        if self.vendor == "postgresql":
            from conveyor.backends.database import waiters

            if not waiters.psycopg_installed():
                return waiters.polling_waiter(self.alias, self.database)
            return waiters.NotifyWaiter(
                connections[self.database].get_connection_params(),
                self.channel,
                queues,
                retry_every=self.conveyor_options.poll_interval,
            )
        if (path := self._sqlite_file()) is not None:
            from conveyor.backends.database.waiters import FileChangeWaiter

            return FileChangeWaiter(path)
        return Waiter()

    def before_fork(self) -> None:
        """A forked child must not share the parent's database sockets, pooled ones included."""
        for conn in connections.all(initialized_only=True):
            conn.close()
            if conn.settings_dict.get("OPTIONS", {}).get("pool") and hasattr(conn, "close_pool"):
                conn.close_pool()

    def after_fork(self) -> None:
        """Keep the worker's bookkeeping on a private connection in a worker process.

        Task code shares the thread's connection to ``DATABASE``: a raw ``BEGIN``, a
        ``SET search_path`` or ``SET ROLE`` there must not reach claims and saves. Jobs
        that tasks enqueue still use that connection, so they join the task's transaction.
        """
        private = f"conveyor_worker_{self.database}"
        if private not in connections.settings:
            connections.settings[private] = copy.deepcopy(connections.settings[self.database])
        self.worker_store = dataclasses.replace(self.store, using=private)

    def close(self) -> None:
        """Close the worker's private connection; one it shares with its caller stays open."""
        if self.worker_store is not self.store:
            connections[self.worker_store.using].close()

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
