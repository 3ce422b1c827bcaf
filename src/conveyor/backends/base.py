"""The two contracts of a Conveyor backend.

``ConveyorBackend`` is the ``django.tasks`` face every Conveyor backend has: enqueue, bulk
enqueue, get_result. ``WorkerStore`` is what a worker drives: claim, stage, complete, fail,
retry, give back, requeue, heartbeat, recover, cancel, run now, stats, prune, expire, the
workers registry and fork hooks; and what a monitor reads (running jobs, recent failures,
pickup latency). A backend that runs no worker of its own (an HTTP push backend) is only a
``ConveyorBackend``; the runtime accepts a backend only if it is also a ``WorkerStore``.
The runtime sees only this module, ``conveyor.records`` and ``conveyor.backends.tasks``.
"""

from __future__ import annotations

import random
import threading
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar

from django.tasks import Task, TaskResult, TaskResultStatus, task_backends
from django.tasks.backends.base import BaseTaskBackend
from django.tasks.exceptions import InvalidTask

from conveyor import tracing
from conveyor.backends.tasks import (
    call_problem,
    encode_arguments,
    resolve_task,
    stored_task,
    task_problems,
    unavailable_task,
)
from conveyor.conf import BackendOptions
from conveyor.exceptions import (
    ConveyorImproperlyConfigured,
    InvalidTaskArguments,
    InvalidTaskOption,
    TaskNotFound,
)
from conveyor.options import ConveyorTask, Retention, RetryPolicy, TimeLimits, Uniqueness
from conveyor.records import (
    FailedJob,
    Fired,
    Job,
    Outcome,
    PickupLatency,
    PutBack,
    QueueSelector,
    QueueStats,
    RunningJob,
    ScheduleInfo,
    ScheduleSpec,
    Success,
    SyncReport,
    Throughput,
    WorkerInfo,
)

Call = tuple[Sequence[Any], Mapping[str, Any]]
# A delivery a worker holds: job key, token, and when its task started (None: not yet).
Held = tuple[int, str, datetime | None]


