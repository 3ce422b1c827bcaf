"""``bulk_enqueue``: store many calls of one task in one round trip."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.tasks import Task, TaskResult
from django.tasks.exceptions import InvalidTask

from conveyor import tracing


@dataclass(frozen=True, slots=True)
class Call:
    """One call of a task: its positional and keyword arguments."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def call(*args: Any, **kwargs: Any) -> Call:
    """Describe one call for ``bulk_enqueue``: ``call(42, subject="hi")``."""
    return Call(args, kwargs)


def bulk_enqueue(task: Task, calls: Iterable[Call | tuple[Any, ...]]) -> list[TaskResult]:
    """Enqueue ``task`` once per call: all of them, or none if one is invalid.

    A call is a ``call(*args, **kwargs)`` value, or a plain tuple of positional arguments.
    The task's backend must be a Conveyor backend.
    """
    backend = task.get_backend()
    method = getattr(backend, "bulk_enqueue", None)
    if method is None:
        raise InvalidTask(
            f"Backend {task.backend!r} ({type(backend).__name__}) cannot enqueue in bulk; "
            "use a Conveyor backend or call enqueue() for each call."
        )
    pairs = [_as_pair(task, item) for item in calls]
    with tracing.enqueueing(task, task.backend, len(pairs)) as span:
        results: list[TaskResult] = method(task, pairs)
        tracing.enqueued(span, results)
    return results


def _as_pair(task: Task, item: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(item, Call):
        return item.args, item.kwargs
    if isinstance(item, tuple):
        return item, {}
    raise InvalidTask(
        f"bulk_enqueue({task.module_path!r}) takes each call as call(*args, **kwargs) or a "
        f"tuple of positional arguments, not {type(item).__name__}."
    )
