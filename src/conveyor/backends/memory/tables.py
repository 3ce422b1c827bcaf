"""The in-process store's tables: one alias's jobs and workers registry, behind one lock.

The tables of one alias are shared by every instance of the backend, as Django's
local-memory cache shares its data by name: ``task_backends`` builds one instance per
thread, and all of them must see the same jobs. Every method but ``clear`` expects the
caller to hold the lock.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections import Counter
from collections.abc import Container, Iterable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from django.tasks import Task
from django.tasks.exceptions import TaskResultDoesNotExist

from conveyor.backends.memory.rows import Row
from conveyor.backends.tasks import due_later
from conveyor.options import Uniqueness
from conveyor.records import FINISHED_STATES, QueueSelector, State, WorkerInfo


class Tables:
    """One alias's jobs and workers registry, and the lock that guards both."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.jobs: dict[str, Row] = {}
        self.by_key: dict[int, Row] = {}
        # Unique keys to the row that took each; stale once that row lets go of its key.
        self.slots: dict[str, Row] = {}
        self.workers: dict[str, WorkerInfo] = {}
        self.schedules: dict[str, Any] = {}  # name -> ``schedules.Kept``
        self.pauses: dict[str, datetime | None] = {}  # paused queue -> until
        self.new_runs: list[str] = []  # jobs schedules added, not announced yet
        self.seq = itertools.count(1)  # 0 marks an empty slot in the worker channel

    def clear(self) -> None:
        """Forget every job and registered worker."""
        with self.lock:
            self.jobs.clear()
            self.by_key.clear()
            self.slots.clear()
            self.workers.clear()
            self.schedules.clear()
            self.pauses.clear()
            self.new_runs.clear()

    # --- jobs -------------------------------------------------------------------------------

    def new_row(
        self,
        task: Task,
        args: Any,
        kwargs: Any,
        now: datetime,
        options: dict[str, Any],
        unique: Uniqueness | None = None,
    ) -> Row:
        """A row for one call of ``task``, not stored yet: scheduled if due later, else ready.

        Built apart from ``add`` so that eager mode can store its jobs only at a commit.
        """
        due = due_later(task, now)
        if unique is not None:
            options = {**options, "unique": unique.stored()}
        return Row(
            seq=next(self.seq),
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
            options=options,
            unique_slot=unique.key if unique else None,
            unique_states=unique.states if unique else "",
        )

    def add(self, row: Row) -> None:
        """Store a row built by ``new_row``."""
        self.jobs[row.id] = row
        self.by_key[row.seq] = row
        if row.unique_slot is not None:
            self.slots[row.unique_slot] = row

    def holder(self, unique: Uniqueness, now: datetime) -> Row | None:
        """The stored job holding ``unique``'s key, if any.

        With a period, a holder enqueued that long ago lets go of its key first.
        """
        row = self.slots.get(unique.key)
        if row is None or row.unique_slot != unique.key or self.jobs.get(row.id) is not row:
            return None
        if unique.period is not None and row.enqueued_at <= now - timedelta(seconds=unique.period):
            row.unique_slot = None
            return None
        return row

    def find(self, result_id: str) -> Row:
        """The row of the job ``result_id``, as ``get_result`` looks it up."""
        try:
            row = self.jobs.get(str(uuid.UUID(str(result_id))))
        except ValueError as e:
            raise TaskResultDoesNotExist(result_id) from e
        if row is None:
            raise TaskResultDoesNotExist(result_id)
        return row

    def rows(self, *states: State) -> list[Row]:
        """Every job in one of ``states``."""
        return [row for row in self.jobs.values() if row.state in states]

    def held(self, worker_id: str, among: Container[tuple[int, str]] | None = None) -> list[Row]:
        """The running jobs leased to ``worker_id``; only deliveries ``among`` these if given."""
        return [
            row
            for row in self.rows(State.RUNNING)
            if row.lease_owner == worker_id and (among is None or (row.seq, row.delivery) in among)
        ]

    def delivered(self, key: int, token: str) -> Row | None:
        """The job ``key``'s row, if the delivery ``token`` still holds it."""
        row = self.by_key.get(key)
        if row is None or row.state is not State.RUNNING or row.delivery != token:
            return None
        return row

    def saved_by(self, key: int, token: str, *states: State) -> bool:
        """Say whether the delivery ``token`` of job ``key`` wrote an outcome in ``states``."""
        row = self.by_key.get(key)
        return row is not None and row.state in states and row.delivery == token

    def counts(
        self, queues: QueueSelector | None, finished_since: datetime | None
    ) -> Counter[tuple[str, str]]:
        """How many jobs each (queue, state) holds, as ``stats`` reports them."""

        def counted(row: Row) -> bool:
            if queues is not None and not queues.allows(row.queue_name):
                return False
            if finished_since is None or not row.state.finished:
                return True
            return row.finished_at is not None and row.finished_at >= finished_since

        return Counter((r.queue_name, str(r.state)) for r in self.jobs.values() if counted(r))

    def prune(self, finished_before: datetime, batch: int) -> tuple[int, bool]:
        """Delete up to ``batch`` jobs finished before then, oldest first; say if more remain."""
        ended = {r.id: r.finished_at for r in self.rows(*FINISHED_STATES) if r.finished_at}
        old = sorted((at, key) for key, at in ended.items() if at < finished_before)
        for _, key in old[:batch]:
            self.remove(key)
        return len(old[:batch]), len(old) > batch

    def remove(self, key: str) -> None:
        """Forget the job ``key``, and the unique key it holds."""
        row = self.jobs.pop(key)
        del self.by_key[row.seq]
        if row.unique_slot is not None and self.slots.get(row.unique_slot) is row:
            del self.slots[row.unique_slot]

    def expire(self, now: datetime, batch: int) -> tuple[int, bool]:
        """Delete up to ``batch`` finished jobs past their retention; say if more remain."""
        due = [r for r in self.rows(*FINISHED_STATES) if r.expires_at and r.expires_at <= now]
        for row in due[:batch]:
            del self.by_key[self.jobs.pop(row.id).seq]
        return len(due[:batch]), len(due) > batch

    def trim(self, task_path: str, keep: int, window: int) -> int:
        """Expire the successes of ``task_path`` from the ``keep``-th newest, ``window`` of them.

        As the database does: a save looks only just past the newest ``keep``.
        """
        successes = [
            (row.finished_at, row.seq, row)
            for row in self.rows(State.SUCCEEDED)
            if row.task_path == task_path and row.finished_at is not None
        ]
        successes.sort(key=lambda kept: kept[:2], reverse=True)
        let_go = 0
        for finished_at, _, row in successes[keep : keep + window]:
            if row.expires_at is None or row.expires_at > finished_at:
                row.expires_at, let_go = finished_at, let_go + 1
        return let_go

    # --- the workers registry ---------------------------------------------------------------

    def register(self, info: WorkerInfo) -> None:
        """Add a worker's row; refuse an id already registered, as the table's key does."""
        if info.id in self.workers:
            raise ValueError(f"Worker {info.id!r} is already registered with {info.backend!r}.")
        self.workers[info.id] = info

    def end_worker(self, worker_id: str, ended: str, now: datetime) -> None:
        """Mark a running worker stopped, saying why."""
        info = self.workers.get(worker_id)
        if info is not None and info.stopped_at is None:
            self.workers[worker_id] = replace(info, stopped_at=now, ended=ended)

    def beat(self, worker_ids: Iterable[str], now: datetime) -> None:
        """Record a heartbeat of each registered worker among ``worker_ids``."""
        for worker_id in set(worker_ids) & self.workers.keys():
            self.workers[worker_id] = replace(self.workers[worker_id], last_beat_at=now)

    def beating(self, worker_id: str | None, now: datetime, lease: timedelta) -> bool:
        """Say whether ``worker_id`` is a running registered worker that beat within a lease."""
        info = self.workers.get(worker_id or "")
        if info is None or info.stopped_at is not None or info.last_beat_at is None:
            return False
        return info.last_beat_at > now - lease


_TABLES: dict[str, Tables] = {}
_TABLES_LOCK = threading.Lock()


def tables_for(alias: str) -> Tables:
    """The tables of ``alias``, shared by every instance of its backend in this process."""
    with _TABLES_LOCK:
        return _TABLES.setdefault(alias, Tables())


def clear_all() -> None:
    """Forget every job and registered worker in this process, of every alias."""
    with _TABLES_LOCK:
        tables = list(_TABLES.values())
    for one in tables:
        one.clear()
