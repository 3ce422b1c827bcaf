"""The in-process store: the database backend's twin, for tests and eager mode.

Every transition follows the database one (``database/transitions.py``) rule for rule;
the tables become dicts behind one lock, and the store's clock is this process's. The
data of one alias is shared by every instance of the backend, as Django's local-memory
cache shares its data by name: ``task_backends`` builds one instance per thread, and all
of them must see the same jobs.
"""

from __future__ import annotations

import contextlib
import copy
import heapq
import itertools
import json
import secrets
import threading
import time
import uuid
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from django.tasks import Task, TaskResult
from django.tasks.base import TaskError
from django.tasks.exceptions import TaskResultDoesNotExist
from django.tasks.signals import task_enqueued

from conveyor import clock
from conveyor.backends.base import Call, Held, StoreBackend
from conveyor.backends.tasks import due_later
from conveyor.records import (
    FINISHED_STATES,
    PENDING_STATES,
    Job,
    Outcome,
    PutBack,
    QueueSelector,
    QueueStats,
    State,
    Success,
    WorkerInfo,
    error_from_text,
)

OPEN = (*PENDING_STATES, State.RUNNING)
LOST_ERROR = "conveyor.exceptions.WorkerLost"
EXPIRED = "its lease expired without a heartbeat (the worker or its machine stopped)"


@dataclass(slots=True, kw_only=True)
class _Row:
    """One stored job: the columns of the database table that the transitions use."""

    seq: int  # insertion order, the last tie-break in line (the table's id)
    id: str
    task_path: str
    queue_name: str
    priority: int
    state: State
    args: list[Any]
    kwargs: dict[str, Any]
    enqueued_at: datetime
    run_after: datetime | None
    available_at: datetime
    return_value: Any = None
    errors: list[TaskError] = field(default_factory=list)
    worker_ids: list[str] = field(default_factory=list)
    attempts: int = 0
    lost: int = 0
    started_at: datetime | None = None
    last_attempted_at: datetime | None = None
    finished_at: datetime | None = None
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    delivery: str = ""

    def record(self, backend: str) -> Job:
        """The frozen value the runtime works with; its arguments are the caller's own."""
        return Job(
            id=self.id,
            task_path=self.task_path,
            backend=backend,
            queue_name=self.queue_name,
            priority=self.priority,
            args=copy.deepcopy(self.args),
            kwargs=copy.deepcopy(self.kwargs),
            attempt=self.attempts,
            enqueued_at=self.enqueued_at,
            run_after=self.run_after,
            started_at=self.started_at,
            last_attempted_at=self.last_attempted_at,
            worker_ids=tuple(self.worker_ids),
            errors=tuple(self.errors),
            delivery=self.delivery,
            key=self.seq,
        )


def _line(row: _Row) -> tuple[int, datetime, int]:
    """A ready job's place in line: priority first, then when it became available."""
    return (-row.priority, row.available_at, row.seq)


