"""Acting on one job from anywhere: wait for it, cancel it, read its progress, enqueue it again."""

from __future__ import annotations

import dataclasses
import math
import time
from enum import StrEnum
from typing import Any

from asgiref.sync import sync_to_async
from django.tasks import TaskResult, TaskResultStatus, task_backends

from conveyor.backends.base import Waiter
from conveyor.backends.tasks import resolve_task
from conveyor.exceptions import ConveyorImproperlyConfigured


class CancelOutcome(StrEnum):
    """What ``cancel()`` did."""

    CANCELLED = "cancelled"  # it had not started: it never runs
    STOPPING = "stopping"  # it is running: its task was asked to stop
    FINISHED = "finished"  # it had already ended: nothing to do


def cancel(result: TaskResult | str, backend: str | None = None) -> CancelOutcome:
    """Cancel a job (a ``TaskResult``, or its id and the ``backend`` alias).

    A job not started yet never runs. A running one is asked to stop: a task that checks
    ``context.cancelled()`` can stop cleanly; one that does not is stopped by its worker
    after the backend's ``CANCEL_GRACE``. Either way it ends cancelled, shown to Django as
    FAILED with a ``conveyor.exceptions.Cancelled`` error. Raises ``TaskResultDoesNotExist``
    for an unknown id.
    """
    store, result_id = _store(result, backend)
    if store.cancel(result_id):
        return CancelOutcome.CANCELLED
    if store.request_cancel(result_id):
        return CancelOutcome.STOPPING
    return CancelOutcome.FINISHED


def progress(result: TaskResult | str, backend: str | None = None) -> dict[str, Any] | None:
    """What a job's task last reported with ``context.progress()``: done, total, message."""
    store, result_id = _store(result, backend)
    return store.get_progress(result_id)


def enqueue_again(result: TaskResult | str, backend: str | None = None) -> TaskResult:
    """Enqueue the call a finished job made again, as a new job; return its result.

    The same task, arguments, queue and priority, due at once, with the task's options as
    the code declares them now. The old job keeps its history. Raises ``ValueError`` for a
    job that has not finished, ``TaskResultDoesNotExist`` for an unknown id, ``TaskNotFound``
    if the task no longer exists and ``InvalidTask`` if its queue is no longer configured.
    """
    store, result_id = _store(result, backend)
    old = store.get_result(result_id)
    if old.status not in ENDED:
        raise ValueError(f"Job {result_id} has not finished ({old.status}): it still runs.")
    task = dataclasses.replace(
        resolve_task(old.task.module_path),
        backend=store.alias,
        queue_name=old.task.queue_name,
        priority=old.task.priority,
        run_after=None,
    )
    again: TaskResult = task.enqueue(*old.args, **old.kwargs)
    return again


def wait(result: TaskResult, timeout: float | None = None) -> TaskResult:
    """Block until the job of ``result`` has finished; return its final ``TaskResult``.

    Woken by the backend when jobs end where it can (PostgreSQL's LISTEN/NOTIFY, SQLite's
    file changes), else it looks again at growing intervals up to half a second. Raises
    ``TimeoutError`` if the job has not finished within ``timeout`` seconds (None: wait as
    long as it takes). ``result`` itself is not changed; ``result.refresh()`` also works.
    """
    if timeout is not None and not (isinstance(timeout, int | float) and timeout >= 0):
        raise ValueError(f"timeout must be a number of seconds from 0, or None; not {timeout!r}.")
    backend = task_backends[result.backend]
    deadline = None if timeout is None else time.monotonic() + timeout
    waiter = getattr(backend, "result_waiter", Waiter)()
    if hasattr(backend, "await_job"):
        backend.await_job(result.id)  # before the first look: an end after it is told
    pause = FIRST_LOOK
    try:
        while True:
            current = backend.get_result(result.id)
            if current.status in ENDED:
                return current
            left = math.inf if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"Job {result.id} ({result.task.module_path}) had not finished after "
                    f"{timeout:g}s; it is {current.status}."
                )
            woken = waiter.wait(min(left, pause))
            pause = FIRST_LOOK if woken else min(pause * 2, LONGEST_LOOK)
    finally:
        waiter.close()


async def await_result(result: TaskResult, timeout: float | None = None) -> TaskResult:
    """``wait()`` for async code: the waiting happens in a thread."""
    return await sync_to_async(wait)(result, timeout)


FIRST_LOOK = 0.005  # seconds between the first looks at a job still running
LONGEST_LOOK = 0.5  # the longest, where the backend cannot say when jobs end
ENDED = (TaskResultStatus.SUCCESSFUL, TaskResultStatus.FAILED)


def _store(result: TaskResult | str, backend: str | None) -> tuple[Any, str]:
    from conveyor.backends.base import WorkerStore

    if isinstance(result, TaskResult):
        alias, result_id = backend or result.backend, result.id
    else:
        alias, result_id = backend or "default", str(result)
    store = task_backends[alias]
    if not isinstance(store, WorkerStore):
        raise ConveyorImproperlyConfigured(
            f"TASKS[{alias!r}] uses {type(store).__name__}, which keeps no jobs to act on."
        )
    return store, result_id
