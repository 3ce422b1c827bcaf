"""Values that cross the seam between backends and the runtime."""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from django.tasks import TaskResultStatus
from django.tasks.base import TaskError

from conveyor.cron import CatchUp, Timetable


class State(StrEnum):
    """Conveyor's own job states; Django sees them through ``django_status``."""

    SCHEDULED = "scheduled"  # due later: never in the claim path until staged
    READY = "ready"  # may be claimed now
    WAITING = "waiting"  # held back until other jobs finish (workflows)
    RUNNING = "running"  # delivered to a worker, under a lease
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"  # shown to Django as FAILED, with a Cancelled error

    @property
    def django_status(self) -> TaskResultStatus:
        """The ``TaskResultStatus`` a ``django.tasks`` user sees for this state."""
        return _DJANGO_STATUS[self]

    @property
    def finished(self) -> bool:
        """Say whether the job has an outcome that nothing overwrites."""
        return self in FINISHED_STATES


PENDING_STATES = (State.SCHEDULED, State.READY, State.WAITING)
FINISHED_STATES = (State.SUCCEEDED, State.FAILED, State.CANCELLED)
_DJANGO_STATUS = {
    State.SCHEDULED: TaskResultStatus.READY,
    State.READY: TaskResultStatus.READY,
    State.WAITING: TaskResultStatus.READY,
    State.RUNNING: TaskResultStatus.RUNNING,
    State.SUCCEEDED: TaskResultStatus.SUCCESSFUL,
    State.FAILED: TaskResultStatus.FAILED,
    State.CANCELLED: TaskResultStatus.FAILED,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueSelector:
    """Which queues a worker takes jobs from: ``include`` (None: all) minus ``exclude``."""

    include: frozenset[str] | None = None
    exclude: frozenset[str] = frozenset()

    def allows(self, queue_name: str) -> bool:
        """Say whether a job on ``queue_name`` may be taken."""
        if self.include is not None and queue_name not in self.include:
            return False
        return queue_name not in self.exclude

    def describe(self) -> str:
        """The choice as the workers registry shows it: ``a,b``, ``*`` or ``* -a,b``."""
        if self.include is not None:
            return ",".join(sorted(self.include))
        if self.exclude:
            return "* -" + ",".join(sorted(self.exclude))
        return "*"

    def narrowed(self, known: frozenset[str] | set[str]) -> QueueSelector:
        """The same choice as an explicit list when the backend's queues are known."""
        if not known or (self.include is None and not self.exclude):
            return self
        names = set(known) if self.include is None else set(self.include)
        return QueueSelector(include=frozenset(names - self.exclude))


@dataclass(frozen=True, slots=True)
class Pool:
    """Worker processes of one supervisor that take jobs from the same queues."""

    queues: QueueSelector
    processes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    """One delivery of a job, as the runtime sees it."""

    id: str
    task_path: str
    backend: str
    queue_name: str
    priority: int
    args: list[Any]
    kwargs: dict[str, Any]
    attempt: int
    enqueued_at: datetime
    run_after: datetime | None
    started_at: datetime | None
    last_attempted_at: datetime | None
    worker_ids: tuple[str, ...] = ()
    errors: tuple[TaskError, ...] = ()
    # This delivery's token (fencing token): every write about the delivery names it, and
    # a write from an older delivery of the same job is refused.
    delivery: str = ""
    # The backend's own handle for the row or key behind the job; opaque to the runtime.
    key: Any = None
    # The policies stored with the job at enqueue (``ConveyorBackend.job_options``).
    options: Mapping[str, Any] = field(default_factory=dict)


CANCELLED_ERROR = "conveyor.exceptions.Cancelled"  # the error a cancelled job records


class Disposition(StrEnum):
    """What becomes of a job once its outcome is recorded."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RETRY = "retry"  # failed this time; scheduled again at ``Outcome.retry_at``
    SNOOZED = "snoozed"  # asked to run again at ``Outcome.retry_at``; no failure counted


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What one invocation of a task produced, and what is to become of the job.

    Middleware may replace it (``dataclasses.replace``): set ``retry_at`` to retry a
    failure later, or ``error`` to fail a task that returned.
    """

    started_at: datetime
    finished_at: datetime
    return_value: Any = None
    error: TaskError | None = None
    retry_at: datetime | None = None
    # The exception itself, in the process that ran the task (never stored): signals for
    # a failure are sent while it is being handled, as Django's own backends do.
    exception: BaseException | None = field(default=None, compare=False, repr=False)

    @property
    def succeeded(self) -> bool:
        """Say whether the task returned without raising."""
        return self.error is None

    @property
    def cancelled(self) -> bool:
        """Say whether the task stopped because it was asked to (``Cancelled``)."""
        return self.error is not None and self.error.exception_class_path == CANCELLED_ERROR

    @property
    def disposition(self) -> Disposition:
        if self.error is None:
            return Disposition.SUCCEEDED if self.retry_at is None else Disposition.SNOOZED
        return Disposition.FAILED if self.retry_at is None else Disposition.RETRY


Success = tuple[Job, Outcome]  # a delivery and what its task returned


@dataclass(frozen=True, slots=True, kw_only=True)
class PutBack:
    """A delivery a worker gave up, and what became of its job."""

    job: Job
    counted: bool  # the loss counts toward MAX_ATTEMPTS
    failed: bool  # ... and the job was failed for it
    saved: bool = False  # not put back: the process had finished it; its success is saved


STAT_NAMES = ("ready", "scheduled", "running", "successful", "failed")


@dataclass(frozen=True, slots=True, kw_only=True)
class Throughput:
    """How many jobs ended in one interval of time: those that succeeded, those that failed.

    ``failed`` counts cancelled jobs too, as Django does; ``start`` is aware.
    """

    start: datetime
    succeeded: int = 0
    failed: int = 0

    @staticmethod
    def bucket(moment: datetime, step: int) -> float:
        """The POSIX time at which the interval of ``step`` seconds holding ``moment`` starts."""
        stamp = moment.timestamp()
        return stamp - stamp % step


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueStats:
    """Counts of jobs by state, for one backend (optionally some queues).

    ``ready`` counts waiting jobs too; ``failed`` counts cancelled ones, as Django does.
    """

    ready: int = 0
    scheduled: int = 0
    running: int = 0
    successful: int = 0
    failed: int = 0
    by_queue: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def from_counts(cls, counts: dict[tuple[str, str], int]) -> QueueStats:
        """Build stats from ``{(queue, state): count}``."""
        column = {
            State.SCHEDULED: "scheduled",
            State.READY: "ready",
            State.WAITING: "ready",
            State.RUNNING: "running",
            State.SUCCEEDED: "successful",
            State.FAILED: "failed",
            State.CANCELLED: "failed",
        }
        by_queue: dict[str, dict[str, int]] = {}
        for (queue, state), count in counts.items():
            row = by_queue.setdefault(queue, dict.fromkeys(STAT_NAMES, 0))
            row[column[State(state)]] += count
        totals = {name: sum(q[name] for q in by_queue.values()) for name in STAT_NAMES}
        return cls(**totals, by_queue=by_queue)

    @property
    def pending(self) -> int:
        """Jobs not finished yet: ready, scheduled or running."""
        return self.ready + self.scheduled + self.running

    @property
    def finished(self) -> int:
        """Jobs that have ended, either way."""
        return self.successful + self.failed


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerInfo:
    """One running supervisor or worker process, as the ``workers`` registry holds it."""

    id: str
    backend: str
    kind: str  # "supervisor" or "process"
    host: str
    pid: int
    supervisor: str | None = None  # the supervisor's id, for a process
    queues: str = "*"
    threads: int = 1
    started_at: datetime | None = None
    last_beat_at: datetime | None = None
    stopped_at: datetime | None = None
    ended: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunningJob:
    """A delivery a worker holds now, as a monitor shows it."""

    id: str
    task_path: str
    queue_name: str
    worker_id: str
    attempt: int
    enqueued_at: datetime
    # When its task started, as its worker reports it (a heartbeat after the start);
    # None: claimed but not started yet.
    started_at: datetime | None = None
    # What the task last reported with ``context.progress()``: done, total, message.
    progress: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class FailedJob:
    """A job that ended failed or cancelled, and the error it ended with."""

    id: str
    task_path: str
    queue_name: str
    finished_at: datetime
    attempt: int
    cancelled: bool = False
    error_class: str = ""  # the dotted path of the exception class
    message: str = ""  # the last line of its traceback: ``ValueError: boom``

    @staticmethod
    def last_error(errors: Sequence[TaskError]) -> tuple[str, str]:
        """The class path and last traceback line of the newest of ``errors``."""
        if not errors:
            return "", ""
        error = errors[-1]
        lines = [line for line in error.traceback.splitlines() if line.strip()]
        return error.exception_class_path, lines[-1].strip() if lines else ""


@dataclass(frozen=True, slots=True, kw_only=True)
class PickupLatency:
    """How long jobs that started lately waited, from when they could run to their start.

    In seconds; ``samples`` says how many starts were measured (None values: none were).
    """

    samples: int = 0
    p50: float | None = None
    p95: float | None = None
    longest: float | None = None

    @classmethod
    def of(cls, waits: Iterable[float]) -> PickupLatency:
        """The percentiles (nearest rank) of ``waits``; a negative wait (clock skew) is 0."""
        ordered = sorted(max(wait, 0.0) for wait in waits)
        if not ordered:
            return cls()

        def rank(share: float) -> float:
            return ordered[max(math.ceil(share * len(ordered)) - 1, 0)]

        return cls(samples=len(ordered), p50=rank(0.5), p95=rank(0.95), longest=ordered[-1])


def new_worker_id() -> str:
    """A worker id: host, process, and 64 random bits (no two machines share one)."""
    return f"{socket.gethostname()[:50]}:{os.getpid()}:{secrets.token_hex(8)}"


def error_from_exception(exc: BaseException, traceback_text: str) -> TaskError:
    """Describe an exception the way ``TaskResult.errors`` does."""
    cls = type(exc)
    return TaskError(
        exception_class_path=f"{cls.__module__}.{cls.__qualname__}", traceback=traceback_text
    )


def error_from_text(exception_class_path: str, message: str) -> TaskError:
    """An error recorded by Conveyor itself (no Python traceback): ``Class: message``."""
    name = exception_class_path.rpartition(".")[2]
    return TaskError(exception_class_path=exception_class_path, traceback=f"{name}: {message}\n")


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleSpec:
    """What a schedule runs and when: everything about it that is declared, none of its state.

    ``args`` and ``kwargs`` are JSON values; ``queue_name`` and ``priority`` replace the
    task's own when set. ``due_kwarg`` names a keyword argument that receives each run's
    due time (ISO 8601). ``source`` is "code" for a schedule declared with ``@schedule``.
    """

    name: str
    task_path: str
    timetable: Timetable
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    queue_name: str = ""
    priority: int | None = None
    catch_up: CatchUp = CatchUp.ONCE
    catch_up_limit: int = 100
    grace: float = 60.0
    due_kwarg: str = ""
    jitter: float = 0.0
    run_at_creation: bool = False
    repeats: int | None = None
    source: str = "database"

    def options(self) -> dict[str, Any]:
        """What it runs and how it catches up, as plain values (``spec_for`` takes them)."""
        return {
            "args": list(self.args),
            "kwargs": dict(self.kwargs),
            "queue_name": self.queue_name,
            "priority": self.priority,
            "catch_up": str(self.catch_up),
            "catch_up_limit": self.catch_up_limit,
            "grace": self.grace,
            "due_kwarg": self.due_kwarg,
            "jitter": self.jitter,
            "run_at_creation": self.run_at_creation,
            "repeats": self.repeats,
        }

    def fingerprint(self) -> str:
        """A hash of the definition: a code schedule whose hash changed is updated."""
        tt = self.timetable
        every = tt.every.total_seconds() if tt.every is not None else None
        start = tt.start.isoformat() if tt.start is not None else None
        definition = [
            self.task_path,
            list(self.args),
            dict(self.kwargs),
            self.queue_name,
            self.priority,
            [tt.kind, tt.cron, every, start, tt.timezone],
            [str(self.catch_up), self.catch_up_limit, self.grace, self.due_kwarg, self.jitter],
            [self.run_at_creation, self.repeats],
        ]
        text = json.dumps(definition, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleInfo:
    """A stored schedule: its definition and where it stands (times on the store's clock)."""

    spec: ScheduleSpec
    backend: str
    paused: bool = False
    retired: bool = False
    next_run_at: datetime | None = None
    last_run_at: datetime | None = None  # the due time of the last run fired
    last_result_id: str | None = None
    runs: int = 0
    repeats_left: int | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    fingerprint: str = ""  # of the definition as saved (``ScheduleSpec.fingerprint``)

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True, slots=True, kw_only=True)
class Fired:
    """One run of a schedule that was fired: its due time and the job it enqueued."""

    schedule: str
    task_path: str
    due_at: datetime
    result_id: str | None  # None: the task could not be enqueued (the error was logged)
    on_demand: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncReport:
    """What syncing the code schedules changed in the store, by schedule name."""

    added: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    retired: tuple[str, ...] = ()
