"""Values that cross the seam between backends and the runtime."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.tasks.base import TaskError


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


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    """One claimed job, as the runtime sees it."""

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
    # The backend's own handle for the row or key behind the job; opaque to the runtime.
    key: Any = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What one invocation of a task produced."""

    started_at: datetime
    finished_at: datetime
    return_value: Any = None
    error: TaskError | None = None

    @property
    def succeeded(self) -> bool:
        """Say whether the task returned without raising."""
        return self.error is None


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueStats:
    """Counts of jobs by state, for one backend (optionally some queues)."""

    ready: int = 0
    scheduled: int = 0
    running: int = 0
    successful: int = 0
    failed: int = 0
    by_queue: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def pending(self) -> int:
        """Jobs not finished yet: ready, scheduled or running."""
        return self.ready + self.scheduled + self.running

    @property
    def finished(self) -> int:
        """Jobs that have ended, either way."""
        return self.successful + self.failed
