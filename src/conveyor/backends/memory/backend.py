"""The in-process backend: the store's verbs, over the rows and tables beside it.

Every transition follows the database one (``database/transitions/``) rule for rule; the
tables become dicts behind one lock, and the store's clock is this process's.
"""

from __future__ import annotations

import copy
import heapq
import json
import secrets
import threading
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from django.tasks import Task, TaskResult
from django.tasks.exceptions import TaskResultDoesNotExist
from django.tasks.signals import task_enqueued

from conveyor import clock
from conveyor.backends.base import Call, Held
from conveyor.backends.memory import watching
from conveyor.backends.memory.queues import MemoryQueues
from conveyor.backends.memory.rows import Row, line
from conveyor.backends.memory.schedules import MemorySchedules
from conveyor.backends.memory.tables import clear_all, tables_for
from conveyor.options import Retention, trims
from conveyor.records import (
    PENDING_STATES,
    FailedJob,
    Job,
    Outcome,
    PickupLatency,
    PutBack,
    QueueSelector,
    QueueStats,
    RunningJob,
    State,
    Success,
    Throughput,
    WorkerInfo,
)

OPEN = (*PENDING_STATES, State.RUNNING)
EXPIRED = "its lease expired without a heartbeat (the worker or its machine stopped)"


class MemoryBackend(MemoryQueues, MemorySchedules):
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

    # --- outcomes ---------------------------------------------------------------------------

    def complete(self, successes: Sequence[Success]) -> set[str]:
        # As stored JSON reads back; done first, so a value that is not JSON changes nothing.
        values = [json.loads(json.dumps(o.return_value, allow_nan=False)) for _, o in successes]
        with self._tables.lock:
            for (job, outcome), value in zip(successes, values, strict=True):
                row = self._tables.by_key.get(job.key)
                if row is not None and row.state in OPEN:
                    row.succeed(job.delivery, value, outcome)
            saved = {
                job.id
                for job, _ in successes
                if self._tables.saved_by(job.key, job.delivery, State.SUCCEEDED)
            }
            self._let_go(successes, saved)
            return saved

    def _let_go(self, successes: Sequence[Success], saved: set[str]) -> None:
        """Expire the successes of ``keep_last`` tasks that the saved ones pushed out."""
        for (task_path, keep), window in trims(successes, saved).items():
            self._tables.trim(task_path, keep, window)

    def fail(self, job: Job, outcome: Outcome) -> bool:
        state = State.CANCELLED if outcome.cancelled else State.FAILED
        expires = Retention.from_stored(job.options).expires(outcome.finished_at, succeeded=False)
        return self._end_delivery(
            job,
            outcome,
            (state,),
            state=state,
            finished_at=outcome.finished_at,
            expires_at=expires,
        )

    def retry(self, job: Job, outcome: Outcome) -> bool:
        assert outcome.retry_at is not None
        run_after = clock.now() + max(outcome.retry_at - outcome.finished_at, timedelta(0))
        state = State.READY if run_after <= clock.now() else State.SCHEDULED
        done = (State.SCHEDULED, State.READY)
        return self._end_delivery(
            job, outcome, done, state=state, available_at=run_after, run_after=run_after
        )

    def _end_delivery(
        self, job: Job, outcome: Outcome, done: tuple[State, ...], **changes: Any
    ) -> bool:
        """Close the delivery ``job`` if it still holds the job; True also if it already did."""
        with self._tables.lock:
            row = self._tables.delivered(job.key, job.delivery)
            if row is None:
                return self._tables.saved_by(job.key, job.delivery, *done)
            row.end(outcome.started_at, outcome.error, **changes)
            return True

    # --- giving back and putting back -------------------------------------------------------

    def unclaim(self, jobs: Sequence[Job]) -> int:
        undone = 0
        with self._tables.lock:
            for job in jobs:
                if (row := self._tables.delivered(job.key, job.delivery)) is None:
                    continue
                row.state, row.attempts = State.READY, row.attempts - 1
                row.worker_ids = list(job.worker_ids[:-1])
                row.lease_owner = row.lease_expires_at = None
                undone += 1
        return undone

    def requeue(self, job: Job, reason: str, *, counts_as_attempt: bool = True) -> bool:
        with self._tables.lock:
            row = self._tables.delivered(job.key, job.delivery)
            if row is None:
                return False
            row.put_back(reason, counts_as_attempt, self.max_attempts)
            return True

    def release(
        self,
        worker_id: str,
        reason: str,
        *,
        executing: Collection[tuple[int, str]] = (),
        counts_as_attempt: bool = True,
        finished: Mapping[tuple[int, str], Outcome] | None = None,
    ) -> list[PutBack]:
        done = self._save_finished(worker_id, finished or {})
        with self._tables.lock:
            for row in sorted(self._tables.held(worker_id), key=lambda r: r.seq):
                job = row.record(self.alias)
                if (row.seq, row.delivery) in executing:
                    failed = row.put_back(reason, counts_as_attempt, self.max_attempts)
                    done.append(PutBack(job=job, counted=counts_as_attempt, failed=failed))
                else:
                    row.give_back()
                    done.append(PutBack(job=job, counted=False, failed=False))
        return done

    def _save_finished(
        self, worker_id: str, finished: Mapping[tuple[int, str], Outcome]
    ) -> list[PutBack]:
        with self._tables.lock:
            jobs = [row.record(self.alias) for row in self._tables.held(worker_id, finished)]
        saved = [job for job in jobs if self._save_one(job, finished[job.key, job.delivery])]
        return [PutBack(job=job, counted=False, failed=False, saved=True) for job in saved]

    def _save_one(self, job: Job, outcome: Outcome) -> bool:
        """Save a finished outcome as its delivery would have; False if the store refuses it."""
        if outcome.error is not None:
            return self.retry(job, outcome) if outcome.retry_at else self.fail(job, outcome)
        try:
            return job.id in self.complete([(job, outcome)])
        except (TypeError, ValueError):
            return False  # a value the store refuses: the job runs again, and fails then

    def give_back(self, worker_id: str, deliveries: Collection[tuple[int, str]]) -> list[Job]:
        with self._tables.lock:
            held = self._tables.held(worker_id, deliveries)
            jobs = [row.record(self.alias) for row in held]
            for row in held:
                row.give_back()
        return jobs

    def reclaim(self, worker_ids: Sequence[str]) -> list[Job]:
        now, owners = clock.now(), set(worker_ids)
        with self._tables.lock:
            lapsed = [
                r
                for r in self._tables.rows(State.RUNNING)
                if r.lease_owner in owners
                and r.lease_expires_at
                and r.lease_expires_at < now - self.lease
            ]
            jobs = [row.record(self.alias) for row in lapsed]
            for row in lapsed:
                row.give_back()
        return jobs

    # --- leases and the workers registry ------------------------------------------------

    def heartbeat(self, worker_ids: Sequence[str], deliveries: Sequence[Held] = ()) -> int:
        now, renewed = clock.now(), 0
        with self._tables.lock:
            for key, token, started in deliveries:
                if (row := self._tables.delivered(key, token)) is None:
                    continue
                row.renew(now + self.lease, started)
                renewed += 1
            self._tables.beat(worker_ids, now)
        return renewed

    def reachable(self) -> bool:
        return True

    def recover(self) -> int:
        now = clock.now()
        with self._tables.lock:
            stale = [
                row
                for row in self._tables.rows(State.RUNNING)
                if row.lease_expires_at is not None
                and row.lease_expires_at < now
                and not self._tables.beating(row.lease_owner, now, self.lease)
            ]
            for row in stale:
                row.put_back(EXPIRED, True, self.max_attempts)
            return len(stale)

    def register_worker(self, info: WorkerInfo) -> None:
        now = clock.now()
        row = replace(
            info,
            backend=self.alias,
            supervisor=info.supervisor or None,
            started_at=info.started_at or now,
            last_beat_at=now,
            stopped_at=None,
            ended="",
        )
        with self._tables.lock:
            self._tables.register(row)

    def end_worker(self, worker_id: str, ended: str) -> None:
        now = clock.now()
        with self._tables.lock:
            self._tables.end_worker(worker_id, ended, now)

    def workers(self, *, alive: bool = True) -> list[WorkerInfo]:
        with self._tables.lock:
            rows = [w for w in self._tables.workers.values() if not alive or w.stopped_at is None]
        return sorted(rows, key=lambda w: (w.started_at or datetime.min, w.id))

    # --- operations --------------------------------------------------------------------------

    def cancel(self, result_id: str) -> bool:
        with self._tables.lock:
            row = self._tables.find(result_id)
            if row.state not in PENDING_STATES:
                return False
            row.cancel()
            return True

    def run_now(self, result_ids: Collection[str]) -> int:
        now, moved = clock.now(), 0
        with self._tables.lock:
            for result_id in result_ids:
                try:
                    row = self._tables.find(result_id)
                except TaskResultDoesNotExist:
                    continue
                if row.state is State.SCHEDULED:
                    row.state, row.available_at, row.run_after = State.READY, now, now
                    moved += 1
        return moved

    def request_cancel(self, result_id: str) -> bool:
        with self._tables.lock:
            row = self._tables.find(result_id)
            if row.state is not State.RUNNING:
                return False
            row.cancel_requested = True
            return True

    def cancels(self, deliveries: Collection[tuple[int, str]]) -> set[tuple[int, str]]:
        with self._tables.lock:
            rows = [self._tables.delivered(key, token) for key, token in deliveries]
            return {(row.seq, row.delivery) for row in rows if row and row.cancel_requested}

    def report_progress(self, job: Job, progress: dict[str, Any]) -> bool:
        with self._tables.lock:
            row = self._tables.delivered(job.key, job.delivery)
            if row is None:
                return False
            row.progress = json.loads(json.dumps(progress))
            return True

    def get_progress(self, result_id: str) -> dict[str, Any] | None:
        with self._tables.lock:
            progress = self._tables.find(result_id).progress
            return dict(progress) if progress is not None else None

    def stats(
        self, queues: QueueSelector | None = None, *, finished_since: datetime | None = None
    ) -> QueueStats:
        with self._tables.lock:
            counts = self._tables.counts(queues, finished_since)
        return QueueStats.from_counts(dict(counts))

    def running(self, queues: QueueSelector | None = None, *, limit: int = 100) -> list[RunningJob]:
        with self._tables.lock:
            return watching.running(self._tables, queues, limit)

    def recent_failures(
        self, since: datetime, queues: QueueSelector | None = None, *, limit: int = 20
    ) -> list[FailedJob]:
        with self._tables.lock:
            return watching.recent_failures(self._tables, since, queues, limit)

    def pickup_latency(
        self, since: datetime, queues: QueueSelector | None = None, *, limit: int = 500
    ) -> PickupLatency:
        with self._tables.lock:
            return watching.pickup_latency(self._tables, since, queues, limit)

    def throughput(
        self, since: datetime, *, step: int = 60, queues: QueueSelector | None = None
    ) -> list[Throughput]:
        with self._tables.lock:
            return watching.throughput(self._tables, since, step, queues)

    def prune(self, finished_before: datetime, *, batch: int = 1000, pause: float = 0.01) -> int:
        deleted = 0
        while True:
            with self._tables.lock:
                pruned, more = self._tables.prune(finished_before, batch)
            deleted += pruned
            if not more:
                return deleted
            time.sleep(pause)

    def expire(self, *, batch: int = 1000, pause: float = 0.01, limit: int | None = None) -> int:
        deleted = 0
        while limit is None or deleted < limit:
            size = batch if limit is None else min(batch, limit - deleted)
            with self._tables.lock:
                expired, more = self._tables.expire(clock.now(), size)
            deleted += expired
            if not more:
                break
            if limit is None or deleted < limit:
                time.sleep(pause)
        return deleted

    # --- process life ------------------------------------------------------------------------

    def before_fork(self) -> None:
        """Nothing to close: the store holds no connections."""

    def after_fork(self) -> None:
        """A lock held by another thread at the fork would stay held in the child: renew it."""
        self._tables.lock = threading.Lock()

    def close(self) -> None:
        """Nothing to release."""
