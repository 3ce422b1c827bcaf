"""Helpers for contract tests: only the public API and the store verbs, on any store."""

from __future__ import annotations

from typing import Any

from django.tasks import Task, TaskResult, task_backends

from conveyor.backends.base import StoreBackend


def total(backend: StoreBackend) -> int:
    """Every job the store holds, in any state."""
    stats = backend.stats()
    return stats.pending + stats.finished


def with_options(alias: str, **options: Any) -> StoreBackend:
    """A new backend like ``alias`` (over the same storage), with some options changed.

    An in-process store keeps its jobs in the instance, so enqueue through the instance
    this returns (``enqueue(backend, ...)``), not through the task's alias.
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
