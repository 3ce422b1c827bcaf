"""The database backend's storage: one row a job, and every state change in this module."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, ClassVar

from django.db import connections, models, transaction
from django.db.models import Count, F, Min, Q, Value
from django.db.models.functions import Coalesce
from django.tasks import TaskResultStatus
from django.tasks.base import TaskError
from django.utils.translation import gettext_lazy as _

from conveyor.queries import (
    ClaimChanges,
    JSONAppendText,
    claim_returning_sql,
    complete_from_values_sql,
    insert_sql,
    notify_after_insert_sql,
    per_row,
    write_transaction,
)
from conveyor.records import Job as JobRecord
from conveyor.records import QueueSelector, QueueStats

Status = TaskResultStatus
CLAIM_ORDER = ("-priority", "available_at", "id")
INSERT_CHUNK = 500


class JobQuerySet(models.QuerySet["Job"]):
    """Selections of jobs; the transitions below act on what they select."""

    def for_backend(self, alias: str) -> JobQuerySet:
        return self.filter(backend_name=alias)

    def for_queues(self, queues: QueueSelector | None) -> JobQuerySet:
        qs = self
        if queues is not None and queues.include is not None:
            qs = qs.filter(queue_name__in=sorted(queues.include))
        if queues is not None and queues.exclude:
            qs = qs.exclude(queue_name__in=sorted(queues.exclude))
        return qs

    def ready(self, now: datetime) -> JobQuerySet:
        return self.filter(status=Status.READY, available_at__lte=now)

    def held_by(self, worker_id: str) -> JobQuerySet:
        return self.filter(status=Status.RUNNING, lease_owner=worker_id)

    def expired(self, now: datetime) -> JobQuerySet:
        return self.filter(status=Status.RUNNING, lease_expires_at__lt=now)

    def finished(self) -> JobQuerySet:
        return self.filter(status__in=(Status.SUCCESSFUL, Status.FAILED))

    # --- transitions ---------------------------------------------------------------

    def insert(self, rows: Sequence[Job], notify: str | None, payload: str) -> None:
        """Store new jobs, with NOTIFY on ``notify`` in the same statement (PostgreSQL).

        One statement per 500 rows, with no transaction of its own unless there are more
        (a lone INSERT is atomic): inside the caller's ``atomic()`` the jobs, and the
        wake-up, exist only if it commits.
        """
        chunks = [rows[i : i + INSERT_CHUNK] for i in range(0, len(rows), INSERT_CHUNK)]
        if len(chunks) > 1:
            with transaction.atomic(using=self.db):
                for chunk in chunks:
                    self._insert_chunk(chunk, notify, payload)
        elif chunks:
            self._insert_chunk(chunks[0], notify, payload)

    def _insert_chunk(self, rows: Sequence[Job], notify: str | None, payload: str) -> None:
        sql, params = insert_sql(self.model, rows, self.db)
        if notify is not None:
            sql, params = notify_after_insert_sql(sql, params, notify, payload)
        with connections[self.db].cursor() as cursor:
            cursor.execute(sql, params)

    def claim(self, worker_id: str, limit: int, lease: float, now: datetime) -> list[JobRecord]:
        """Lease up to ``limit`` of the selected ready jobs to ``worker_id``."""
        changes = ClaimChanges(worker_id, now, now + timedelta(seconds=lease))
        if connections[self.db].vendor == "mysql":
            rows = self._claim_locked_ids(limit, changes)
        else:
            rows = self._claim_returning(limit, changes)
        rows.sort(key=lambda row: (-row.priority, row.available_at, row.pk))
        return [row.to_record() for row in rows]

    def _claim_returning(self, limit: int, changes: ClaimChanges) -> list[Job]:
        # One statement picks, locks and updates the rows, and returns them.
        conn = connections[self.db]
        picked = self.ready(changes.now).order_by(*CLAIM_ORDER).values("pk")[:limit]
        # Compiled for this queryset's own database, which need not be the default one.
        pick_sql, pick_params = picked.query.get_compiler(using=self.db).as_sql()
        table = conn.ops.quote_name(self.model._meta.db_table)
        sql, params = claim_returning_sql(conn, table, pick_sql, pick_params, changes)
        return list(self.model.objects.raw(sql, params).using(self.db))

    def _claim_locked_ids(self, limit: int, changes: ClaimChanges) -> list[Job]:
        # MySQL has no UPDATE ... RETURNING and no LIMIT inside IN (...): lock ids first.
        with transaction.atomic(using=self.db):
            ids = list(
                self.ready(changes.now)
                .order_by(*CLAIM_ORDER)
                .select_for_update(skip_locked=True)
                .values_list("pk", flat=True)[:limit]
            )
            if not ids:
                return []
            self.model.objects.using(self.db).filter(pk__in=ids).update(
                status=Status.RUNNING,
                lease_owner=changes.worker_id,
                lease_expires_at=changes.expires,
                attempts=F("attempts") + 1,
                started_at=Coalesce(F("started_at"), Value(changes.now)),
                last_attempted_at=changes.now,
                worker_ids=JSONAppendText(F("worker_ids"), changes.worker_id),
            )
            return list(self.model.objects.using(self.db).filter(pk__in=ids))

    def heartbeat(self, worker_ids: Sequence[str], lease: float, now: datetime) -> int:
        """Extend the lease of every job the given workers hold."""
        return self.filter(status=Status.RUNNING, lease_owner__in=list(worker_ids)).update(
            lease_expires_at=now + timedelta(seconds=lease)
        )

    def complete_many(self, successes: Sequence[tuple[int, Any, datetime]]) -> set[int]:
        """Record successes in one statement; return the keys saved.

        A job that already ended is left as it is; one put back or re-claimed after its
        lease expired still takes a late success, since the work was done.
        """
        if not successes:
            return set()
        if connections[self.db].vendor == "mysql":
            return self._complete_by_case(successes)
        return self._complete_from_values(successes)

    def _complete_from_values(self, successes: Sequence[tuple[int, Any, datetime]]) -> set[int]:
        conn = connections[self.db]
        table = conn.ops.quote_name(self.model._meta.db_table)
        sql, params = complete_from_values_sql(conn, table, successes)
        with conn.cursor() as cursor:
            cursor.execute(sql, params)
            return {row[0] for row in cursor.fetchall()}

    def _complete_by_case(self, successes: Sequence[tuple[int, Any, datetime]]) -> set[int]:
        pks = [pk for pk, _, _ in successes]
        open_jobs = self.filter(pk__in=pks, status__in=(Status.READY, Status.RUNNING))
        updated = open_jobs.update(
            status=Status.SUCCESSFUL,
            return_value=per_row(successes, 1, models.JSONField()),
            finished_at=per_row(successes, 2, models.DateTimeField()),
            lease_owner=None,
            lease_expires_at=None,
        )
        if updated == len(pks):
            return set(pks)
        finished = {pk: at for pk, _, at in successes}
        rows = self.filter(pk__in=pks, status=Status.SUCCESSFUL).values_list("pk", "finished_at")
        return {pk for pk, at in rows if at == finished[pk]}

    def fail(self, pk: int, worker_id: str, error: TaskError, finished_at: datetime) -> bool:
        """Record a final failure if ``worker_id`` still holds the job."""
        return self._end_attempt(
            pk, worker_id, error, status=Status.FAILED, finished_at=finished_at
        )

    def retry(self, pk: int, worker_id: str, error: TaskError, run_after: datetime) -> bool:
        """Record a failed attempt and make the job ready again at ``run_after``."""
        return self._end_attempt(pk, worker_id, error, status=Status.READY, available_at=run_after)

    def unclaim(self, pk: int, worker_id: str) -> bool:
        """Give a claimed, never-started job back, as if it had not been delivered."""
        with write_transaction(self.db):
            row = self.select_for_update().filter(pk=pk).held_by(worker_id).first()
            if row is None:
                return False
            row.give_back()
            return True

    def _end_attempt(self, pk: int, worker_id: str, error: TaskError, **changes: Any) -> bool:
        with write_transaction(self.db):
            row = self.select_for_update().filter(pk=pk).held_by(worker_id).first()
            if row is None:
                return False
            row.end_attempt(error, **changes)
            return True

    def requeue_lost(self, reason: str, max_attempts: int | None, now: datetime) -> int:
        """Put the selected running jobs back, or fail those out of attempts (if limited)."""
        with write_transaction(self.db):
            rows = list(self.filter(status=Status.RUNNING).select_for_update(skip_locked=True))
            for row in rows:
                row.requeue_lost(reason, max_attempts, now)
        return len(rows)

    def next_due(self) -> datetime | None:
        """When the earliest selected ready job may be claimed."""
        return self.filter(status=Status.READY).aggregate(due=Min("available_at"))["due"]

    def stats(self, now: datetime) -> QueueStats:
        """Count the selected jobs by state and queue."""
        counts = self.values("queue_name").annotate(
            ready=Count("pk", filter=Q(status=Status.READY, available_at__lte=now)),
            scheduled=Count("pk", filter=Q(status=Status.READY, available_at__gt=now)),
            running=Count("pk", filter=Q(status=Status.RUNNING)),
            successful=Count("pk", filter=Q(status=Status.SUCCESSFUL)),
            failed=Count("pk", filter=Q(status=Status.FAILED)),
        )
        by_queue = {row.pop("queue_name"): row for row in counts.order_by()}
        totals = {name: sum(q[name] for q in by_queue.values()) for name in STAT_NAMES}
        return QueueStats(**totals, by_queue=by_queue)


STAT_NAMES = ("ready", "scheduled", "running", "successful", "failed")


class Job(models.Model):
    """One enqueued call of a task, and everything that happened to it."""

    id = models.BigAutoField(primary_key=True)
    uuid = models.UUIDField(_("result id"), unique=True, default=uuid.uuid4, editable=False)
    backend_name = models.CharField(_("backend"), max_length=100)
    queue_name = models.CharField(_("queue"), max_length=100)
    task_path = models.CharField(_("task"), max_length=255)
    priority = models.SmallIntegerField(_("priority"), default=0)
    status = models.CharField(
        _("status"), max_length=10, choices=Status.choices, default=Status.READY
    )
    args = models.JSONField(_("positional arguments"), default=list)
    kwargs = models.JSONField(_("keyword arguments"), default=dict)
    return_value = models.JSONField(_("return value"), null=True, default=None)
    errors = models.JSONField(_("errors"), default=list)
    worker_ids = models.JSONField(_("worker ids"), default=list)
    attempts = models.PositiveIntegerField(_("attempts"), default=0)
    enqueued_at = models.DateTimeField(_("enqueued at"))
    run_after = models.DateTimeField(_("run after"), null=True, blank=True)
    # When the job may next be claimed: run_after, the enqueue time, or a retry's due time.
    available_at = models.DateTimeField(_("available at"))
    started_at = models.DateTimeField(_("started at"), null=True, blank=True)
    last_attempted_at = models.DateTimeField(_("last attempted at"), null=True, blank=True)
    finished_at = models.DateTimeField(_("finished at"), null=True, blank=True)
    # NULL while no worker holds the job.
    lease_owner = models.CharField(_("held by"), max_length=100, null=True, blank=True)  # noqa: DJ001
    lease_expires_at = models.DateTimeField(_("lease expires at"), null=True, blank=True)

    objects: ClassVar[JobQuerySet] = JobQuerySet.as_manager()  # type: ignore[assignment]

    class Meta:
        verbose_name = _("job")
        verbose_name_plural = _("jobs")
        # Few indexes, since every enqueue pays for each. Running jobs (heartbeats, leases,
        # release) are few, and found through the status prefix of the claim index.
        indexes = [
            models.Index(
                fields=["status", "backend_name", "-priority", "available_at", "id"],
                name="conveyor_job_claim_idx",
            ),
            models.Index(fields=["status", "finished_at"], name="conveyor_job_finished_idx"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(priority__gte=-100, priority__lte=100),
                name="conveyor_job_priority_range",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.task_path} [{self.status}] {self.uuid}"

    def to_record(self) -> JobRecord:
        """Return the frozen value the runtime works with."""
        return JobRecord(
            id=str(self.uuid),
            task_path=self.task_path,
            backend=self.backend_name,
            queue_name=self.queue_name,
            priority=self.priority,
            args=self.args,
            kwargs=self.kwargs,
            attempt=self.attempts,
            enqueued_at=self.enqueued_at,
            run_after=self.run_after,
            started_at=self.started_at,
            last_attempted_at=self.last_attempted_at,
            worker_ids=tuple(self.worker_ids),
            errors=tuple(TaskError(**error) for error in self.errors),
            key=self.pk,
        )

    def end_attempt(self, error: TaskError, **changes: Any) -> None:
        """Close the current attempt with ``error`` and apply ``changes``; save."""
        self.errors = [
            *self.errors,
            {"exception_class_path": error.exception_class_path, "traceback": error.traceback},
        ]
        self.lease_owner = None
        self.lease_expires_at = None
        for name, value in changes.items():
            setattr(self, name, value)
        self.save(update_fields=["errors", "lease_owner", "lease_expires_at", *changes])

    def give_back(self) -> None:
        """Undo the current delivery of a job that never started; save."""
        self.attempts = max(0, self.attempts - 1)
        self.worker_ids = self.worker_ids[:-1]
        self.status = Status.READY
        self.lease_owner = None
        self.lease_expires_at = None
        if not self.attempts:
            self.started_at = self.last_attempted_at = None
        self.save(
            update_fields=[
                "attempts",
                "worker_ids",
                "status",
                "lease_owner",
                "lease_expires_at",
                "started_at",
                "last_attempted_at",
            ]
        )

    def requeue_lost(self, reason: str, max_attempts: int | None, now: datetime) -> None:
        """The worker running this job is gone: queue it again, or fail it for good."""
        error = TaskError(
            exception_class_path="conveyor.exceptions.WorkerLost",
            traceback=f"conveyor.exceptions.WorkerLost: {reason}\n",
        )
        if max_attempts is not None and self.attempts >= max_attempts:
            error = TaskError(
                exception_class_path=error.exception_class_path,
                traceback=f"conveyor.exceptions.WorkerLost: {reason}; the job was delivered "
                f"{self.attempts} times (the most allowed is {max_attempts}) and is given up.\n",
            )
            self.end_attempt(error, status=Status.FAILED, finished_at=now)
        else:
            self.end_attempt(error, status=Status.READY, available_at=now)
