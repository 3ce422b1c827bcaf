"""Queue administration: pause, resume, clear and deduplicate a backend's queues.

A paused queue keeps its jobs (they can still be enqueued) but workers take none from it
until it is resumed or its pause ends; each worker process looks at the pauses about once
a second. Clearing deletes the jobs that have not started; deduplicating deletes each such
job whose call (task and arguments) an older one makes already.
"""

from __future__ import annotations

import math
from datetime import datetime

from django.tasks import DEFAULT_TASK_BACKEND_ALIAS
from django.utils import timezone

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
    dry_run: bool = False,
) -> datetime | None:
    """Pause ``queue`` until resumed, until a moment, or for some seconds; return the end.

    A naive ``until`` is read in ``TIME_ZONE``; ``seconds`` count on the store's clock.
    With ``dry_run``, only check the arguments (raise ``ValueError`` naming a bad one).
    """
    store = _store(queue, backend)
    if until is not None and seconds is not None:
        raise ValueError("Pause a queue until= a moment or for seconds=, not both.")
    if seconds is not None:
        number = isinstance(seconds, int | float) and not isinstance(seconds, bool)
        # Compared first: math.isfinite() overflows on a whole number past a float's range.
        if not number or not 0 < seconds <= MAX_PAUSE or not math.isfinite(seconds):
            raise ValueError(
                f"seconds= must be a number more than 0, ten years at most, not {seconds!r}."
            )
    if until is not None:
        if not isinstance(until, datetime):
            raise ValueError(f"until= must be a datetime, not {until!r}.")
        if timezone.is_naive(until):
            until = timezone.make_aware(until)
        if until <= timezone.now():
            raise ValueError(f"until= must be later than now, not {until.isoformat()}.")
    if dry_run:
        return until
    return store.pause_queue(queue, until, seconds=seconds)


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
