"""Reads and upkeep: a result, counts, what a monitor shows, pruning, expiry, a probe."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from django.tasks.base import TaskError

from conveyor import clock
from conveyor.backends.database.models import Job
from conveyor.backends.database.store import (
    FINISHED,
    IS_READY,
    IS_RUNNING,
    IS_SCHEDULED,
    RESULT_COLUMNS,
    TABLE,
    Store,
)
from conveyor.records import (
    FINISHED_STATES,
    FailedJob,
    PickupLatency,
    QueueSelector,
    QueueStats,
    RunningJob,
    State,
    Throughput,
)

QUARTER_HOUR = 900  # seconds: every time zone is a whole number of them from UTC
FIND = f"SELECT {RESULT_COLUMNS} FROM {TABLE} WHERE backend_name = %s AND uuid = %s"


def find(store: Store, result_id: uuid.UUID) -> dict[str, Any] | None:
    """The job stored under ``result_id`` (its ``RESULT_COLUMNS`` by name), or None; what
    every result poll reads."""
    key = Job._meta.get_field("uuid").get_db_prep_value(result_id, store.connection)
    rows = store.values(FIND, [store.backend, key], RESULT_COLUMNS)
    return rows[0] if rows else None


def reachable(store: Store) -> bool:
    return bool(store.fetch("SELECT 1"))


def _scope(store: Store, queues: QueueSelector | None) -> tuple[str, list[Any]]:
    """``backend_name = %s AND queue_name ...``: this backend's rows in ``queues``."""
    where, params = "backend_name = %s", [store.backend]
    if queues is not None and queues.include is not None:
        marks = ", ".join(["%s"] * len(queues.include))
        where += f" AND queue_name IN ({marks})"
        params += sorted(queues.include)
    if queues is not None and queues.exclude:
        marks = ", ".join(["%s"] * len(queues.exclude))
        where += f" AND queue_name NOT IN ({marks})"
        params += sorted(queues.exclude)
    return where, params


def stats(store: Store, queues: QueueSelector | None, since: datetime | None) -> QueueStats:
    """Count jobs by queue and state, each group through the index that holds it."""
    where, params = _scope(store, queues)
    finished = f"state IN {FINISHED}"
    finished_params = list(params)
    if since is not None:
        finished += " AND finished_at >= %s"
        finished_params.append(store.time(since))
    groups = [
        (IS_READY, params),
        (IS_SCHEDULED, params),
        (IS_RUNNING, params),  # no job waits yet: workflows will add the waiting rows' index
        (finished, finished_params),
    ]
    sql = " UNION ALL ".join(
        f"SELECT queue_name, state, COUNT(*) FROM {TABLE} WHERE {where} AND {condition} "
        "GROUP BY queue_name, state"
        for condition, _ in groups
    )
    rows = store.fetch(sql, [p for _, group in groups for p in group])
    return QueueStats.from_counts({(queue, state): count for queue, state, count in rows})


def throughput(
    store: Store, since: datetime, step: int, queues: QueueSelector | None
) -> list[Throughput]:
    """Finished jobs counted per ``step`` seconds: grouped by the database, finely enough
    that each group falls in one interval, then gathered here.

    The database groups by the time as stored, which is local time with ``USE_TZ`` off:
    every time zone is a whole number of quarter hours from UTC, so groups of a divisor of
    15 minutes fall each in one interval (but in the hour a clock goes back, which is read
    as the first of the two).
    """
    where, params = _scope(store, queues)
    fine = math.gcd(int(step), QUARTER_HOUR)
    sql = (
        f"SELECT {store.dialect.epoch_step('finished_at', fine)} AS bucket, state, COUNT(*), "
        f"MIN(finished_at) FROM {TABLE} WHERE {where} AND state IN {FINISHED} "
        "AND finished_at >= %s GROUP BY bucket, state"
    )
    counts: dict[float, dict[str, int]] = {}
    for _, state, count, earliest in store.fetch(sql, [*params, store.time(since)]):
        moment = datetime.fromisoformat(earliest) if isinstance(earliest, str) else earliest
        start = Throughput.bucket(clock.aware(moment), step)
        kind = "succeeded" if state == State.SUCCEEDED else "failed"
        per = counts.setdefault(start, {"succeeded": 0, "failed": 0})
        per[kind] += count
    return [
        Throughput(start=datetime.fromtimestamp(start, UTC), **counts[start])
        for start in sorted(counts)
    ]


# --- what a monitor reads: running rows (few), and finished ones within a time and a LIMIT ---

RUNNING = "id, uuid, task_path, queue_name, lease_owner, attempts, enqueued_at, last_attempted_at"
FAILED = "id, uuid, task_path, queue_name, state, attempts, finished_at, errors"
STARTS = "id, available_at, last_attempted_at, finished_at"


def running(store: Store, queues: QueueSelector | None, limit: int) -> list[RunningJob]:
    """The running jobs, longest running first, through the running rows' index."""
    where, params = _scope(store, queues)
    rows = store.rows(
        f"SELECT {RUNNING}, progress FROM {TABLE} WHERE {IS_RUNNING} AND {where} "
        "ORDER BY CASE WHEN last_attempted_at IS NULL THEN 1 ELSE 0 END, last_attempted_at, id "
        "LIMIT %s",
        [*params, limit],
        f"{RUNNING}, progress",
    )
    return [
        RunningJob(
            id=str(row.uuid),
            task_path=row.task_path,
            queue_name=row.queue_name,
            worker_id=row.lease_owner or "",
            attempt=row.attempts,
            enqueued_at=row.enqueued_at,
            started_at=row.last_attempted_at,
            progress=row.progress,
        )
        for row in rows
    ]


