"""Run one delivered job: load its task, send the signals, call it through the middleware.

``run_one(job) -> Finished`` does no storage I/O of its own, so the claim loop, an
in-process worker, eager mode and a push receiver can all run jobs the same way and hand
the result to a recorder.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from inspect import iscoroutinefunction
from typing import Any

from django.dispatch import Signal
from django.tasks import Task, TaskResult, TaskResultStatus
from django.tasks.signals import task_started
from django.utils import timezone

from conveyor import tracing
from conveyor.backends.base import StoreBackend
from conveyor.backends.tasks import unavailable_task
from conveyor.context import ConveyorContext
from conveyor.options import TimeLimits
from conveyor.records import Job, Outcome, error_from_exception
from conveyor.runtime.invocation import invoke
from conveyor.runtime.middleware import Middleware

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Finished:
    """A job that ran (or could not), waiting for its outcome to be recorded."""

    job: Job
    task: Task
    result: TaskResult  # as it was while running
    outcome: Outcome


class Runner:
    """Turns a delivered job into a ``Finished``; never raises for the job's own failures."""

    def __init__(self, backend: StoreBackend, middleware: Sequence[Middleware]) -> None:
        self.backend = backend
        self.middleware = list(middleware)

    def run_one(self, job: Job, cancelled: Callable[[], bool] | None = None) -> Finished:
        """Load and run ``job``'s task; a task that cannot be loaded fails the job.

        ``cancelled`` says whether the job was asked to stop, for the task's context.
        """
        started_at = timezone.now()
        try:
            task = self.backend.load_task(job)
        except Exception as e:
            logger.error("Job %s names task %s, which cannot run: %s", job.id, job.task_path, e)
            task = unavailable_task(job.task_path, job.backend, job.queue_name, job.priority)
            return Finished(job, task, self._running(job, task, started_at), _failed(e, started_at))
        result = self._running(job, task, started_at)
        with tracing.running(job) as span:
            outcome = self._invoke(job, task, result, cancelled)
            tracing.ran(span, outcome)
        return Finished(job, task, result, outcome)

    def _invoke(
        self, job: Job, task: Task, result: TaskResult, cancelled: Callable[[], bool] | None
    ) -> Outcome:
        """Send ``task_started``, call the task through the middleware; its outcome."""
        started_at = result.last_attempted_at or timezone.now()
        try:
            send(self.backend, task_started, result)
            for hook in self.middleware:
                hook.before_invoke(job, task)
            context = ConveyorContext(
                task_result=result,
                is_cancelled=cancelled or _never,
                save_progress=lambda progress: self._progress(job, progress),
            )
            outcome = invoke(task, result, context, _soft_limit(job, task))
            for hook in reversed(self.middleware):
                outcome = hook.after_invoke(job, task, outcome) or outcome
        except KeyboardInterrupt:  # the worker is being stopped: the job goes back
            raise
        except BaseException as e:  # a hook failed: the job still gets an outcome
            logger.exception("Worker machinery failed around job %s (%s)", job.id, job.task_path)
            outcome = _failed(e, started_at)
        return outcome

    def _progress(self, job: Job, progress: dict[str, Any]) -> None:
        self.backend.report_progress(job, progress)

    def _running(self, job: Job, task: Task, started_at: datetime) -> TaskResult:
        return self.backend.to_task_result(
            job,
            task,
            TaskResultStatus.RUNNING,
            started_at=job.started_at or started_at,
            last_attempted_at=started_at,
        )


def _never() -> bool:
    return False


def _soft_limit(job: Job, task: Task) -> float | None:
    """The soft limit to arm around a run: none for ``async def`` tasks.

    Raised in the thread that waits for a coroutine, it would leave the coroutine running;
    such tasks use ``asyncio.timeout()`` for a limit of their own.
    """
    return None if iscoroutinefunction(task.func) else TimeLimits.from_stored(job.options).soft


def _failed(error: BaseException, started_at: datetime) -> Outcome:
    text = "".join(traceback.format_exception(error))
    return Outcome(
        started_at=started_at,
        finished_at=timezone.now(),
        error=error_from_exception(error, text),
        exception=error,
    )


def send(backend: StoreBackend, signal: Signal, result: TaskResult, **more: Any) -> None:
    """Send a task signal; a failing receiver is logged and changes nothing."""
    sent = signal.send_robust(sender=type(backend), task_result=result, **more)
    for receiver, response in sent:
        if isinstance(response, Exception):
            logger.error(
                "Receiver %r of a task signal failed for job %s",
                receiver,
                result.id,
                exc_info=response,
            )
