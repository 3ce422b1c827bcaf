"""The worker-facing contract every Conveyor backend fulfils.

A backend is a ``django.tasks`` backend (users enqueue through it) and also offers a
handful of verbs the worker runtime drives: claim, complete, fail, retry, heartbeat,
release, recover_stale, stats and prune. The runtime sees only this module.
"""

from __future__ import annotations

import json
import threading
from abc import abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar

from django.tasks import Task, TaskResult, TaskResultStatus
from django.tasks.backends.base import BaseTaskBackend
from django.tasks.base import TaskError
from django.utils.module_loading import import_string

from conveyor.conf import BackendOptions
from conveyor.exceptions import InvalidTaskArguments, TaskNotFound
from conveyor.records import Job, QueueSelector, QueueStats

Call = tuple[Sequence[Any], Mapping[str, Any]]
Success = tuple[Job, Any, datetime]  # a job, its return value, when it finished


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

    def close(self) -> None:
        """Release whatever the waiter holds."""


class ConveyorBackend(BaseTaskBackend):
    """A ``django.tasks`` backend that a Conveyor worker can drive."""

    options_class: ClassVar[type[BackendOptions]] = BackendOptions
    # Claimed jobs carry a lease that heartbeats renew and that expires if a worker vanishes.
    supports_leases: ClassVar[bool] = True
    # The backend can wake idle workers as soon as a job is enqueued.
    supports_wakeup: ClassVar[bool] = False

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        self.conveyor_options = self.options_class.from_settings(alias, dict(self.options))

    # --- the enqueue side -------------------------------------------------------

    @abstractmethod
    def bulk_enqueue(self, task: Task, calls: Iterable[Call]) -> list[TaskResult]:
        """Store many calls of one task together: all of them, or none."""

    def encode_call(self, task: Task, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Call:
        """Validate ``task`` and return its arguments as plain JSON values, or raise."""
        self.validate_task(task)
        return encode_arguments(task, args, kwargs)

    # --- the worker side ---------------------------------------------------------

    @abstractmethod
    def claim(self, worker_id: str, queues: QueueSelector, limit: int) -> list[Job]:
        """Lease up to ``limit`` ready jobs to ``worker_id``, best first."""

    @abstractmethod
    def complete_many(self, worker_id: str, successes: Sequence[Success]) -> set[str]:
        """Record successes together; return the ids saved (a job that ended is left be)."""

    def complete(self, job: Job, worker_id: str, return_value: Any, finished_at: datetime) -> bool:
        """Record a success; never overwrites an earlier success or failure."""
        return job.id in self.complete_many(worker_id, [(job, return_value, finished_at)])

    @abstractmethod
    def fail(self, job: Job, worker_id: str, error: TaskError, finished_at: datetime) -> bool:
        """Record a final failure, if ``worker_id`` still holds the job."""

    @abstractmethod
    def retry(self, job: Job, worker_id: str, error: TaskError, run_after: datetime) -> bool:
        """Record a failed attempt and make the job ready again at ``run_after``."""

    @abstractmethod
    def unclaim(self, job: Job, worker_id: str) -> bool:
        """Give back a job that was claimed but never started; the delivery is not counted."""

    @abstractmethod
    def heartbeat(self, worker_ids: Sequence[str]) -> int:
        """Renew the leases of every job these workers hold; return how many."""

    @abstractmethod
    def release(self, worker_id: str, reason: str, *, counts_as_attempt: bool = True) -> int:
        """Put back every job ``worker_id`` holds (it stopped); return how many.

        With ``counts_as_attempt`` (a crash), a job already delivered ``MAX_ATTEMPTS`` times
        is failed instead; a stop the operator asked for never fails a job.
        """

    @abstractmethod
    def recover_stale(self) -> int:
        """Put back jobs whose lease expired (their worker vanished); return how many."""

    @abstractmethod
    def stats(self, queues: QueueSelector | None = None) -> QueueStats:
        """Count jobs by state."""

    @abstractmethod
    def prune(self, finished_before: datetime) -> int:
        """Delete finished jobs that ended before ``finished_before``; return how many."""

    def next_due(self, queues: QueueSelector) -> datetime | None:
        """When the earliest job that is not ready yet becomes ready; None if unknown."""
        return None

    def waiter(self, queues: QueueSelector) -> Waiter:
        """Return an object an idle worker blocks on until work may be there."""
        return Waiter()

    def close(self) -> None:
        """Release connections this backend opened for the worker (not Django's)."""

    # --- shared helpers ------------------------------------------------------------

    def load_task(self, job: Job) -> Task:
        """Import the module-level task a job names, with the job's own settings."""
        task = resolve_task(job.task_path)
        return task.using(
            priority=job.priority,
            queue_name=job.queue_name,
            run_after=job.run_after,
            backend=self.alias,
        )

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


def resolve_task(path: str) -> Task:
    """Import ``path`` and return it only if it is a module-level ``Task``."""
    try:
        task = import_string(path)
    except ImportError as e:
        raise TaskNotFound(f"Task {path!r} cannot be imported: {e}") from e
    if not isinstance(task, Task):
        raise TaskNotFound(
            f"{path!r} is a {type(task).__name__}, not a task; only functions decorated "
            "with @task run."
        )
    return task


def unavailable_task(path: str, alias: str, queue_name: str, priority: int) -> Task:
    """A stand-in ``Task`` for a stored job whose task cannot be loaded here any more.

    It keeps the stored path, so ``result.task.module_path`` still says what ran; calling
    it raises ``TaskNotFound``. Built without validation, as the real task is gone.
    """
    module, _, name = path.rpartition(".")

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise TaskNotFound(f"Task {path!r} is not available in this process.")

    unavailable.__module__, unavailable.__name__, unavailable.__qualname__ = module, name, name
    task = object.__new__(Task)
    values = {
        "func": unavailable,
        "priority": priority,
        "backend": alias,
        "queue_name": queue_name,
        "run_after": None,
        "takes_context": False,
    }
    for field_name, value in values.items():
        object.__setattr__(task, field_name, value)
    return task


def encode_arguments(task: Task, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Call:
    """Return ``args``/``kwargs`` as they read back from JSON, or name the one that can't."""
    try:
        return json.loads(json.dumps([list(args), dict(kwargs)], allow_nan=False))
    except (TypeError, ValueError) as e:
        raise InvalidTaskArguments(_describe_bad_argument(task, args, kwargs, e)) from e


def _describe_bad_argument(
    task: Task, args: Sequence[Any], kwargs: Mapping[str, Any], error: Exception
) -> str:
    named = [(f"positional argument {i}", value) for i, value in enumerate(args)]
    named += [(f"keyword argument {key!r}", value) for key, value in kwargs.items()]
    for where, value in named:
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            return (
                f"Cannot enqueue task {task.module_path!r}: {where} ({type(value).__name__}) "
                f"is not JSON-serialisable: {e}. Arguments must be JSON values; nothing was "
                "stored."
            )
    return (
        f"Cannot enqueue task {task.module_path!r}: its arguments are not JSON-serialisable: "
        f"{error}. Nothing was stored."
    )


def error_from_exception(exc: BaseException, traceback_text: str) -> TaskError:
    """Describe an exception the way ``TaskResult.errors`` does."""
    cls = type(exc)
    return TaskError(
        exception_class_path=f"{cls.__module__}.{cls.__qualname__}", traceback=traceback_text
    )