def recent_failures(
    store: Store, since: datetime, queues: QueueSelector | None, limit: int
) -> list[FailedJob]:
    """Failed and cancelled jobs that ended since ``since``, newest first."""
    where, params = _scope(store, queues)
    sql, sql_params = _newest_finished(
        store, FAILED, (State.FAILED, State.CANCELLED), (where, params), since, limit
    )
    return [_failed(row) for row in store.rows(sql, sql_params, FAILED)]


def _failed(row: Job) -> FailedJob:
    assert row.finished_at is not None  # every finished row has its time
    error_class, message = FailedJob.last_error([TaskError(**error) for error in row.errors])
    return FailedJob(
        id=str(row.uuid),
        task_path=row.task_path,
        queue_name=row.queue_name,
        finished_at=row.finished_at,
        attempt=row.attempts,
        cancelled=row.state == State.CANCELLED,
        error_class=error_class,
        message=message,
    )


def pickup_latency(
    store: Store, since: datetime, queues: QueueSelector | None, limit: int
) -> PickupLatency:
    """The waits of jobs that started since ``since``: running ones, and finished ones."""
    where, params = _scope(store, queues)
    running = (
        f"SELECT {STARTS} FROM {TABLE} WHERE {IS_RUNNING} AND {where} "
        "AND last_attempted_at >= %s LIMIT %s"
    )
    running_params = [*params, store.time(since), limit]
    # The newest finished rows, filtered here: a condition on the start time would make the
    # read go on past ``limit`` rows while it finds too few.
    finished, finished_params = _newest_finished(
        store, STARTS, FINISHED_STATES, (where, params), since, limit
    )
    rows = store.rows(
        f"SELECT {STARTS} FROM ({running}) AS r UNION ALL SELECT {STARTS} FROM ({finished}) AS f",
        [*running_params, *finished_params],
        STARTS,
    )
    after = clock.aware(since)
    return PickupLatency.of(
        (row.last_attempted_at - row.available_at).total_seconds()
        for row in rows
        if row.last_attempted_at is not None and clock.aware(row.last_attempted_at) >= after
    )


def _newest_finished(
    store: Store,
    columns: str,
    states: Sequence[State],
    scope: tuple[str, list[Any]],
    since: datetime,
    limit: int,
) -> tuple[str, list[Any]]:
    """A SELECT of the newest ``limit`` jobs in ``states`` that finished since ``since``.

    Through the finished rows' index, newest first within the time bound: one read where
    that index holds just the finished rows, else (MySQL/MariaDB, whose index leads with
    the state) one read per state, merged.
    """
    where, params = scope
    head = (
        f"SELECT {columns} FROM {TABLE} WHERE state IN {FINISHED} AND {where} AND finished_at >= %s"
    )
    tail = " ORDER BY finished_at DESC LIMIT %s"
    after = store.time(since)
    if not store.dialect.state_led_indexes:
        only = "" if set(states) == set(FINISHED_STATES) else f" AND state IN {_listed(states)}"
        return f"{head}{only}{tail}", [*params, after, limit]
    arms = " UNION ALL ".join(
        f"SELECT {columns} FROM ({head} AND state = '{state}'{tail}) AS f{i}"
        for i, state in enumerate(states)
    )
    return (
        f"SELECT {columns} FROM ({arms}) AS newest{tail}",
        [*(p for _ in states for p in (*params, after, limit)), limit],
    )


def _listed(states: Sequence[State]) -> str:
    return "(" + ", ".join(f"'{state}'" for state in states) + ")"


def prune(store: Store, before: datetime, batch: int, pause: float) -> int:
    """Delete finished jobs that ended before ``before``, one short transaction per batch."""
    return _delete(store, "finished_at < %s", [store.time(before)], batch, pause, None)


def expire(store: Store, batch: int, pause: float, limit: int | None) -> int:
    """Delete finished jobs past their retention (store clock), at most ``limit``."""
    return _delete(store, f"expires_at <= {store.dialect.reached()}", [], batch, pause, limit)


def _delete(
    store: Store,
    condition: str,
    params: list[Any],
    batch: int,
    pause: float,
    limit: int | None,
) -> int:
    """Delete finished jobs that meet ``condition``, each batch in its own short transaction."""
    deleted = 0
    while limit is None or deleted < limit:
        size = batch if limit is None else min(batch, limit - deleted)
        ids = [
            row[0]
            # Any such rows will do: no ORDER BY, which MySQL's state-led index could only
            # serve by sorting every finished row on each batch.
            for row in store.fetch(
                f"SELECT id FROM {TABLE} WHERE backend_name = %s AND state IN {FINISHED} "
                f"AND {condition} LIMIT %s",
                [store.backend, *params, size],
            )
        ]
        if not ids:
            break
        marks = ", ".join(["%s"] * len(ids))
        with store.dialect.write_transaction():
            deleted += store.execute(
                f"DELETE FROM {TABLE} WHERE id IN ({marks}) AND state IN {FINISHED}", ids
            )
        if len(ids) < size:
            break
        if limit is None or deleted < limit:
            time.sleep(pause)
    return deleted
