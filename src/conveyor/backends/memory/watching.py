"""What a monitor reads from the in-process store, as the database answers it.

Each function reads one alias's tables; the caller holds their lock.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime

from conveyor import clock
from conveyor.backends.memory.rows import Row
from conveyor.backends.memory.tables import Tables
from conveyor.records import (
    FINISHED_STATES,
    FailedJob,
    PickupLatency,
    QueueSelector,
    RunningJob,
    State,
    Throughput,
)


def _in(queues: QueueSelector | None, row: Row) -> bool:
    return queues is None or queues.allows(row.queue_name)


def running(tables: Tables, queues: QueueSelector | None, limit: int) -> list[RunningJob]:
    """The running jobs, longest running first; those not started yet last."""
    rows = [row for row in tables.rows(State.RUNNING) if _in(queues, row)]
    rows.sort(
        key=lambda r: (r.last_attempted_at is None, r.last_attempted_at or datetime.min, r.seq)
    )
    return [
        RunningJob(
            id=row.id,
            task_path=row.task_path,
            queue_name=row.queue_name,
            worker_id=row.lease_owner or "",
            attempt=row.attempts,
            enqueued_at=row.enqueued_at,
            started_at=row.last_attempted_at,
            progress=copy.deepcopy(row.progress),
        )
        for row in rows[: max(limit, 0)]
    ]


def recent_failures(
    tables: Tables, since: datetime, queues: QueueSelector | None, limit: int
) -> list[FailedJob]:
    """Failed and cancelled jobs that ended since ``since``, newest first."""
    rows = [
        row
        for row in tables.rows(State.FAILED, State.CANCELLED)
        if row.finished_at is not None and row.finished_at >= since and _in(queues, row)
    ]
    rows.sort(key=lambda r: (r.finished_at, r.seq), reverse=True)
    return [_failed(row) for row in rows[: max(limit, 0)]]


def _failed(row: Row) -> FailedJob:
    assert row.finished_at is not None
    error_class, message = FailedJob.last_error(row.errors)
    return FailedJob(
        id=row.id,
        task_path=row.task_path,
        queue_name=row.queue_name,
        finished_at=row.finished_at,
        attempt=row.attempts,
        cancelled=row.state is State.CANCELLED,
        error_class=error_class,
        message=message,
    )


def pickup_latency(
    tables: Tables, since: datetime, queues: QueueSelector | None, limit: int
) -> PickupLatency:
    """The waits of jobs that started since ``since``: running ones, and finished ones."""

    def started(row: Row) -> bool:
        return (
            row.last_attempted_at is not None
            and row.last_attempted_at >= since
            and _in(queues, row)
        )

    running = [row for row in tables.rows(State.RUNNING) if started(row)][: max(limit, 0)]
    finished = [
        row
        for row in tables.rows(*FINISHED_STATES)
        if row.finished_at is not None and row.finished_at >= since and started(row)
    ]
    finished.sort(key=lambda r: (r.finished_at, r.seq), reverse=True)
    return PickupLatency.of(
        (row.last_attempted_at - row.available_at).total_seconds()
        for row in [*running, *finished[: max(limit, 0)]]
        if row.last_attempted_at is not None
    )


def throughput(
    tables: Tables, since: datetime, step: int, queues: QueueSelector | None
) -> list[Throughput]:
    """Finished jobs counted per ``step`` seconds, oldest first."""
    counts: dict[float, dict[str, int]] = {}
    for row in tables.rows(*FINISHED_STATES):
        if row.finished_at is None or row.finished_at < since or not _in(queues, row):
            continue
        start = Throughput.bucket(clock.aware(row.finished_at), step)
        per = counts.setdefault(start, {"succeeded": 0, "failed": 0})
        per["succeeded" if row.state == State.SUCCEEDED else "failed"] += 1
    return [
        Throughput(start=datetime.fromtimestamp(start, UTC), **counts[start])
        for start in sorted(counts)
    ]