class Waiter:
    """Blocks an idle worker until work may be there; this one simply sleeps."""

    def __init__(self) -> None:
        self.interrupted = threading.Event()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; return True if woken by a notification."""
        self.interrupted.wait(timeout)
        return False

    def interrupt(self) -> None:
        """End the current and every later wait at once (the worker is stopping)."""
        self.interrupted.set()

    def claiming(self) -> None:
        """The worker claims now: it will see all it was woken for until this moment."""

    def close(self) -> None:
        """Release whatever the waiter holds."""


KNOWN_TASKS = 256  # validated tasks a backend keeps, with their stored options


@dataclass(frozen=True, slots=True)
class _KnownTask:
    task: Task
    options: dict[str, Any]


class ConveyorBackend(BaseTaskBackend):
    """A ``django.tasks`` backend with Conveyor's options and bulk enqueue."""

    options_class: ClassVar[type[BackendOptions]] = BackendOptions
    task_class = ConveyorTask
    # Tasks run inside enqueue (or at commit): no worker ever takes this backend's jobs.
    runs_inline: ClassVar[bool] = False

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        self.conveyor_options = self.options_class.from_settings(alias, dict(self.options))
        o = self.conveyor_options
        self.retry_defaults = RetryPolicy(
            retries=o.retries,
            backoff=o.retry_backoff,
            backoff_max=o.retry_backoff_max,
            jitter=o.retry_jitter,
        )
        self.limit_defaults = TimeLimits(hard=o.timeout, soft=o.soft_timeout)
        self.retention_defaults = Retention(succeeded=o.result_ttl, failed=o.failed_ttl)
        self._known_tasks: dict[int, _KnownTask] = {}

    def job_options(self, task: Task) -> dict[str, Any]:
        """The options a call of ``task`` is stored with (the policies that will apply)."""
        options = dict(self._known(task).options)
        if trace := tracing.carrier():
            options["trace"] = trace  # the span that enqueues it: the parent of its runs
        return options

    def _known(self, task: Task) -> _KnownTask:
        """``task`` validated for this backend, with its stored options; kept per task.

        Tasks are immutable and a backend's settings never change, so each task object is
        validated once (the last ``KNOWN_TASKS`` of them are kept).
        """
        found = self._known_tasks.get(id(task))
        if found is not None and found.task is task:
            return found
        self._validate(task)
        known = _KnownTask(task, self._stored_options(task))
        if len(self._known_tasks) >= KNOWN_TASKS:
            self._known_tasks.clear()
        self._known_tasks[id(task)] = known
        return known

    def _stored_options(self, task: Task) -> dict[str, Any]:
        retry = RetryPolicy.for_task(task, self.retry_defaults).stored()
        limits = TimeLimits.for_task(task, self.limit_defaults).stored()
        options: dict[str, Any] = {"retry": retry} if retry else {}
        options |= limits
        options |= Retention.for_task(task, self.retention_defaults).stored()
        if most := getattr(task, "max_attempts", None):
            options["max_attempts"] = most
        if getattr(task, "sigkill_on_stop", False):
            options["sigkill_on_stop"] = True
        return options

    def uniqueness(self, task: Task, call: Call) -> Uniqueness | None:
        """How an encoded call of ``task`` is unique, if it is; raise if its key fails."""
        return Uniqueness.for_call(task, self.alias, *call)

    def result_waiter(self) -> Waiter:
        """What ``conveyor.wait()`` sleeps on between looks: woken when jobs end, if it can."""
        return Waiter()

    def await_job(self, result_id: str) -> None:
        """Note that someone waits for this job's end, where that decides who is told."""

    @abstractmethod
    def bulk_enqueue(self, task: Task, calls: Iterable[Call]) -> list[TaskResult]:
        """Store many calls of one task together: all of them, or none."""

    def enqueue(self, task: Task, args: Sequence[Any], kwargs: dict[str, Any]) -> TaskResult:
        """Store one call of ``task`` (in a tracing span, where tracing is on)."""
        with tracing.enqueueing(task, self.alias, 1) as span:
            results = self.bulk_enqueue(task, [(args, kwargs)])
            tracing.enqueued(span, results)
        return results[0]

    def validate_task(self, task: Task) -> None:
        """Refuse, besides what Django refuses, what no store could keep about ``task``."""
        self._known(task)

    def _validate(self, task: Task) -> None:
        super().validate_task(task)
        problems = task_problems(task)
        if problems:
            raise InvalidTask(" ".join(problems))
        soft, hard = getattr(task, "soft_timeout", None), self.limit_defaults.hard
        if soft and hard and getattr(task, "timeout", None) is None and soft >= hard:
            raise InvalidTaskOption(
                f"Task {task.module_path}: soft_timeout ({soft:g}s) must be shorter than the "
                f"backend's TIMEOUT ({hard:g}s), or give the task a timeout of its own."
            )

    def encode_call(self, task: Task, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Call:
        """Validate ``task`` and return its arguments as plain JSON values, or raise."""
        self._known(task)
        return encode_arguments(task, args, kwargs, self.conveyor_options)

    def scheduled_call(self, spec: ScheduleSpec, due: datetime, now: datetime) -> tuple[Task, Call]:
        """The task and encoded call that the run of ``spec`` due at ``due`` enqueues.

        ``now`` is as Django keeps datetimes (naive with ``USE_TZ`` off). Raise
        (``TaskNotFound``, ``InvalidTask``, ``InvalidTaskArguments``) if the schedule names no
        registered task, a queue the backend does not have, or arguments that the task
        cannot take or a store cannot keep.
        """
        task = resolve_task(spec.task_path)
        changes: dict[str, Any] = {"backend": self.alias}
        if spec.queue_name:
            changes["queue_name"] = spec.queue_name
        if spec.priority is not None:
            changes["priority"] = spec.priority
        if spec.jitter > 0:
            changes["run_after"] = now + timedelta(seconds=random.uniform(0, spec.jitter))
        task = task.using(**changes)
        kwargs = dict(spec.kwargs)
        if spec.due_kwarg:
            kwargs[spec.due_kwarg] = due.isoformat()
        if (problem := call_problem(task, spec.args, kwargs)) is not None:
            raise InvalidTaskArguments(
                f"Task {spec.task_path!r} cannot take the schedule's arguments: {problem}."
            )
        return task, self.encode_call(task, list(spec.args), kwargs)

    def load_task(self, job: Job) -> Task:
        """Import the module-level task a job names, with the job's own settings.

        The stored queue is kept even if ``QUEUES`` no longer lists it: a job already
        stored runs where it was sent.
        """
        return stored_task(job.task_path, self.alias, job.queue_name, job.priority, job.run_after)

    def stored_result(
        self, job: Job, status: TaskResultStatus, finished_at: datetime | None, value: Any
    ) -> TaskResult:
        """The ``TaskResult`` a stored job stands for, even if its task is gone."""
        try:
            task = self.load_task(job)
        except (TaskNotFound, InvalidTask):
            task = unavailable_task(job.task_path, self.alias, job.queue_name, job.priority)
        return self.to_task_result(job, task, status, finished_at=finished_at, return_value=value)

    def to_task_result(
        self, job: Job, task: Task, status: TaskResultStatus, **changes: Any
    ) -> TaskResult:
        """Build the ``TaskResult`` a user sees for ``job``."""
        values: dict[str, Any] = {
            "task": task,
            "id": job.id,
            "status": status,
            "enqueued_at": job.enqueued_at,
            "started_at": job.started_at,
            "finished_at": None,
            "last_attempted_at": job.last_attempted_at,
            "args": list(job.args),
            "kwargs": dict(job.kwargs),
            "backend": self.alias,
            "errors": list(job.errors),
            "worker_ids": list(job.worker_ids),
        }
        return_value = changes.pop("return_value", None)
        values.update(changes)
        result: TaskResult = TaskResult(**values)
        object.__setattr__(result, "_return_value", return_value)
        return result


class WorkerStore(ABC):
    """The verbs a Conveyor worker drives; every write about a delivery names its token."""

    # The backend can wake idle workers as soon as a job is enqueued.
    supports_wakeup: bool = False
    # Claims queue for one lock of the whole store (SQLite's write lock): an idle process
    # woken with its siblings lets a claim under way end before its own (``Claiming``).
    claims_queue_up: bool = False
    # Lease times are compared with the store's own clock, not the caller's.
    supports_store_clock: ClassVar[bool] = True

    # --- taking work ---------------------------------------------------------------------

    @abstractmethod
    def claim(self, worker_id: str, queues: QueueSelector, limit: int) -> list[Job]:
        """Lease up to ``limit`` ready jobs to ``worker_id``, best first, each delivery a token."""

    @abstractmethod
    def stage(self, limit: int = 1000) -> int:
        """Make up to ``limit`` scheduled jobs that are due ready; return how many."""

    @abstractmethod
    def next_due(self, queues: QueueSelector) -> datetime | None:
        """When the earliest scheduled job falls due; None if there is none."""

    # --- outcomes ------------------------------------------------------------------------

    @abstractmethod
    def complete(self, successes: Sequence[Success]) -> set[str]:
        """Record successes together; return the ids saved by these deliveries.

        A success is taken while the job has no outcome (first success wins, so a late
        one from an earlier delivery counts: the work was done). A job whose success was
        already saved by the same delivery (a commit whose reply was lost) counts as saved.
        """

    @abstractmethod
    def fail(self, job: Job, outcome: Outcome) -> bool:
        """Record a final failure, if this delivery still holds the job (or already did)."""

    @abstractmethod
    def retry(self, job: Job, outcome: Outcome) -> bool:
        """Record a failed attempt; the job is scheduled again for ``outcome.retry_at``."""

    @abstractmethod
    def unclaim(self, jobs: Sequence[Job]) -> int:
        """Give back deliveries that never started: uncounted, keeping their place in line."""

    @abstractmethod
    def requeue(self, job: Job, reason: str, *, counts_as_attempt: bool = True) -> bool:
        """Put back a delivery whose run was cut short (its process died, or was stopped).

        With ``counts_as_attempt`` the loss counts toward ``MAX_ATTEMPTS``, and the job is
        failed once it was lost that many times; a stop the operator asked for never does.
        """

    @abstractmethod
    def release(
        self,
        worker_id: str,
        reason: str,
        *,
        executing: Collection[tuple[int, str]] = (),
        counts_as_attempt: bool = True,
        finished: Mapping[tuple[int, str], Outcome] | None = None,
    ) -> list[PutBack]:
        """Put back every delivery ``worker_id`` holds: its process ended.

        Deliveries in ``executing`` (job key, token) were running: they are requeued
        (counted if ``counts_as_attempt``); the rest never started and go back uncounted,
        keeping their place in line. Deliveries in ``finished`` had returned and their
        successes were not saved yet: they are saved as ``complete`` would
        (``PutBack.saved``), or, if the store refuses the value, go back uncounted.
        """

    @abstractmethod
    def give_back(self, worker_id: str, deliveries: Collection[tuple[int, str]]) -> list[Job]:
        """Give back, uncounted, these deliveries (job key, token) of a live worker.

        Its supervisor does, for deliveries the worker holds but has not started while all
        its threads are stuck in long tasks.
        """

    @abstractmethod
    def reclaim(self, worker_ids: Sequence[str]) -> list[Job]:
        """Give back, uncounted, deliveries these live workers hold but no longer renew.

        A claim whose reply was lost leaves a delivery its worker never heard of; its
        lease runs out (store clock) while the worker renews all it knows.
        """

    # --- leases and the workers registry -----------------------------------------------

    @abstractmethod
    def heartbeat(self, worker_ids: Sequence[str], deliveries: Sequence[Held] = ()) -> int:
        """Renew the leases of ``deliveries`` and the registry rows of ``worker_ids``.

        A delivery whose task started gets its ``started_at``. Return the leases renewed.
        """

    @abstractmethod
    def reachable(self) -> bool:
        """Say whether the store answers a trivial request now."""

    def refuses(self, error: Exception) -> bool:
        """Say whether ``error`` means the store refused the data itself.

        Not that it is unreachable or busy: those pass, and the same write is tried again.
        """
        return isinstance(error, ValueError | TypeError)

    @abstractmethod
    def recover(self) -> int:
        """Requeue deliveries whose lease expired and whose worker is stale; return how many."""

    @abstractmethod
    def register_worker(self, info: WorkerInfo) -> None:
        """Add a running supervisor or process to the workers registry."""

    @abstractmethod
    def end_worker(self, worker_id: str, ended: str) -> None:
        """Mark a registered worker stopped, saying how it ended."""

    @abstractmethod
    def workers(self, *, alive: bool = True) -> list[WorkerInfo]:
        """The registered workers of this backend (only running ones, unless ``alive=False``)."""

    # --- operations ------------------------------------------------------------------------

    @abstractmethod
    def cancel(self, result_id: str) -> bool:
        """Cancel a job that has not started; return whether it was cancelled."""

    @abstractmethod
    def run_now(self, result_ids: Collection[str]) -> int:
        """Make these scheduled jobs due now (store clock): ready at once; return how many.

        Each joins the line behind the ready jobs of its priority. Jobs in any other state,
        and ids the store does not hold, are left alone.
        """

    @abstractmethod
    def request_cancel(self, result_id: str) -> bool:
        """Ask the worker running this job to stop it; False if it is not running."""

    @abstractmethod
    def cancels(self, deliveries: Collection[tuple[int, str]]) -> set[tuple[int, str]]:
        """Which of these running deliveries (job key, token) were asked to stop."""

    @abstractmethod
    def report_progress(self, job: Job, progress: dict[str, Any]) -> bool:
        """Note the progress a running task reports; False once its delivery is over."""

    @abstractmethod
    def get_progress(self, result_id: str) -> dict[str, Any] | None:
        """What the job's task last reported of its progress, if anything."""

    @abstractmethod
    def stats(
        self, queues: QueueSelector | None = None, *, finished_since: datetime | None = None
    ) -> QueueStats:
        """Count jobs by queue and state (finished ones only since ``finished_since``)."""

    @abstractmethod
    def running(self, queues: QueueSelector | None = None, *, limit: int = 100) -> list[RunningJob]:
        """The deliveries workers hold now, longest running first, at most ``limit``.

        Those whose task has not started yet come last.
        """

    @abstractmethod
    def recent_failures(
        self, since: datetime, queues: QueueSelector | None = None, *, limit: int = 20
    ) -> list[FailedJob]:
        """Jobs that failed or were cancelled since ``since``, newest first, at most ``limit``."""

    @abstractmethod
    def pickup_latency(
        self, since: datetime, queues: QueueSelector | None = None, *, limit: int = 500
    ) -> PickupLatency:
        """How long jobs that started since ``since`` waited to start.

        Each wait runs from when the job could run (enqueued, or due) to the start of its
        latest run. Measured over the running jobs and up to ``limit`` of those that
        finished since then, the newest first.
        """

    @abstractmethod
    def throughput(
        self, since: datetime, *, step: int = 60, queues: QueueSelector | None = None
    ) -> list[Throughput]:
        """Jobs that ended since ``since``, counted per ``step`` seconds, oldest first.

        Intervals start at multiples of ``step`` since the epoch; those in which no job ended
        are left out. Only jobs the store still keeps are counted (retention deletes some).
        """

    @abstractmethod
    def prune(self, finished_before: datetime, *, batch: int = 1000, pause: float = 0.01) -> int:
        """Delete finished jobs that ended before ``finished_before``, ``batch`` at a time."""

    @abstractmethod
    def expire(self, *, batch: int = 1000, pause: float = 0.01, limit: int | None = None) -> int:
        """Delete finished jobs kept past their retention (store clock), ``batch`` at a time.

        A job's retention (``result_ttl``, ``failed_ttl``, ``keep_last``) is stored with it.
        ``limit`` bounds the jobs one call deletes (a worker deletes a little at a time);
        return how many were deleted.
        """

    # --- queue administration ----------------------------------------------------------------

    @abstractmethod
    def pause_queue(
        self, queue: str, until: datetime | None = None, *, seconds: float | None = None
    ) -> datetime | None:
        """Stop workers taking jobs from ``queue`` until it is resumed, or ``until``, or for
        ``seconds`` on the store's clock; return when the pause ends (None: when resumed)."""

    @abstractmethod
    def resume_queue(self, queue: str) -> bool:
        """Let workers take jobs from ``queue`` again; False if it was not paused."""

    @abstractmethod
    def paused_queues(self) -> dict[str, datetime | None]:
        """The queues paused now (store clock), each with the end of its pause, if it has one."""

    @abstractmethod
    def clear_queue(self, queue: str) -> int:
        """Delete the jobs of ``queue`` that have not started (ready or scheduled); how many."""

    @abstractmethod
    def remove_duplicates(self, queue: str) -> int:
        """Delete each job of ``queue`` not started yet whose call (task and arguments) an
        older such job makes already; return how many were deleted."""

    # --- schedules ---------------------------------------------------------------------------

    @abstractmethod
    def add_schedule(self, spec: ScheduleSpec, *, paused: bool = False) -> ScheduleInfo:
        """Store a new schedule; raise ``ScheduleExists`` if one has its name."""

    @abstractmethod
    def change_schedule(self, spec: ScheduleSpec, *, was: str | None = None) -> ScheduleInfo:
        """Replace the definition of the stored schedule of that name; its next run is
        worked out again, never at or before its last. Raise ``ScheduleNotFound``.

        With ``was`` (a ``fingerprint()``), raise ``ScheduleChanged`` if the stored
        definition is no longer that one: someone changed it since it was read.
        """

    @abstractmethod
    def sync_schedules(self, specs: Sequence[ScheduleSpec]) -> SyncReport:
        """Make the stored code schedules these: add new ones, change changed ones, retire
        those no longer declared (kept, with their history, but never run)."""

    @abstractmethod
    def pause_schedule(self, name: str, paused: bool) -> bool:
        """Pause or resume a schedule; a resumed one skips the runs missed while paused.

        Return False if no schedule has that name.
        """

    @abstractmethod
    def delete_schedule(self, name: str) -> bool:
        """Delete a schedule and its firings; its jobs stay. False if none has that name."""

    @abstractmethod
    def schedules(self, *, retired: bool = False) -> list[ScheduleInfo]:
        """The stored schedules of this backend by name (retired ones too, if asked)."""

    @abstractmethod
    def get_schedule(self, name: str) -> ScheduleInfo | None:
        """The stored schedule of that name, or None."""

    @abstractmethod
    def fire_schedules(self, limit: int = 100) -> list[Fired]:
        """Enqueue the runs of up to ``limit`` schedules that are due (store clock).

        Each due time of a schedule fires once, whatever number of workers call this at
        once: it is recorded under a unique key in the same transaction as its job, and
        its schedule's next run moves past it.
        """

    @abstractmethod
    def run_schedule(self, name: str) -> Fired:
        """Enqueue one run of a schedule now, outside its timetable (paused or not).

        Raise ``ScheduleNotFound``.
        """

    # --- process life ----------------------------------------------------------------------

    def waiter(self, queues: QueueSelector) -> Waiter:
        """Return an object an idle worker blocks on until work may be there."""
        return Waiter()

    @abstractmethod
    def before_fork(self) -> None:
        """Close what a forked child must not share (connections, pools)."""

    @abstractmethod
    def after_fork(self) -> None:
        """Start afresh in a forked child."""

    @abstractmethod
    def close(self) -> None:
        """Release connections this store opened for the worker."""

    def reading(self) -> AbstractContextManager[object]:
        """Where reads for a person (a page, a scrape) go: if one fails, the caller's
        transaction is still usable (the database backend reads in a savepoint then)."""
        return nullcontext()


class StoreBackend(ConveyorBackend, WorkerStore):
    """A ``django.tasks`` backend that is also a store a Conveyor worker can drive."""


def worker_store(alias: str) -> StoreBackend:
    """The backend ``TASKS[alias]`` names, if a Conveyor worker can drive it; else raise."""
    backend = task_backends[alias]
    if not isinstance(backend, StoreBackend):
        raise ConveyorImproperlyConfigured(
            f"TASKS[{alias!r}] uses {type(backend).__name__}, which a Conveyor worker cannot "
            "drive; use a conveyor.backends backend."
        )
    if backend.runs_inline:
        raise ConveyorImproperlyConfigured(
            f"TASKS[{alias!r}] uses {type(backend).__name__}, which runs each task when it is "
            "enqueued: it has no worker to start."
        )
    return backend
