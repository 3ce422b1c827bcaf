"""Eager mode: a backend that runs each task inside ``enqueue()``, or when its transaction commits.

For development and tests. ``EagerBackend`` keeps its jobs as the in-process store does
(``MemoryBackend``), so ``get_result()`` reads them back, and runs each one through the
worker's own runner, middleware and recorder: the same signals, retry policy, hooks, context
and soft time limit. What cannot apply inline:

- No wait: a retry or a ``Snooze`` runs the task again at once, and a ``run_after`` in the
  future is not waited for. A job that snoozes more than ``MAX_SNOOZES`` times fails with
  ``SnoozeLimit``, so a task that always snoozes cannot hold its caller forever.
- No hard ``timeout``: stopping a run means stopping its process, which is the caller's.
- No worker: ``manage.py conveyor worker`` refuses the backend, and nothing is leased or lost.

The module stands beside ``conveyor.backends``, not in it, because it drives the runtime,
which no backend may import.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, ClassVar

from django.conf import settings
from django.db import transaction
from django.tasks import Task, TaskResult

from conveyor import clock
from conveyor.backends.base import Call
from conveyor.backends.memory import MemoryBackend
from conveyor.backends.memory.rows import Row
from conveyor.conf import BackendOptions
from conveyor.exceptions import ConveyorImproperlyConfigured, InvalidTaskOption, SnoozeLimit
from conveyor.options import ConveyorTask
from conveyor.records import Job, Outcome, error_from_exception, new_worker_id
from conveyor.runtime.middleware import Middleware, Retries
from conveyor.runtime.recorder import Recorder
from conveyor.runtime.runner import Finished, Runner

RUN_AT = ("enqueue", "commit")
SAVE_TRIES = 5  # saves of one outcome before it is given up (the store refused it each time)


@dataclass(frozen=True, slots=True, kw_only=True)
class EagerOptions(BackendOptions):
    """Options of ``EagerBackend``, besides the retry and time-limit defaults.

    ``run_at``: ``"enqueue"`` runs each task inside ``enqueue()``; ``"commit"`` runs it once
    the transaction open on ``commit_database`` commits (at once outside a transaction, never
    if it rolls back).
    ``commit_database``: the ``DATABASES`` alias whose transaction ``"commit"`` waits for
    (not ``DATABASE``: no job is kept in a database).
    ``max_snoozes``: times one job may ``Snooze`` inline before it fails.
    """

    run_at: str = "enqueue"
    commit_database: str = "default"
    max_snoozes: int = 100

    ranges: ClassVar[dict[str, tuple[float, float]]] = {
        **BackendOptions.ranges,
        "max_snoozes": (0, 10_000),
    }
    whole_numbers: ClassVar[frozenset[str]] = BackendOptions.whole_numbers | {"max_snoozes"}

    def validate(self, alias: str) -> None:
        """Raise if a value is wrong, naming the option; ``RUN_AT`` takes one of ``RUN_AT``."""
        BackendOptions.validate(self, alias)  # zero-argument super() fails in a slotted class
        where = f"TASKS[{alias!r}]['OPTIONS']"
        if self.run_at not in RUN_AT:
            raise ConveyorImproperlyConfigured(
                f"{where}['RUN_AT'] must be {' or '.join(map(repr, RUN_AT))}, not {self.run_at!r}."
            )
        if self.run_at == "commit" and self.commit_database not in settings.DATABASES:
            raise ConveyorImproperlyConfigured(
                f"{where}['COMMIT_DATABASE'] is {self.commit_database!r}, which DATABASES does "
                "not define; RUN_AT 'commit' waits for a transaction on that database."
            )


class EagerBackend(MemoryBackend):
    """Run each task inline, as a worker would run it, and keep its result."""

    options_class: ClassVar[type[BackendOptions]] = EagerOptions
    runs_inline = True
    supports_defer = True  # run_after is accepted; the task runs at once all the same.
    supports_priority = True  # accepted; calls run in the order they are enqueued.

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        options = self.conveyor_options
        assert isinstance(options, EagerOptions)
        self.run_at = options.run_at
        self.database = options.commit_database
        self.max_snoozes = options.max_snoozes
        self.worker_id = new_worker_id()

    def bulk_enqueue(self, task: Task, calls: Iterable[Call]) -> list[TaskResult]:
        """Check and store the calls, then run each in turn (or once the transaction commits).

        Run at once, the results returned are final; run at commit, they are READY until
        then, and ``refresh()`` reads what became of them.
        """
        if self._at_commit():
            if isinstance(task, ConveyorTask) and task.unique_enabled:
                raise InvalidTaskOption(
                    f"Task {task.module_path} is unique; EagerBackend {self.alias!r} runs tasks "
                    "at commit (RUN_AT='commit'), where it cannot tell a repeat from a new "
                    "job before the transaction ends. Use RUN_AT='enqueue' for unique tasks."
                )
            rows = self._new_rows(task, calls)
            results = self._enqueued(task, rows)
            transaction.on_commit(partial(self._run_rows, task, rows), using=self.database)
            return results
        # Stored as the in-process store stores them (a unique task's repeat gets the job
        # that holds its key, which then has nothing left to run).
        results = super().bulk_enqueue(task, calls)
        return [self._run_job(task, result.id) for result in results]

    def _at_commit(self) -> bool:
        if self.run_at != "commit":
            return False
        return transaction.get_connection(self.database).in_atomic_block

    def _run_rows(self, task: Task, rows: Sequence[Row]) -> None:
        """The transaction committed: store the jobs (they exist from now on) and run them."""
        self._insert(rows)
        for row in rows:
            self._run_job(task, row.id)

    def _run_job(self, task: Task, result_id: str) -> TaskResult:
        """Run the job ``result_id`` until it ends, its retries and snoozes at once."""
        # No ConnectionHygiene: the task runs on the caller's connection, in the caller's
        # transaction, which are the caller's to end.
        hooks: list[Middleware] = [Inline(self.max_snoozes), Retries()]
        runner = Runner(self, hooks)
        recorder = Recorder(self, hooks, _settled)
        while (job := self.claim_one(result_id, self.worker_id)) is not None:
            recorder.add(runner.run_one(job, self._cancel_asked(job)))
            _save(recorder)
        job, state, finished_at, value = self._read(result_id)
        return self.to_task_result(
            job, task, state.django_status, finished_at=finished_at, return_value=value
        )

    def _cancel_asked(self, job: Job) -> Callable[[], bool]:
        return lambda: bool(self.cancels([(job.key, job.delivery)]))


class Inline(Middleware):
    """Run a retry or a snooze again at once, and fail a job that snoozes too often.

    Listed before ``Retries``, so that it sees the outcome ``Retries`` made.
    """

    def __init__(self, max_snoozes: int) -> None:
        self.max_snoozes = max_snoozes
        self.snoozes = 0

    def after_invoke(self, job: Job, task: Task, outcome: Outcome) -> Outcome | None:
        if outcome.retry_at is None:
            return None
        if outcome.error is None:  # a snooze
            self.snoozes += 1
            if self.snoozes > self.max_snoozes:
                return _snoozed_out(outcome, self.max_snoozes)
        return replace(outcome, retry_at=clock.now())


def _snoozed_out(outcome: Outcome, most: int) -> Outcome:
    error = SnoozeLimit(
        f"the task snoozed {most + 1} times; eager mode runs a job again at once at most "
        f"MAX_SNOOZES ({most}) times."
    )
    text = "".join(traceback.format_exception_only(error))
    return replace(outcome, retry_at=None, error=error_from_exception(error, text), exception=error)


def _save(recorder: Recorder) -> None:
    """Save the outcome in hand; one the store keeps refusing is given up, and said so."""
    for _ in range(SAVE_TRIES):
        recorder.flush()
        if not recorder.backlog:
            return
    recorder.give_up_all()


def _settled(item: Finished) -> None:
    """Nothing to free: no slot holds an inline run."""
