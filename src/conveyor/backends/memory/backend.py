"""The in-process backend: the store's verbs, over the rows and tables beside it.

Every transition follows the database one (``database/transitions/``) rule for rule; the
tables become dicts behind one lock, and the store's clock is this process's. Here are
enqueueing, results and claims; the other verbs come from the mixins beside it
(``deliveries``, ``controls``, ``housekeeping``, ``queues``, ``schedules``).
"""

from __future__ import annotations

import copy
import heapq
import secrets
import threading
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from django.tasks import Task, TaskResult
from django.tasks.signals import task_enqueued

from conveyor import clock
from conveyor.backends.base import Call
from conveyor.backends.memory.controls import MemoryControls
from conveyor.backends.memory.deliveries import MemoryDeliveries
from conveyor.backends.memory.housekeeping import MemoryHousekeeping
from conveyor.backends.memory.queues import MemoryQueues
from conveyor.backends.memory.rows import Row, line
from conveyor.backends.memory.schedules import MemorySchedules
from conveyor.backends.memory.tables import clear_all, tables_for
from conveyor.records import Job, QueueSelector, State


class MemoryBackend(
    MemoryDeliveries, MemoryControls, MemoryHousekeeping, MemoryQueues, MemorySchedules
):
    """Keep jobs in this process; a worker thread in the same process can run them."""

    supports_defer = True  # run_after is honoured.
    supports_async_task = True  # async def tasks run on an event loop in the worker.
    supports_get_result = True  # any thread of this process can read a result back.
    supports_priority = True  # higher priority is claimed first.
    supports_wakeup = False  # idle workers poll.

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        self.lease = timedelta(seconds=self.conveyor_options.lease)
        self.max_attempts = self.conveyor_options.max_attempts
        self._tables = tables_for(alias)

    def clear(self) -> None:
        """Forget every job and registered worker in this process, of every alias.

        As flushing a test database does: a test that built another alias over the same
        storage leaves nothing behind for the next.
        """
        clear_all()

    # --- the django.tasks face ----------------------------------------------------------

    def bulk_enqueue(self, task: Task, calls: Iterable[Call]) -> list[TaskResult]:
        """Store many calls of one task: all of them, or none.

        A call of a unique task whose key a stored job holds adds nothing and gets that
        job's result.
        """
        encoded = [self.encode_call(task, args, kwargs) for args, kwargs in calls]
        unique = [self.uniqueness(task, call) for call in encoded]
        now, options = clock.now(), self.job_options(task)
        results, added = [], []
        with self._tables.lock:
            for (args, kwargs), how in zip(encoded, unique, strict=True):
                held = self._tables.holder(how, now) if how is not None else None
                if held is not None:
                    job, state, finished_at = held.record(self.alias), held.state, held.finished_at
                    value = copy.deepcopy(held.return_value)
                    results.append((job, state.django_status, finished_at, value))
                    continue
                row = self._tables.new_row(task, args, kwargs, now, options, how)
                self._tables.add(row)
                added.append(row.id)
                results.append((row.record(self.alias), State.READY.django_status, None, None))
        stored = [
            self.to_task_result(job, task, status)
            if job.id in added
            else self.stored_result(job, status, finished_at, value)
            for job, status, finished_at, value in results
        ]
        for result in stored:
            if result.id in added:
                task_enqueued.send(type(self), task_result=result)
        return stored

    def _new_rows(self, task: Task, calls: Iterable[Call]) -> list[Row]:
        """Rows for ``calls`` of ``task``, their arguments checked and encoded; not stored.

        For eager mode at a commit, which stores them then; uniqueness is not applied.
        """
        encoded = [self.encode_call(task, args, kwargs) for args, kwargs in calls]
        now, options = clock.now(), self.job_options(task)
        with self._tables.lock:
            return [
                self._tables.new_row(task, args, kwargs, now, options) for args, kwargs in encoded
            ]

    def _insert(self, rows: Sequence[Row]) -> None:
        """Store rows built by ``_new_rows``, all together."""
        with self._tables.lock:
            for row in rows:
                self._tables.add(row)

    def _enqueued(self, task: Task, rows: Sequence[Row]) -> list[TaskResult]:
        """The results of newly enqueued ``rows``, once ``task_enqueued`` was sent for each."""
        with self._tables.lock:
            jobs = [row.record(self.alias) for row in rows]
        results = [self.to_task_result(job, task, State.READY.django_status) for job in jobs]
        for result in results:
            task_enqueued.send(type(self), task_result=result)
        return results

    def get_result(self, result_id: str) -> TaskResult:
        """Read a result back by id, from any thread of this process."""
        job, state, finished_at, value = self._read(result_id)
        return self.stored_result(job, state.django_status, finished_at, value)

    def _read(self, result_id: str) -> tuple[Job, State, datetime | None, Any]:
        """The job ``result_id``, its state, when it finished and its return value."""
        with self._tables.lock:
            row = self._tables.find(result_id)
            job, state, finished_at = row.record(self.alias), row.state, row.finished_at
            return job, state, finished_at, copy.deepcopy(row.return_value)

    # --- taking work ------------------------------------------------------------------------

    def claim(self, worker_id: str, queues: QueueSelector, limit: int) -> list[Job]:
        queues = queues.narrowed(self.queues)
        if queues.include is not None and not (queues.include - queues.exclude):
            return []
        now, token = clock.now(), secrets.token_hex(8)
        with self._tables.lock:
            ready = [r for r in self._tables.rows(State.READY) if queues.allows(r.queue_name)]
            taken = heapq.nsmallest(max(limit, 0), ready, key=line)
            for row in taken:
                row.deliver(worker_id, token, now + self.lease)
            return [row.record(self.alias) for row in taken]

    def claim_one(self, result_id: str, worker_id: str) -> Job | None:
        """Lease the job ``result_id`` to ``worker_id`` now, even if it is due later.

        None if the job is not waiting to run (it finished, runs elsewhere, or waits on
        other jobs). Eager mode runs each job this way, skipping any wait.
        """
        now, token = clock.now(), secrets.token_hex(8)
        with self._tables.lock:
            row = self._tables.find(result_id)
            if row.state not in (State.READY, State.SCHEDULED):
                return None
            row.deliver(worker_id, token, now + self.lease)
            return row.record(self.alias)

    def stage(self, limit: int = 1000) -> int:
        now = clock.now()
        with self._tables.lock:
            due = [r for r in self._tables.rows(State.SCHEDULED) if r.available_at <= now]
            staged = heapq.nsmallest(max(limit, 0), due, key=lambda r: r.available_at)
            for row in staged:
                row.state = State.READY
            return len(staged)

    def next_due(self, queues: QueueSelector) -> datetime | None:
        # Backend-wide, as stage() is: any worker may stage any queue's due jobs.
        with self._tables.lock:
            return min((r.available_at for r in self._tables.rows(State.SCHEDULED)), default=None)

    # --- process life ------------------------------------------------------------------------

    def reachable(self) -> bool:
        return True

    def before_fork(self) -> None:
        """Nothing to close: the store holds no connections."""

    def after_fork(self) -> None:
        """A lock held by another thread at the fork would stay held in the child: renew it."""
        self._tables.lock = threading.Lock()

    def close(self) -> None:
        """Nothing to release."""
