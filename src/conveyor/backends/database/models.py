"""The database backend's tables: fields and indexes only (the state changes are elsewhere)."""

from __future__ import annotations

import uuid
from typing import Any

from django.db import models
from django.db.models import Q
from django.utils.timezone import now as time_now
from django.utils.translation import gettext_lazy as _

from conveyor.records import State


class StateIndex(models.Index):
    """An index of the rows in some states only.

    A partial index (``WHERE state IN (...)``) where the engine has them, so that claims,
    staging and pruning each read an index holding just their rows; elsewhere (MySQL,
    MariaDB) a full index led by ``state``, which keeps each state's rows together.
    """

    def __init__(self, *, states: tuple[str, ...], **kwargs: Any) -> None:
        self.states = tuple(str(state) for state in states)
        super().__init__(**kwargs)

    def create_sql(self, model: Any, schema_editor: Any, using: str = "", **kwargs: Any) -> Any:
        if schema_editor.connection.features.supports_partial_indexes:
            index = models.Index(
                fields=self.fields, name=self.name, condition=Q(state__in=self.states)
            )
        else:
            fields = ["state", *(f for f in self.fields if f != "state")]
            index = models.Index(fields=fields, name=self.name)
        return index.create_sql(model, schema_editor, using=using, **kwargs)

    def deconstruct(self) -> Any:
        path, args, kwargs = super().deconstruct()
        return path, args, {**kwargs, "states": self.states}

    def clone(self) -> StateIndex:
        _, args, kwargs = self.deconstruct()
        return self.__class__(*args, **kwargs)

    def __eq__(self, other: object) -> bool:
        return super().__eq__(other) and getattr(other, "states", None) == self.states

    __hash__ = models.Index.__hash__


class Job(models.Model):
    """One enqueued call of a task, and everything that happened to it."""

    id = models.BigAutoField(primary_key=True)
    uuid = models.UUIDField(_("result id"), unique=True, default=uuid.uuid4, editable=False)
    backend_name = models.CharField(_("backend"), max_length=100)
    queue_name = models.CharField(_("queue"), max_length=100)
    task_path = models.CharField(_("task"), max_length=255)
    priority = models.SmallIntegerField(_("priority"), default=0)
    state = models.CharField(
        _("state"),
        max_length=10,
        choices=[(s.value, s.name.title()) for s in State],
        default="ready",
    )
    args = models.JSONField(_("positional arguments"), default=list)
    kwargs = models.JSONField(_("keyword arguments"), default=dict)
    return_value = models.JSONField(_("return value"), null=True, default=None)
    errors = models.JSONField(_("errors"), default=list)
    worker_ids = models.JSONField(_("worker ids"), default=list)
    # The policies the job was enqueued with (retries, ...); empty when all are defaults.
    # NULL allowed: code from before this column (a rolling deploy) inserts without it.
    options = models.JSONField(_("options"), null=True, default=dict)
    # Asked to stop while running (``conveyor.cancel``); its worker stops it.
    cancel_requested = models.BooleanField(_("cancel requested"), default=False, db_default=False)
    # Someone waits for this job's end (``conveyor.wait``): saving it notifies them.
    awaited = models.BooleanField(_("awaited"), default=False, db_default=False)
    # What the task last reported (``context.progress``): {"done", "total", "message"}.
    progress = models.JSONField(_("progress"), null=True, default=None)
    # Deliveries (claims that were not given back), and those lost to a dying worker.
    attempts = models.PositiveIntegerField(_("attempts"), default=0)
    lost = models.PositiveIntegerField(_("deliveries lost"), default=0)
    enqueued_at = models.DateTimeField(_("enqueued at"))
    run_after = models.DateTimeField(_("run after"), null=True, blank=True)
    # Scheduled jobs: when they fall due. Ready jobs: their place in line, kept on put-back.
    available_at = models.DateTimeField(_("available at"))
    started_at = models.DateTimeField(_("started at"), null=True, blank=True)
    last_attempted_at = models.DateTimeField(_("last attempted at"), null=True, blank=True)
    finished_at = models.DateTimeField(_("finished at"), null=True, blank=True)
    # When a finished job may be deleted (its retention, set as it finishes); NULL: kept.
    expires_at = models.DateTimeField(_("expires at"), null=True, blank=True)
    # The current delivery: the process holding it, until when (store clock), and its
    # token. The token stays after the delivery ends, naming the one that wrote the outcome.
    lease_owner = models.CharField(_("held by"), max_length=100, null=True, blank=True)  # noqa: DJ001
    lease_expires_at = models.DateTimeField(_("lease expires at"), null=True, blank=True)
    delivery = models.CharField(_("delivery token"), max_length=32, blank=True, default="")
    # Unique jobs: the job's key while it keeps others with the same key out, else NULL
    # (NULLs never collide, on any engine); ``unique_states`` says in which states it does.
    unique_slot = models.CharField(  # noqa: DJ001
        _("unique key held"), max_length=64, null=True, blank=True, default=None
    )
    unique_states = models.CharField(
        _("unique while"), max_length=10, blank=True, default="", db_default=""
    )

    class Meta:
        verbose_name = _("job")
        verbose_name_plural = _("jobs")
        indexes = [
            StateIndex(
                fields=["backend_name", "-priority", "available_at", "id"],
                name="conveyor_job_ready_idx",
                states=(State.READY,),
            ),
            StateIndex(
                fields=["backend_name", "queue_name", "-priority", "available_at", "id"],
                name="conveyor_job_ready_queue_idx",
                states=(State.READY,),
            ),
            StateIndex(
                fields=["backend_name", "available_at", "queue_name"],
                name="conveyor_job_scheduled_idx",
                states=(State.SCHEDULED,),
            ),
            StateIndex(
                fields=["lease_owner", "lease_expires_at"],
                name="conveyor_job_running_idx",
                states=(State.RUNNING,),
            ),
            StateIndex(
                fields=["backend_name", "finished_at", "state", "queue_name"],
                name="conveyor_job_finished_idx",
                states=(State.SUCCEEDED, State.FAILED, State.CANCELLED),
            ),
            # Retention: the jobs whose time is up, and each task's successes newest first.
            StateIndex(
                fields=["backend_name", "expires_at"],
                name="conveyor_job_expiry_idx",
                states=(State.SUCCEEDED, State.FAILED, State.CANCELLED),
            ),
            StateIndex(
                fields=["backend_name", "task_path", "finished_at", "id"],
                name="conveyor_job_succeeded_idx",
                states=(State.SUCCEEDED,),
            ),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(priority__gte=-100, priority__lte=100),
                name="conveyor_job_priority_range",
            ),
            # A constraint, not ``unique=True``: no pattern index on PostgreSQL, a fixed name.
            models.UniqueConstraint(fields=["unique_slot"], name="conveyor_job_unique_slot"),
        ]

    def __str__(self) -> str:
        return f"{self.task_path} [{self.state}] {self.uuid}"


