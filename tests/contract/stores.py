"""Helpers for contract tests: only the public API and the store verbs, on any store."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.tasks import Task, TaskResult, task_backends
from django.tasks.base import TaskError
from django.utils import timezone

from conveyor.backends.base import StoreBackend
from conveyor.records import Outcome


def total(backend: StoreBackend) -> int:
    """Every job the store holds, in any state."""
    stats = backend.stats()
    return stats.pending + stats.finished


def with_options(alias: str, **options: Any) -> StoreBackend:
    """A new backend like ``alias`` (over the same storage), with some options changed.

    Enqueue through the instance this returns (``enqueue(backend, ...)``), so that its
    options apply from the start.
    """
    current = task_backends[alias]
    backend = type(current)(
        alias,
        {
            "QUEUES": sorted(current.queues),
            "OPTIONS": {**current.options, **{k.upper(): v for k, v in options.items()}},
        },
    )
    assert isinstance(backend, StoreBackend)
    return backend


def enqueue(backend: StoreBackend, task: Task, *args: Any, **kwargs: Any) -> TaskResult:
    """Enqueue through this very backend instance."""
    return backend.enqueue(task, args, kwargs)


def returned(value: Any = None, finished_at: datetime | None = None) -> Outcome:
    """The outcome of a task that returned ``value``."""
    finished_at = finished_at or timezone.now()
    return Outcome(started_at=finished_at, finished_at=finished_at, return_value=value)


def raised(
    error: TaskError, finished_at: datetime | None = None, retry_at: datetime | None = None
) -> Outcome:
    """The outcome of a task that raised ``error`` (to be retried at ``retry_at``)."""
    finished_at = finished_at or timezone.now()
    return Outcome(started_at=finished_at, finished_at=finished_at, error=error, retry_at=retry_at)
