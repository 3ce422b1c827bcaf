"""Call one task and capture what happened; no I/O of its own."""

from __future__ import annotations

import json
import traceback
from typing import Any

from django.tasks import Task, TaskContext, TaskResult
from django.utils import timezone

from conveyor.records import Outcome, error_from_exception
from conveyor.runtime.limits import SoftLimit


def invoke(
    task: Task,
    result: TaskResult,
    context: TaskContext | None = None,
    soft_limit: float | None = None,
) -> Outcome:
    """Run ``task`` with the arguments in ``result``; never raises for a task's own error.

    A task that ``takes_context`` gets ``context`` (Django's own, if none is given).
    ``soft_limit``: seconds after which ``SoftTimeLimitExceeded`` is raised in the task;
    should it land just outside the task, it is still this run's error.
    """
    started_at = timezone.now()
    limit = SoftLimit(soft_limit)
    try:
        try:
            limit.arm()
            value = _call(task, result, context)
        finally:
            limit.disarm()
        value = json.loads(json.dumps(value, allow_nan=False))
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # SystemExit too: a task that exits has failed, as in Django
        text = "".join(traceback.format_exception(e))
        if isinstance(e, TypeError | ValueError) and "JSON" in str(e):
            text += f"\nThe return value of {task.module_path!r} must be JSON-serialisable.\n"
        return Outcome(
            started_at=started_at,
            finished_at=timezone.now(),
            error=error_from_exception(e, text),
            exception=e,
        )
    return Outcome(started_at=started_at, finished_at=timezone.now(), return_value=value)


def _call(task: Task, result: TaskResult, context: TaskContext | None) -> Any:
    if task.takes_context:
        context = context or TaskContext(task_result=result)
        return task.call(context, *result.args, **result.kwargs)
    return task.call(*result.args, **result.kwargs)