class Worker(models.Model):
    """One running (or stopped) supervisor or worker process: the workers registry."""

    id = models.CharField(_("worker id"), max_length=100, primary_key=True)
    backend_name = models.CharField(_("backend"), max_length=100)
    kind = models.CharField(_("kind"), max_length=20)
    supervisor = models.CharField(_("supervisor"), max_length=100, blank=True, default="")
    host = models.CharField(_("host"), max_length=255)
    pid = models.PositiveIntegerField(_("process id"))
    queues = models.TextField(_("queues"), default="*")
    threads = models.PositiveSmallIntegerField(_("threads"), default=1)
    started_at = models.DateTimeField(_("started at"))
    # Written with the store's clock, like leases.
    last_beat_at = models.DateTimeField(_("last heartbeat"))
    stopped_at = models.DateTimeField(_("stopped at"), null=True, blank=True)
    ended = models.TextField(_("how it ended"), blank=True, default="")

    class Meta:
        verbose_name = _("worker")
        verbose_name_plural = _("workers")
        indexes = [
            models.Index(fields=["backend_name", "last_beat_at"], name="conveyor_worker_beat_idx")
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.id}"


class Schedule(models.Model):
    """A task run on a timetable: declared in code (kept in sync) or made at run time."""

    id = models.BigAutoField(primary_key=True)
    backend_name = models.CharField(_("backend"), max_length=100)
    name = models.CharField(_("name"), max_length=200)
    task_path = models.CharField(_("task"), max_length=255)
    args = models.JSONField(_("positional arguments"), default=list)
    kwargs = models.JSONField(_("keyword arguments"), default=dict)
    # Where its jobs go, if not where the task sends them.
    queue_name = models.CharField(_("queue"), max_length=100, blank=True, default="")
    priority = models.SmallIntegerField(_("priority"), null=True, blank=True)
    # The timetable: its kind and what that kind needs (see ``conveyor.cron``).
    kind = models.CharField(_("kind"), max_length=12)
    cron = models.CharField(_("cron expression"), max_length=200, blank=True, default="")
    every = models.DurationField(_("interval"), null=True, blank=True)
    # The first run of fixed-step kinds (each run a whole number of steps from it).
    start_at = models.DateTimeField(_("first run"), null=True, blank=True)
    timezone = models.CharField(_("time zone"), max_length=64)
    catch_up = models.CharField(_("catch-up"), max_length=8, default="once")
    catch_up_limit = models.PositiveIntegerField(_("catch-up limit"), default=100)
    grace = models.FloatField(_("grace (seconds)"), default=60.0)
    due_kwarg = models.CharField(_("due time argument"), max_length=100, blank=True, default="")
    jitter = models.FloatField(_("jitter (seconds)"), default=0.0)
    run_at_creation = models.BooleanField(_("run at creation"), default=False)
    # How many runs it makes in all, and how many are left; NULL: no end.
    repeats = models.PositiveIntegerField(_("repeats"), null=True, blank=True)
    repeats_left = models.PositiveIntegerField(_("runs left"), null=True, blank=True)
    # "code": declared with @schedule and kept in sync at start-up; "database": made at run time.
    source = models.CharField(_("source"), max_length=10, default="database")
    fingerprint = models.CharField(_("definition hash"), max_length=64, blank=True, default="")
    paused = models.BooleanField(_("paused"), default=False)
    # A code schedule no longer declared: kept (with its history) but never run.
    retired_at = models.DateTimeField(_("retired at"), null=True, blank=True)
    # Store clock. NULL next run: it runs only when asked to (or it has ended).
    next_run_at = models.DateTimeField(_("next run"), null=True, blank=True)
    last_run_at = models.DateTimeField(_("last run due"), null=True, blank=True)
    last_result_id = models.UUIDField(_("last job"), null=True, blank=True)
    runs = models.PositiveBigIntegerField(_("runs"), default=0)
    created_at = models.DateTimeField(_("created at"), default=time_now)
    updated_at = models.DateTimeField(_("updated at"), default=time_now)

    class Meta:
        verbose_name = _("schedule")
        verbose_name_plural = _("schedules")
        constraints = [
            models.UniqueConstraint(
                fields=["backend_name", "name"], name="conveyor_schedule_name_unique"
            ),
        ]
        indexes = [
            models.Index(fields=["backend_name", "next_run_at"], name="conveyor_schedule_due_idx")
        ]

    def __str__(self) -> str:
        return self.name


