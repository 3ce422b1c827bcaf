"""The in-process store's rows: one stored job each, and the writes every verb shares.

A row holds the columns of the database table that the transitions use; its methods are
the changes those transitions make to one row. The caller holds the tables' lock.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.tasks.base import TaskError

from conveyor import clock
from conveyor.options import UNIQUE_STATES, Retention
from conveyor.records import CANCELLED_ERROR, Job, Outcome, State, error_from_text

LOST_ERROR = "conveyor.exceptions.WorkerLost"


@dataclass(slots=True, kw_only=True)
class Row:
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
    options: dict[str, Any] = field(default_factory=dict)
    cancel_requested: bool = False
    progress: dict[str, Any] | None = None
    expires_at: datetime | None = None
    unique_slot: str | None = None  # the unique key, while the job keeps others out
    unique_states: str = ""

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
            options=copy.deepcopy(self.options),
        )

    def deliver(self, worker_id: str, token: str, expires: datetime) -> None:
        """Lease the job to ``worker_id`` under the delivery ``token``, counting an attempt."""
        self.state, self.lease_owner, self.delivery = State.RUNNING, worker_id, token
        self.lease_expires_at = expires
        self.attempts += 1  # started_at and last_attempted_at: when the task really starts
        self.worker_ids.append(worker_id)
        self.keep_slot()

    def keep_slot(self) -> None:
        """Let go of the unique key once the job's state is one its choice does not cover.

        A key let go is never taken back: another job may hold it by then.
        """
        if self.unique_slot is not None and self.state not in UNIQUE_STATES[self.unique_states]:
            self.unique_slot = None

    def ran(self, started: datetime) -> None:
        """Note that the task started at ``started``: its first start is kept."""
        self.started_at = self.started_at or started
        self.last_attempted_at = started

    def renew(self, expires: datetime, started: datetime | None) -> None:
        """Extend the lease of this delivery, noting its start once the task has one."""
        self.lease_expires_at = expires
        if started is not None:
            self.ran(started)

    def succeed(self, delivery: str, value: Any, outcome: Outcome) -> None:
        """Record the success of ``delivery``, which ran in ``outcome``."""
        self.state, self.delivery = State.SUCCEEDED, delivery
        self.return_value, self.finished_at = value, outcome.finished_at
        self.expires_at = self.expiry(outcome.finished_at, succeeded=True)
        self.ran(outcome.started_at)
        self.lease_owner = self.lease_expires_at = None
        self.keep_slot()

    def expiry(self, finished_at: datetime, *, succeeded: bool) -> datetime | None:
        """When this job, finished at ``finished_at``, may be deleted; None: it is kept."""
        return Retention.from_stored(self.options).expires(finished_at, succeeded=succeeded)

    def end(self, started: datetime, error: TaskError | None, **changes: Any) -> None:
        """Close this delivery with the error its attempt raised (if any), applying ``changes``."""
        for name, value in changes.items():
            setattr(self, name, value)
        self.ran(started)
        if error is not None:
            self.errors.append(error)
        self.lease_owner = self.lease_expires_at = None
        self.keep_slot()

    def cancel(self) -> None:
        """End a job that has not started as cancelled."""
        self.state, self.finished_at = State.CANCELLED, clock.now()
        self.expires_at = self.expiry(self.finished_at, succeeded=False)
        self.errors.append(error_from_text(CANCELLED_ERROR, "the job was cancelled"))
        self.keep_slot()

    def give_back(self) -> None:
        """Undo a delivery that never started: uncounted, in its place in line."""
        self.state, self.attempts = State.READY, self.attempts - 1
        self.worker_ids = self.worker_ids[:-1]
        self.lease_owner = self.lease_expires_at = None

    def put_back(self, reason: str, counts: bool, max_attempts: int) -> bool:
        """Requeue a delivery cut short; fail the job once it was lost ``max_attempts`` times.

        A job's own ``max_attempts`` (stored with it) wins. Return whether it was failed.
        """
        self.lost += 1 if counts else 0
        max_attempts = int(self.options.get("max_attempts", max_attempts))
        failed = counts and self.lost >= max_attempts
        if failed:
            reason = (
                f"{reason}; the job was lost {self.lost} times (the most allowed is "
                f"{max_attempts}) and is given up."
            )
            self.state, self.finished_at = State.FAILED, clock.now()
            self.expires_at = self.expiry(self.finished_at, succeeded=False)
        else:
            self.state = State.READY
        self.errors.append(error_from_text(LOST_ERROR, reason))
        self.lease_owner = self.lease_expires_at = None
        self.keep_slot()
        return failed


def line(row: Row) -> tuple[int, datetime, int]:
    """A ready job's place in line: priority first, then when it became available."""
    return (-row.priority, row.available_at, row.seq)
