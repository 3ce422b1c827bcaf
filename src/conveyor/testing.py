"""Helpers for tests: run the jobs a test enqueued, in the test's own thread.

from conveyor.testing import run_until_done

class SignupTests(TestCase):
    def test_welcome_email(self):
        result = send_welcome.enqueue(user.pk)
        self.assertEqual(run_until_done().failed, 0)
        result.refresh()
        self.assertEqual(result.status, TaskResultStatus.SUCCESSFUL)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from typing import Any

from django.conf import settings
from django.tasks import DEFAULT_TASK_BACKEND_ALIAS, task_backends
from django.test import override_settings

from conveyor import clock
from conveyor.eager import EagerOptions
from conveyor.records import QueueSelector
from conveyor.runtime.inprocess import InProcessWorker, RunSummary

__all__ = ["RunSummary", "StoreClock", "eager_tasks", "run_until_done", "store_clock"]

EAGER_BACKEND = "conveyor.eager.EagerBackend"


def run_until_done(
    backend: str = DEFAULT_TASK_BACKEND_ALIAS, queues: Iterable[str] | str | None = None
) -> RunSummary:
    """Run ready jobs in this thread, one at a time, until none is ready; say what ran.

    The worker is the one ``manage.py conveyor worker`` runs, with the same signals and
    middleware. It uses this thread's database connection, so inside a ``TestCase`` it
    sees the jobs the test enqueued (not committed yet), and what it writes rolls back
    with the test. Jobs scheduled for later run only once they are due. ``queues`` limits
    the run to jobs on those queues.
    """
    if getattr(task_backends[backend], "runs_inline", False):
        return RunSummary()  # eager mode: every job ran when it was enqueued
    worker = InProcessWorker(backend, _selector(backend, queues), until_done=True)
    worker.run()
    return worker.summary


def _selector(backend: str, queues: Iterable[str] | str | None) -> QueueSelector:
    if queues is None:
        return QueueSelector()
    names = frozenset([queues] if isinstance(queues, str) else queues)
    known = task_backends[backend].queues
    unknown = sorted(names - known) if known else []
    if unknown:
        raise ValueError(
            f"Unknown queue(s) {', '.join(map(repr, unknown))} for backend {backend!r}; its "
            f"QUEUES are {', '.join(map(repr, sorted(known)))}."
        )
    return QueueSelector(include=names)


class StoreClock:
    """The stores' clock inside ``store_clock()``: move it forward instead of sleeping."""

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward: leases run out, scheduled jobs fall due."""
        if seconds < 0:
            raise ValueError(f"The clock only moves forward; got {seconds!r} seconds.")
        clock.set_offset(clock.offset() + seconds)


@contextmanager
def store_clock() -> Iterator[StoreClock]:
    """Let a test move the stores' clock (in this process), and put it back after.

    with store_clock() as clock:
        result = send_reminder.using(run_after=in_an_hour).enqueue()
        clock.advance(3600)
        run_until_done()
    """
    saved = clock.offset()
    try:
        yield StoreClock()
    finally:
        clock.set_offset(saved)


def eager_tasks(
    backend: str = DEFAULT_TASK_BACKEND_ALIAS, *, run_at: str = "enqueue"
) -> override_settings:
    """Run the tasks sent to ``backend`` inline (``EagerBackend``) while this is in effect.

    A decorator or context manager, as Django's ``override_settings`` is. The alias keeps
    its ``QUEUES`` and those of its ``OPTIONS`` eager mode knows (the retry and time-limit
    defaults); a ``DATABASE`` becomes the ``COMMIT_DATABASE`` whose transaction ``run_at``
    ``"commit"`` waits for (the other choice is ``"enqueue"``).

    @eager_tasks()
    def test_signup_sends_welcome(self):
        result = send_welcome.enqueue(42)
        self.assertEqual(result.status, TaskResultStatus.SUCCESSFUL)
    """
    tasks: dict[str, Any] = dict(settings.TASKS)
    current = tasks.get(backend, {})
    known = {f.name.upper() for f in fields(EagerOptions)}
    options = {k: v for k, v in current.get("OPTIONS", {}).items() if k in known}
    if "DATABASE" in current.get("OPTIONS", {}):  # a database backend's: commit waits for it
        options.setdefault("COMMIT_DATABASE", current["OPTIONS"]["DATABASE"])
    tasks[backend] = {
        **{k: v for k, v in current.items() if k == "QUEUES"},
        "BACKEND": EAGER_BACKEND,
        "OPTIONS": {**options, "RUN_AT": run_at},
    }
    return override_settings(TASKS=tasks)
