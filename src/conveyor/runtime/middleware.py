"""Behaviour around each invocation, as small middleware with named hooks."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import timedelta

from django.db import connections
from django.tasks import Task, TaskResult, TaskResultStatus
from django.utils.module_loading import import_string

from conveyor.exceptions import Cancelled, Retry, Snooze, WorkerLost
from conveyor.options import ConveyorTask, RetryPolicy, class_path
from conveyor.records import Job, Outcome

logger = logging.getLogger(__name__)


class Middleware:
    """A hook set the worker calls around every job; override what you need."""

    def before_invoke(self, job: Job, task: Task) -> None:
        """Run just before the task is called."""

    def after_invoke(self, job: Job, task: Task, outcome: Outcome) -> Outcome | None:
        """Run just after the task returned or raised, before the outcome is saved.

        Return a replaced outcome (to retry a failure, say), or None to keep it.
        """
        return None

    def after_record(self, job: Job, task: Task, outcome: Outcome, recorded: bool) -> None:
        """Run once the outcome was saved (``recorded``) or refused as stale."""


class ConnectionHygiene(Middleware):
    """Keep each thread's database connections open across tasks, but never broken.

    Closing after every task (what ``CONN_MAX_AGE=0`` does for requests) would make each
    task pay for a new connection. Instead a transaction a task left open is rolled back,
    and a connection that errored and no longer answers is closed, to reconnect on use.
    """

    def after_invoke(self, job: Job, task: Task, outcome: Outcome) -> Outcome | None:
        for conn in connections.all(initialized_only=True):
            if conn.connection is None:
                continue
            if not conn.in_atomic_block and not conn.get_autocommit():
                logger.warning(
                    "Task %s left a transaction open on %r; rolling it back.",
                    job.task_path,
                    conn.alias,
                )
                conn.rollback()
                conn.set_autocommit(True)
            if conn.errors_occurred:
                conn.errors_occurred = False
                if not conn.is_usable():
                    conn.close()
        return None


class Retries(Middleware):
    """Turn a failure into a retry while the job's stored retry policy allows it.

    A task may also raise ``Retry(delay)`` (a failed try, counted) or ``Snooze(delay)`` (run
    again later, no failure counted).
    """

    def after_invoke(self, job: Job, task: Task, outcome: Outcome) -> Outcome | None:
        error = outcome.exception
        if outcome.error is None or error is None:
            return None
        if isinstance(error, Snooze):
            due = outcome.finished_at + timedelta(seconds=error.delay)
            return replace(outcome, error=None, retry_at=due)
        delay = retry_delay(job, error)
        if delay is None:
            return None
        # Kept as a delay after the run ended: the store starts it on its own clock.
        return replace(outcome, retry_at=outcome.finished_at + timedelta(seconds=delay))


def retry_delay(job: Job, error: BaseException) -> float | None:
    """Seconds until ``job`` is tried again after this run raised ``error``; None: fail it."""
    if isinstance(error, Cancelled):
        return None  # asked to stop: never tried again
    policy = RetryPolicy.from_stored(job.options.get("retry", {}))
    failures = 1 + sum(1 for e in job.errors if e.exception_class_path not in NOT_FAILURES)
    if failures > policy.retries:
        return None
    if isinstance(error, Retry):
        return policy.delay(failures) if error.delay is None else error.delay
    return policy.delay(failures) if policy.retries_error(error) else None


# Errors a job's history holds that were not failures of its task.
NOT_FAILURES = frozenset({class_path(WorkerLost)})


def run_hooks(result: TaskResult) -> None:
    """Call the task's ``on_success``/``on_failure`` then ``on_complete`` hooks.

    Only with a stored final result; a hook that fails is logged and changes nothing.
    """
    task = result.task
    if not isinstance(task, ConveyorTask):
        return
    succeeded = result.status == TaskResultStatus.SUCCESSFUL
    for name in ("on_success" if succeeded else "on_failure", "on_complete"):
        hook = getattr(task, name)
        if hook is None:
            continue
        try:
            (import_string(hook) if isinstance(hook, str) else hook)(result)
        except Exception:
            logger.exception(
                "The %s hook of task %s failed for job %s; the job's outcome stands.",
                name,
                task.module_path,
                result.id,
            )


DEFAULT_MIDDLEWARE: tuple[type[Middleware], ...] = (Retries, ConnectionHygiene)