class ScheduleFiring(models.Model):
    """One due time of a schedule that was fired: the key that keeps it from firing twice.

    Kept apart from the job it enqueued, so that deleting the job never frees its slot.
    """

    id = models.BigAutoField(primary_key=True)
    schedule = models.ForeignKey(
        Schedule, on_delete=models.CASCADE, related_name="firings", verbose_name=_("schedule")
    )
    due_at = models.DateTimeField(_("due at"))
    result_id = models.UUIDField(_("job"), null=True, blank=True)
    fired_at = models.DateTimeField(_("fired at"))
    # Asked for (``conveyor schedules run``), not a run of the timetable.
    on_demand = models.BooleanField(_("on demand"), default=False)

    class Meta:
        verbose_name = _("schedule firing")
        verbose_name_plural = _("schedule firings")
        constraints = [
            models.UniqueConstraint(
                fields=["schedule", "due_at", "on_demand"], name="conveyor_firing_unique"
            ),
        ]
        # Which schedule fired a job: the admin looks a job's firing up by its result id.
        indexes = [models.Index(fields=["result_id"], name="conveyor_firing_result_idx")]

    def __str__(self) -> str:
        return f"{self.schedule_id} @ {self.due_at}"


class QueuePause(models.Model):
    """A queue workers take no jobs from, until it is resumed or its pause ends."""

    id = models.BigAutoField(primary_key=True)
    backend_name = models.CharField(_("backend"), max_length=100)
    queue_name = models.CharField(_("queue"), max_length=100)
    # NULL: until resumed. Compared with the store's clock.
    until = models.DateTimeField(_("paused until"), null=True, blank=True)
    paused_at = models.DateTimeField(_("paused at"), default=time_now)

    class Meta:
        verbose_name = _("queue pause")
        verbose_name_plural = _("queue pauses")
        constraints = [
            models.UniqueConstraint(
                fields=["backend_name", "queue_name"], name="conveyor_queue_pause_unique"
            ),
        ]

    def __str__(self) -> str:
        return self.queue_name
