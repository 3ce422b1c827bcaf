"""Queue administration: pause, resume, clear and deduplicate a backend's queues.

A paused queue keeps its jobs (they can still be enqueued) but workers take none from it
until it is resumed or its pause ends; each worker process looks at the pauses about once
a second. Clearing deletes the jobs that have not started; deduplicating deletes each such
job whose call (task and arguments) an older one makes already.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from django.tasks import DEFAULT_TASK_BACKEND_ALIAS

from conveyor import clock
from conveyor.backends.base import StoreBackend, worker_store
from conveyor.exceptions import ConveyorError

MAX_PAUSE = 10 * 365 * 86400.0  # seconds


class UnknownQueue(ConveyorError, ValueError):
    """The backend has no such queue."""


def _store(queue: str, backend: str | None) -> StoreBackend:
    store = worker_store(backend or DEFAULT_TASK_BACKEND_ALIAS)
    if not isinstance(queue, str) or not queue or (store.queues and queue not in store.queues):
        known = ", ".join(map(repr, sorted(store.queues)))
        raise UnknownQueue(
            f"Backend {store.alias!r} has no queue {queue!r}; its QUEUES are {known}."
        )
    return store


def pause(
    queue: str,
    *,
    until: datetime | None = None,
    seconds: float | None = None,
    backend: str | None = None,
) -> datetime | None:
    """Pause ``queue`` until resumed, until a moment, or for some seconds; return the end."""
    store = _store(queue, backend)
    if until is not None and seconds is not None:
        raise ValueError("Pause a queue until a moment or for some seconds, not both.")
    if seconds is not None:
        if isinstance(seconds, bool) or not math.isfinite(seconds) or not 0 < seconds <= MAX_PAUSE:
            raise ValueError(f"A pause lasts more than 0 seconds, ten years at most: {seconds!r}")
        until = clock.aware(clock.now()) + timedelta(seconds=seconds)
    if until is not None and until.tzinfo is None:
        until = clock.aware(until)
    store.pause_queue(queue, until)
    return until


def resume(queue: str, *, backend: str | None = None) -> bool:
    """Let workers take jobs from ``queue`` again; False if it was not paused."""
    return _store(queue, backend).resume_queue(queue)


def paused(*, backend: str | None = None) -> dict[str, datetime | None]:
    """The queues paused now, each with the end of its pause (None: until resumed)."""
    return worker_store(backend or DEFAULT_TASK_BACKEND_ALIAS).paused_queues()


def clear(queue: str, *, backend: str | None = None) -> int:
    """Delete the jobs of ``queue`` that have not started; return how many."""
    return _store(queue, backend).clear_queue(queue)


def remove_duplicates(queue: str, *, backend: str | None = None) -> int:
    """Delete the not-started jobs of ``queue`` whose call an older one makes; how many."""
    return _store(queue, backend).remove_duplicates(queue)