class _Store:
    """One alias's jobs and workers registry, and the lock that guards both."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.jobs: dict[str, _Row] = {}
        self.by_key: dict[int, _Row] = {}
        self.workers: dict[str, WorkerInfo] = {}
        self.seq = itertools.count(1)  # 0 marks an empty slot in the worker channel


_STORES: dict[str, _Store] = {}
_STORES_LOCK = threading.Lock()


class MemoryBackend(StoreBackend):
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
        with _STORES_LOCK:
            self._store = _STORES.setdefault(alias, _Store())

    def clear(self) -> None:
        """Forget every job and registered worker in this process, of every alias.

        As flushing a test database does: a test that built another alias over the same
        storage leaves nothing behind for the next.
        """
        with _STORES_LOCK:
            stores = list(_STORES.values())
        for store in stores:
            with store.lock:
                store.jobs.clear()
                store.by_key.clear()
                store.workers.clear()

    # --- the django.tasks face ----------------------------------------------------------

    def bulk_enqueue(self, task: Task, calls: Iterable[Call]) -> list[TaskResult]:
        """Store many calls of one task: all of them, or none."""
        encoded = [self.encode_call(task, args, kwargs) for args, kwargs in calls]
        now = clock.now()
        with self._store.lock:
            jobs = [
                self._insert(task, args, kwargs, now).record(self.alias) for args, kwargs in encoded
            ]
        results = [self.to_task_result(job, task, State.READY.django_status) for job in jobs]
        for result in results:
            task_enqueued.send(type(self), task_result=result)
        return results

    def _insert(self, task: Task, args: Any, kwargs: Any, now: datetime) -> _Row:
        due = due_later(task, now)
        row = _Row(
            seq=next(self._store.seq),
            id=str(uuid.uuid4()),
            task_path=task.module_path,
            queue_name=task.queue_name,
            priority=task.priority,
            state=State.SCHEDULED if due else State.READY,
            args=args,
            kwargs=kwargs,
            enqueued_at=now,
            run_after=task.run_after,
            available_at=due or now,
        )
        self._store.jobs[row.id] = row
        self._store.by_key[row.seq] = row
        return row

    def get_result(self, result_id: str) -> TaskResult:
        """Read a result back by id, from any thread of this process."""
        with self._store.lock:
            row = self._find(result_id)
            job, state, finished_at = row.record(self.alias), row.state, row.finished_at
            value = copy.deepcopy(row.return_value)
        return self.stored_result(job, state.django_status, finished_at, value)

    def _find(self, result_id: str) -> _Row:
        try:
            row = self._store.jobs.get(str(uuid.UUID(str(result_id))))
        except ValueError as e:
            raise TaskResultDoesNotExist(result_id) from e
        if row is None:
            raise TaskResultDoesNotExist(result_id)
        return row

    # --- taking work ------------------------------------------------------------------------

    def claim(self, worker_id: str, queues: QueueSelector, limit: int) -> list[Job]:
        queues = queues.narrowed(self.queues)
        if queues.include is not None and not (queues.include - queues.exclude):
            return []
        now, token = clock.now(), secrets.token_hex(8)
        with self._store.lock:
            ready = [r for r in self._rows(State.READY) if queues.allows(r.queue_name)]
            taken = heapq.nsmallest(max(limit, 0), ready, key=_line)
            return [self._deliver(row, worker_id, token, now) for row in taken]

    def _deliver(self, row: _Row, worker_id: str, token: str, now: datetime) -> Job:
        row.state, row.lease_owner, row.delivery = State.RUNNING, worker_id, token
        row.lease_expires_at = now + self.lease
        row.attempts += 1  # started_at and last_attempted_at: when the task really starts
        row.worker_ids.append(worker_id)
        return row.record(self.alias)

    def stage(self, limit: int = 1000) -> int:
        now = clock.now()
        with self._store.lock:
            due = [r for r in self._rows(State.SCHEDULED) if r.available_at <= now]
            staged = heapq.nsmallest(max(limit, 0), due, key=lambda r: r.available_at)
            for row in staged:
                row.state = State.READY
            return len(staged)

    def next_due(self, queues: QueueSelector) -> datetime | None:
        # Backend-wide, as stage() is: any worker may stage any queue's due jobs.
        with self._store.lock:
            return min((r.available_at for r in self._rows(State.SCHEDULED)), default=None)

    def _rows(self, *states: State) -> list[_Row]:
        return [row for row in self._store.jobs.values() if row.state in states]

    # --- outcomes ---------------------------------------------------------------------------

    def complete(self, successes: Sequence[Success]) -> set[str]:
        # As stored JSON reads back; done first, so a value that is not JSON changes nothing.
        values = [json.loads(json.dumps(o.return_value, allow_nan=False)) for _, o in successes]
        with self._store.lock:
            for (job, outcome), value in zip(successes, values, strict=True):
                row = self._store.by_key.get(job.key)
                if row is not None and row.state in OPEN:
                    row.state, row.delivery = State.SUCCEEDED, job.delivery
                    row.return_value, row.finished_at = value, outcome.finished_at
                    row.started_at = row.started_at or outcome.started_at
                    row.last_attempted_at = outcome.started_at
                    row.lease_owner = row.lease_expires_at = None
            return {job.id for job, _ in successes if self._saved_by(job, State.SUCCEEDED)}

    def fail(self, job: Job, outcome: Outcome) -> bool:
        return self._end_delivery(
            job, outcome, (State.FAILED,), state=State.FAILED, finished_at=outcome.finished_at
        )

    def retry(self, job: Job, outcome: Outcome) -> bool:
        run_after = outcome.retry_at
        assert run_after is not None
        state = State.READY if run_after <= clock.now() else State.SCHEDULED
        done = (State.SCHEDULED, State.READY)
        return self._end_delivery(job, outcome, done, state=state, available_at=run_after)

    def _end_delivery(
        self, job: Job, outcome: Outcome, done: tuple[State, ...], **changes: Any
    ) -> bool:
        """Close the delivery ``job`` if it still holds the job; True also if it already did."""
        assert outcome.error is not None
        with self._store.lock:
            row = self._delivered(job)
            if row is None:
                return self._saved_by(job, *done)
            for name, value in changes.items():
                setattr(row, name, value)
            row.started_at = row.started_at or outcome.started_at
            row.last_attempted_at = outcome.started_at
            row.errors.append(outcome.error)
            row.lease_owner = row.lease_expires_at = None
            return True

    def _delivered(self, job: Job) -> _Row | None:
        """The job's row, if ``job`` is still the delivery that holds it."""
        row = self._store.by_key.get(job.key)
        if row is None or row.state is not State.RUNNING or row.delivery != job.delivery:
            return None
        return row

    def _saved_by(self, job: Job, *states: State) -> bool:
        """Say whether the delivery ``job`` already wrote an outcome in ``states``."""
        row = self._store.by_key.get(job.key)
        return row is not None and row.state in states and row.delivery == job.delivery

    def unclaim(self, jobs: Sequence[Job]) -> int:
        undone = 0
        with self._store.lock:
            for job in jobs:
                if (row := self._delivered(job)) is None:
                    continue
                row.state, row.attempts = State.READY, row.attempts - 1
                row.worker_ids = list(job.worker_ids[:-1])
                row.lease_owner = row.lease_expires_at = None
                undone += 1
        return undone

    def requeue(self, job: Job, reason: str, *, counts_as_attempt: bool = True) -> bool:
        with self._store.lock:
            row = self._delivered(job)
            if row is None:
                return False
            self._put_back(row, reason, counts_as_attempt)
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
        with self._store.lock:
            held = [r for r in self._rows(State.RUNNING) if r.lease_owner == worker_id]
            for row in sorted(held, key=lambda r: r.seq):
                job = row.record(self.alias)
                if (row.seq, row.delivery) in executing:
                    failed = self._put_back(row, reason, counts_as_attempt)
                    done.append(PutBack(job=job, counted=counts_as_attempt, failed=failed))
                else:
                    self._give_back(row)
                    done.append(PutBack(job=job, counted=False, failed=False))
        return done

    def _save_finished(
        self, worker_id: str, finished: Mapping[tuple[int, str], Outcome]
    ) -> list[PutBack]:
        with self._store.lock:
            jobs = [
                row.record(self.alias)
                for row in self._rows(State.RUNNING)
                if row.lease_owner == worker_id and (row.seq, row.delivery) in finished
            ]
        saved: set[str] = set()
        for job in jobs:  # a value the store refuses: that job runs again, and fails then
            with contextlib.suppress(TypeError, ValueError):
                saved |= self.complete([(job, finished[job.key, job.delivery])])
        return [
            PutBack(job=job, counted=False, failed=False, saved=True)
            for job in jobs
            if job.id in saved
        ]

    def give_back(self, worker_id: str, deliveries: Collection[tuple[int, str]]) -> list[Job]:
        with self._store.lock:
            held = [
                r
                for r in self._rows(State.RUNNING)
                if r.lease_owner == worker_id and (r.seq, r.delivery) in deliveries
            ]
            jobs = [row.record(self.alias) for row in held]
            for row in held:
                self._give_back(row)
        return jobs

    def reclaim(self, worker_ids: Sequence[str]) -> list[Job]:
        now, owners = clock.now(), set(worker_ids)
        with self._store.lock:
            lapsed = [
                r
                for r in self._rows(State.RUNNING)
                if r.lease_owner in owners
                and r.lease_expires_at
                and r.lease_expires_at < now - self.lease
            ]
            jobs = [row.record(self.alias) for row in lapsed]
            for row in lapsed:
                self._give_back(row)
        return jobs

    def _give_back(self, row: _Row) -> None:
        """Undo a delivery that never started: uncounted, in its place in line."""
        row.state, row.attempts = State.READY, row.attempts - 1
        row.worker_ids = row.worker_ids[:-1]
        row.lease_owner = row.lease_expires_at = None

    def _put_back(self, row: _Row, reason: str, counts: bool) -> bool:
        """Requeue a delivery cut short; fail the job once it was lost ``max_attempts`` times.

        Return whether the job was failed.
        """
        row.lost += 1 if counts else 0
        failed = counts and row.lost >= self.max_attempts
        if failed:
            reason = (
                f"{reason}; the job was lost {row.lost} times (the most allowed is "
                f"{self.max_attempts}) and is given up."
            )
            row.state, row.finished_at = State.FAILED, clock.now()
        else:
            row.state = State.READY
        row.errors.append(error_from_text(LOST_ERROR, reason))
        row.lease_owner = row.lease_expires_at = None
        return failed

    # --- leases and the workers registry ------------------------------------------------

    def heartbeat(self, worker_ids: Sequence[str], deliveries: Sequence[Held] = ()) -> int:
        now, owners = clock.now(), set(worker_ids)
        renewed = 0
        with self._store.lock:
            for key, token, started in deliveries:
                row = self._store.by_key.get(key)
                if row is None or row.state is not State.RUNNING or row.delivery != token:
                    continue
                row.lease_expires_at = now + self.lease
                if started is not None:
                    row.started_at = row.started_at or started
                    row.last_attempted_at = started
                renewed += 1
            for worker_id in owners & self._store.workers.keys():
                self._store.workers[worker_id] = replace(
                    self._store.workers[worker_id], last_beat_at=now
                )
        return renewed

    def reachable(self) -> bool:
        return True

    def recover(self) -> int:
        now = clock.now()
        with self._store.lock:
            stale = [
                row
                for row in self._rows(State.RUNNING)
                if row.lease_expires_at is not None
                and row.lease_expires_at < now
                and not self._beating(row.lease_owner, now)
            ]
            for row in stale:
                self._put_back(row, EXPIRED, True)
            return len(stale)

    def _beating(self, worker_id: str | None, now: datetime) -> bool:
        """Say whether ``worker_id`` is a running registered worker that beat within a lease."""
        info = self._store.workers.get(worker_id or "")
        if info is None or info.stopped_at is not None or info.last_beat_at is None:
            return False
        return info.last_beat_at > now - self.lease

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
        with self._store.lock:
            if info.id in self._store.workers:  # the table's primary key refuses it too
                raise ValueError(f"Worker {info.id!r} is already registered with {self.alias!r}.")
            self._store.workers[info.id] = row

    def end_worker(self, worker_id: str, ended: str) -> None:
        now = clock.now()
        with self._store.lock:
            info = self._store.workers.get(worker_id)
            if info is not None and info.stopped_at is None:
                self._store.workers[worker_id] = replace(info, stopped_at=now, ended=ended)

    def workers(self, *, alive: bool = True) -> list[WorkerInfo]:
        with self._store.lock:
            rows = [w for w in self._store.workers.values() if not alive or w.stopped_at is None]
        return sorted(rows, key=lambda w: (w.started_at or datetime.min, w.id))

    # --- operations --------------------------------------------------------------------------

    def cancel(self, result_id: str) -> bool:
        with self._store.lock:
            row = self._find(result_id)
            if row.state not in PENDING_STATES:
                return False
            row.state, row.finished_at = State.CANCELLED, clock.now()
            row.errors.append(
                error_from_text("conveyor.exceptions.Cancelled", "the job was cancelled")
            )
            return True

    def stats(
        self, queues: QueueSelector | None = None, *, finished_since: datetime | None = None
    ) -> QueueStats:
        def counted(row: _Row) -> bool:
            if queues is not None and not queues.allows(row.queue_name):
                return False
            if finished_since is None or not row.state.finished:
                return True
            return row.finished_at is not None and row.finished_at >= finished_since

        with self._store.lock:
            counts = Counter(
                (r.queue_name, str(r.state)) for r in self._store.jobs.values() if counted(r)
            )
        return QueueStats.from_counts(dict(counts))

    def prune(self, finished_before: datetime, *, batch: int = 1000, pause: float = 0.01) -> int:
        deleted = 0
        while True:
            with self._store.lock:
                ended = {r.id: r.finished_at for r in self._rows(*FINISHED_STATES) if r.finished_at}
                old = sorted((at, key) for key, at in ended.items() if at < finished_before)
                for _, key in old[:batch]:
                    del self._store.by_key[self._store.jobs.pop(key).seq]
            deleted += len(old[:batch])
            if len(old) <= batch:
                return deleted
            time.sleep(pause)

    # --- process life ------------------------------------------------------------------------

    def before_fork(self) -> None:
        """Nothing to close: the store holds no connections."""

    def after_fork(self) -> None:
        """A lock held by another thread at the fork would stay held in the child: renew it."""
        self._store.lock = threading.Lock()

    def close(self) -> None:
        """Nothing to release."""
