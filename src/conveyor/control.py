"""Acting on one job from anywhere: cancel it, read its progress."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from django.tasks import TaskResult, task_backends

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
