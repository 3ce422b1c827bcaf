"""Every state change of a job, each written once, for every engine.

A transition is one short transaction (mostly one statement) built from the pieces the
engine's dialect supplies. Writes about a delivery name its token and are refused once the
job has been delivered again. Lease times use the store's clock (``dialect.now()``), never
the caller's.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models.sql import InsertQuery
from django.tasks.base import TaskError
from django.utils import timezone

from conveyor.backends.database.dialects import Dialect, dialect_for
from conveyor.backends.database.models import Job, Worker
from conveyor.records import (
    FINISHED_STATES,
    QueueSelector,
    QueueStats,
    State,
    Success,
    WorkerInfo,
    error_from_text,
)
from conveyor.records import (
    Job as JobRecord,
)

INSERT_CHUNK = 500
TABLE = Job._meta.db_table
WORKERS = Worker._meta.db_table
# Columns a claim reads back; what ``to_record`` needs.
COLUMNS = (
    "id, uuid, backend_name, queue_name, task_path, priority, args, kwargs, attempts, "
    "enqueued_at, run_after, started_at, last_attempted_at, worker_ids, errors, delivery"
)
CLAIM_ORDER = "priority DESC, available_at, id"
OPEN = "('scheduled', 'ready', 'waiting', 'running')"
FINISHED = "(" + ", ".join(f"'{s}'" for s in FINISHED_STATES) + ")"
LOST_ERROR = "conveyor.exceptions.WorkerLost"


@dataclass(frozen=True, slots=True)
class Store:
    """Where one backend's jobs live, and the options its transitions need."""

    backend: str
    using: str
    lease: float
    max_attempts: int

    @property
    def connection(self) -> BaseDatabaseWrapper:
        return connections[self.using]

    @property
    def dialect(self) -> Dialect:
        return dialect_for(self.connection)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; return the rows it changed."""
        with self.connection.cursor() as cursor:
            cursor.execute(sql, params)
            return int(cursor.rowcount)

    def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.connection.cursor() as cursor:
            cursor.execute(sql, params)
            return list(cursor.fetchall())

    def time(self, value: datetime | None) -> Any:
        return self.connection.ops.adapt_datetimefield_value(value)


def to_record(row: Job) -> JobRecord:
    """The frozen value the runtime works with, for one delivered row."""
    return JobRecord(
        id=str(row.uuid),
        task_path=row.task_path,
        backend=row.backend_name,
        queue_name=row.queue_name,
        priority=row.priority,
        args=row.args,
        kwargs=row.kwargs,
        attempt=row.attempts,
        enqueued_at=row.enqueued_at,
        run_after=row.run_after,
        started_at=row.started_at,
        last_attempted_at=row.last_attempted_at,
        worker_ids=tuple(row.worker_ids),
        errors=tuple(TaskError(**error) for error in row.errors),
        delivery=row.delivery,
        key=row.pk,
    )


def error_json(error: TaskError) -> str:
    return json.dumps(
        {"exception_class_path": error.exception_class_path, "traceback": error.traceback}
    )


# --- enqueue ---------------------------------------------------------------------------


_SINGLE_INSERT: dict[str, str] = {}


def insert(store: Store, rows: Sequence[Job], notify: tuple[str, str] | None) -> None:
    """Store new jobs, with one NOTIFY ``(channel, payload)`` in the same statement.

    One statement per 500 rows, with no transaction of its own unless there are more
    (a lone INSERT is atomic): inside the caller's ``atomic()`` the jobs, and the
    wake-up, exist only if it commits.
    """
    chunks = [rows[i : i + INSERT_CHUNK] for i in range(0, len(rows), INSERT_CHUNK)]
    if len(chunks) == 1:
        _insert_chunk(store, chunks[0], notify)
        return
    with store.dialect.write_transaction():
        for chunk in chunks:
            _insert_chunk(store, chunk, notify)


def _insert_chunk(store: Store, rows: Sequence[Job], notify: tuple[str, str] | None) -> None:
    sql, params = _insert_sql(store, rows)
    if notify is not None:
        sql = store.dialect.notify_after(sql)  # type: ignore[attr-defined]
        params = (*params, *notify)
    store.execute(sql, params)


def _insert_sql(store: Store, rows: Sequence[Job]) -> tuple[str, tuple[Any, ...]]:
    """The multi-row INSERT Django would send (the key left to the database).

    The one-row statement, the hot path of ``enqueue()``, is compiled once per database;
    its parameters are prepared the way Django's insert compiler prepares them.
    """
    fields = [f for f in Job._meta.concrete_fields if not f.primary_key]
    conn = store.connection
    if len(rows) == 1 and store.using in _SINGLE_INSERT:
        [row] = rows
        params = tuple(f.get_db_prep_save(f.pre_save(row, True), conn) for f in fields)
        return _SINGLE_INSERT[store.using], params
    query = InsertQuery(Job)
    query.insert_values(fields, list(rows))
    [(sql, compiled)] = query.get_compiler(using=store.using).as_sql()
    if len(rows) == 1:
        _SINGLE_INSERT[store.using] = sql
    return sql, tuple(compiled)


# --- taking work ------------------------------------------------------------------------


def stage(store: Store, limit: int) -> int:
    """Make scheduled jobs that are due by the store's clock ready, oldest due first."""
    d = store.dialect
    due = (
        f"SELECT id FROM {TABLE} WHERE state = 'scheduled' AND backend_name = %s "
        f"AND available_at <= {d.now()}"
    )
    if not store.fetch(f"{due} LIMIT 1", [store.backend]):
        return 0  # a read: no write lock is taken while nothing is due
    with d.write_transaction():
        ids = [
            row[0]
            for row in store.fetch(
                f"{due} ORDER BY available_at LIMIT %s{d.lock_rows}", [store.backend, limit]
            )
        ]
        if not ids:
            return 0
        marks = ", ".join(["%s"] * len(ids))
        return store.execute(
            f"UPDATE {TABLE} SET state = 'ready' WHERE id IN ({marks}) AND state = 'scheduled'",
            ids,
        )


def _arms(store: Store, queues: QueueSelector, limit: int) -> tuple[str, list[Any]]:
    """The SELECT that picks the best ``limit`` ready jobs for ``queues``.

    A worker serving named queues reads each queue's rows through the per-queue index and
    merges them; one serving every queue (or all but some) reads the backend's index.
    """
    d = store.dialect
    columns = "SELECT id, priority, available_at"
    base = f"{columns} FROM {TABLE} WHERE state = 'ready' AND backend_name = %s"
    tail = f" ORDER BY {CLAIM_ORDER} LIMIT %s{d.lock_rows}"
    if queues.include is None:
        sql, params = base, list[Any]([store.backend])
        if queues.exclude:  # the backend's queues are not known: filter the rows read
            marks = ", ".join(["%s"] * len(queues.exclude))
            sql += f" AND queue_name NOT IN ({marks})"
            params += sorted(queues.exclude)
        return sql + tail, [*params, limit]
    names = sorted(queues.include - queues.exclude)
    if len(names) == 1:
        return f"{base} AND queue_name = %s{tail}", [store.backend, names[0], limit]
    arms = " UNION ALL ".join(
        f"{columns} FROM ({base} AND queue_name = %s{tail}) AS q{i}" for i in range(len(names))
    )
    per_queue = [p for name in names for p in (store.backend, name, limit)]
    return (
        f"{columns} FROM ({arms}) AS picked ORDER BY {CLAIM_ORDER} LIMIT %s",
        [*per_queue, limit],
    )


def claim(store: Store, worker_id: str, queues: QueueSelector, limit: int) -> list[JobRecord]:
    """Lease up to ``limit`` of the best ready jobs to ``worker_id``, under a new token."""
    if queues.include is not None and not (queues.include - queues.exclude):
        return []
    d = store.dialect
    pick, pick_params = _arms(store, queues, limit)
    token = secrets.token_hex(8)
    now = store.time(timezone.now())
    assign = (
        f"state = 'running', lease_owner = %s, delivery = %s, lease_expires_at = {d.later()}, "
        "attempts = attempts + 1, started_at = COALESCE(started_at, %s), "
        f"last_attempted_at = %s, worker_ids = {d.append_text('worker_ids')}"
    )
    assign_params = [worker_id, token, store.lease, now, now, worker_id]
    if d.update_returning:
        if d.vendor == "sqlite" and not store.fetch(*_arms(store, queues, 1)):
            return []  # nothing to take: a read, so no write lock is taken
        returning = ", ".join(f"{TABLE}.{column}" for column in COLUMNS.split(", "))
        sql, params = d.claim_statement(
            TABLE, (pick, pick_params), (assign, assign_params), returning
        )
        rows = list(Job.objects.raw(sql, params).using(store.using))
    else:
        rows = _claim_locked(store, pick, pick_params, assign, assign_params, token)
    rows.sort(key=lambda row: (-row.priority, row.available_at or row.enqueued_at, row.pk))
    return [to_record(row) for row in rows]


def _claim_locked(
    store: Store,
    pick: str,
    pick_params: list[Any],
    assign: str,
    assign_params: list[Any],
    token: str,
) -> list[Job]:
    # No UPDATE ... RETURNING: lock the picked rows, update them, read back this token's.
    with store.dialect.write_transaction():
        ids = [row[0] for row in store.fetch(pick, pick_params)]
        if not ids:
            return []
        marks = ", ".join(["%s"] * len(ids))
        store.execute(
            f"UPDATE {TABLE} SET {assign} WHERE id IN ({marks}) AND state = 'ready'",
            [*assign_params, *ids],
        )
        return list(Job.objects.using(store.using).filter(pk__in=ids, delivery=token))


def next_due(store: Store) -> datetime | None:
    """When the earliest scheduled job of the backend falls due."""
    rows = Job.objects.raw(
        f"SELECT id, available_at FROM {TABLE} WHERE state = 'scheduled' AND backend_name = %s "
        "ORDER BY available_at LIMIT 1",
        [store.backend],
    ).using(store.using)
    return next((row.available_at for row in rows), None)


# --- outcomes ----------------------------------------------------------------------------


def complete(store: Store, successes: Sequence[Success]) -> set[str]:
    """Record successes in one statement; return the ids these deliveries saved.

    A job with no outcome yet takes the success (first success wins); a job already
    succeeded by the same delivery (the reply to an earlier save was lost) counts as saved.
    """
    if not successes:
        return set()
    d = store.dialect
    keys = [job.key for job, _, _ in successes]
    cases: dict[str, list[Any]] = {"return_value": [], "finished_at": [], "delivery": []}
    for job, value, finished_at in successes:
        cases["return_value"] += [job.key, None if value is None else json.dumps(value)]
        cases["finished_at"] += [job.key, store.time(finished_at)]
        cases["delivery"] += [job.key, job.delivery]
    kinds = {"return_value": d.json_value(), "finished_at": d.time_value(), "delivery": "%s"}
    assign = ", ".join(
        f"{column} = CASE id " + " ".join([f"WHEN %s THEN {kinds[column]}"] * len(keys)) + " END"
        for column in cases
    )
    marks = ", ".join(["%s"] * len(keys))
    store.execute(
        f"UPDATE {TABLE} SET state = 'succeeded', {assign}, lease_owner = NULL, "
        f"lease_expires_at = NULL WHERE id IN ({marks}) AND state IN {OPEN}",
        [*cases["return_value"], *cases["finished_at"], *cases["delivery"], *keys],
    )
    saved = _saved_by(store, keys, State.SUCCEEDED)
    return {job.id for job, _, _ in successes if saved.get(job.key) == job.delivery}


def _saved_by(store: Store, keys: Sequence[Any], *states: State) -> dict[Any, str]:
    """For each job among ``keys`` in ``states``: the token of the delivery that wrote it."""
    marks = ", ".join(["%s"] * len(keys))
    state_marks = ", ".join(["%s"] * len(states))
    rows = store.fetch(
        f"SELECT id, delivery FROM {TABLE} WHERE id IN ({marks}) AND state IN ({state_marks})",
        [*keys, *(str(state) for state in states)],
    )
    return dict(rows)


def _end_delivery(
    store: Store, job: JobRecord, assign: str, params: list[Any], *done: State
) -> bool:
    """Close the delivery ``job`` if it still holds the row; True also if it already did."""
    changed = store.execute(
        f"UPDATE {TABLE} SET {assign}, lease_owner = NULL, lease_expires_at = NULL "
        "WHERE id = %s AND delivery = %s AND state = 'running'",
        [*params, job.key, job.delivery],
    )
    return bool(changed) or _saved_by(store, [job.key], *done).get(job.key) == job.delivery


def fail(store: Store, job: JobRecord, error: TaskError, finished_at: datetime) -> bool:
    """Record a final failure of this delivery."""
    d = store.dialect
    return _end_delivery(
        store,
        job,
        f"state = 'failed', finished_at = %s, errors = {d.append_json('errors')}",
        [store.time(finished_at), error_json(error)],
        State.FAILED,
    )


def retry(store: Store, job: JobRecord, error: TaskError, run_after: datetime) -> bool:
    """Record a failed attempt; the job falls due again at ``run_after`` (store clock)."""
    d = store.dialect
    due = store.time(run_after)
    return _end_delivery(
        store,
        job,
        f"state = CASE WHEN %s <= {d.now()} THEN 'ready' ELSE 'scheduled' END, "
        f"available_at = %s, errors = {d.append_json('errors')}",
        [due, due, error_json(error)],
        State.SCHEDULED,
        State.READY,
    )


def unclaim(store: Store, jobs: Sequence[JobRecord]) -> int:
    """Undo deliveries that never started: uncounted, in their old place in line."""
    d = store.dialect
    undone = 0
    for job in jobs:
        worker_ids = json.dumps(list(job.worker_ids[:-1]))
        undone += store.execute(
            # MySQL assigns left to right, seeing earlier assignments: attempts goes last.
            f"UPDATE {TABLE} SET state = 'ready', lease_owner = NULL, lease_expires_at = NULL, "
            "started_at = CASE WHEN attempts = 1 THEN NULL ELSE started_at END, "
            "last_attempted_at = CASE WHEN attempts = 1 THEN NULL ELSE last_attempted_at END, "
            f"worker_ids = {d.json_value()}, attempts = attempts - 1 "
            "WHERE id = %s AND delivery = %s AND state = 'running'",
            [worker_ids, job.key, job.delivery],
        )
    return undone


def requeue(store: Store, job: JobRecord, reason: str, counts: bool) -> bool:
    """Put back a delivery cut short; fail the job once it was lost ``max_attempts`` times."""
    rows = store.fetch(
        f"SELECT lost FROM {TABLE} WHERE id = %s AND delivery = %s AND state = 'running'",
        [job.key, job.delivery],
    )
    if not rows:
        return False
    lost = rows[0][0] + (1 if counts else 0)
    d = store.dialect
    if counts and lost >= store.max_attempts:
        message = (
            f"{reason}; the job was lost {lost} times (the most allowed is "
            f"{store.max_attempts}) and is given up."
        )
        assign = "state = 'failed', finished_at = %s"
        params: list[Any] = [store.time(timezone.now())]
    else:
        message, assign, params = reason, "state = 'ready'", []
    error = error_json(error_from_text(LOST_ERROR, message))
    return bool(
        store.execute(
            f"UPDATE {TABLE} SET {assign}, lost = %s, errors = {d.append_json('errors')}, "
            "lease_owner = NULL, lease_expires_at = NULL "
            "WHERE id = %s AND delivery = %s AND state = 'running'",
            [*params, lost, error, job.key, job.delivery],
        )
    )


def _held(store: Store, where: str, params: Sequence[Any]) -> list[JobRecord]:
    rows = Job.objects.raw(
        f"SELECT {COLUMNS} FROM {TABLE} WHERE state = 'running' AND {where}", params
    ).using(store.using)
    return [to_record(row) for row in rows]


def release(store: Store, worker_id: str, reason: str, counts: bool) -> int:
    """Requeue every delivery ``worker_id`` holds."""
    held = _held(store, "lease_owner = %s", [worker_id])
    return sum(requeue(store, job, reason, counts) for job in held)


# --- leases and the workers registry ---------------------------------------------------


def heartbeat(store: Store, worker_ids: Sequence[str]) -> int:
    """Renew the leases of these workers and beat their registry rows (store clock)."""
    if not worker_ids:
        return 0
    d = store.dialect
    marks = ", ".join(["%s"] * len(worker_ids))
    renewed = store.execute(
        f"UPDATE {TABLE} SET lease_expires_at = {d.later()} "
        f"WHERE state = 'running' AND lease_owner IN ({marks})",
        [store.lease, *worker_ids],
    )
    store.execute(
        f"UPDATE {WORKERS} SET last_beat_at = {d.now()} WHERE id IN ({marks})", list(worker_ids)
    )
    return renewed


def recover(store: Store) -> int:
    """Requeue deliveries whose lease expired and whose worker stopped beating.

    Both by the store's clock: a live worker's leases are never taken over because
    another machine's clock runs ahead.
    """
    d = store.dialect
    stale = _held(
        store,
        f"backend_name = %s AND lease_expires_at < {d.now()} AND NOT EXISTS ("
        f"SELECT 1 FROM {WORKERS} w WHERE w.id = {TABLE}.lease_owner "
        f"AND w.stopped_at IS NULL AND w.last_beat_at > {d.earlier()})",
        [store.backend, store.lease],
    )
    reason = "its lease expired without a heartbeat (the worker or its machine stopped)"
    return sum(requeue(store, job, reason, True) for job in stale)


def register_worker(store: Store, info: WorkerInfo) -> None:
    d = store.dialect
    fields = (
        "id, backend_name, kind, supervisor, host, pid, queues, threads, started_at, "
        "last_beat_at, ended"
    )
    store.execute(
        f"INSERT INTO {WORKERS} ({fields}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, "
        f"{d.now()}, '')",
        [
            info.id,
            store.backend,
            info.kind,
            info.supervisor or "",
            info.host,
            info.pid,
            info.queues,
            info.threads,
            store.time(info.started_at or timezone.now()),
        ],
    )


def end_worker(store: Store, worker_id: str, ended: str) -> None:
    store.execute(
        f"UPDATE {WORKERS} SET stopped_at = %s, ended = %s WHERE id = %s AND stopped_at IS NULL",
        [store.time(timezone.now()), ended, worker_id],
    )


def workers(store: Store, alive: bool) -> list[WorkerInfo]:
    rows = Worker.objects.using(store.using).filter(backend_name=store.backend)
    if alive:
        rows = rows.filter(stopped_at__isnull=True)
    return [
        WorkerInfo(
            id=row.id,
            backend=row.backend_name,
            kind=row.kind,
            host=row.host,
            pid=row.pid,
            supervisor=row.supervisor or None,
            queues=row.queues,
            threads=row.threads,
            started_at=row.started_at,
            last_beat_at=row.last_beat_at,
            stopped_at=row.stopped_at,
            ended=row.ended,
        )
        for row in rows.order_by("started_at", "id")
    ]


# --- operations ------------------------------------------------------------------------


def cancel(store: Store, key: int) -> bool:
    """Cancel a job that has not started."""
    d = store.dialect
    error = error_json(error_from_text("conveyor.exceptions.Cancelled", "the job was cancelled"))
    return bool(
        store.execute(
            f"UPDATE {TABLE} SET state = 'cancelled', finished_at = %s, "
            f"errors = {d.append_json('errors')} "
            "WHERE id = %s AND state IN ('scheduled', 'ready', 'waiting')",
            [store.time(timezone.now()), error, key],
        )
    )


def stats(store: Store, queues: QueueSelector | None, since: datetime | None) -> QueueStats:
    """Count jobs by queue and state, each group through the index that holds it."""
    where, params = "backend_name = %s", [store.backend]
    if queues is not None and queues.include is not None:
        marks = ", ".join(["%s"] * len(queues.include))
        where += f" AND queue_name IN ({marks})"
        params += sorted(queues.include)
    if queues is not None and queues.exclude:
        marks = ", ".join(["%s"] * len(queues.exclude))
        where += f" AND queue_name NOT IN ({marks})"
        params += sorted(queues.exclude)
    finished = f"state IN {FINISHED}"
    finished_params = list(params)
    if since is not None:
        finished += " AND finished_at >= %s"
        finished_params.append(store.time(since))
    groups = [
        ("state = 'ready'", params),
        ("state = 'scheduled'", params),
        ("state IN ('running', 'waiting')", params),
        (finished, finished_params),
    ]
    sql = " UNION ALL ".join(
        f"SELECT queue_name, state, COUNT(*) FROM {TABLE} WHERE {where} AND {condition} "
        "GROUP BY queue_name, state"
        for condition, _ in groups
    )
    rows = store.fetch(sql, [p for _, group in groups for p in group])
    return QueueStats.from_counts({(queue, state): count for queue, state, count in rows})


def prune(store: Store, before: datetime, batch: int, pause: float) -> int:
    """Delete finished jobs that ended before ``before``, one short transaction per batch."""
    deleted = 0
    cutoff = store.time(before)
    while True:
        ids = [
            row[0]
            for row in store.fetch(
                f"SELECT id FROM {TABLE} WHERE backend_name = %s AND state IN {FINISHED} "
                "AND finished_at < %s ORDER BY finished_at LIMIT %s",
                [store.backend, cutoff, batch],
            )
        ]
        if not ids:
            return deleted
        marks = ", ".join(["%s"] * len(ids))
        with store.dialect.write_transaction():
            deleted += store.execute(
                f"DELETE FROM {TABLE} WHERE id IN ({marks}) AND state IN {FINISHED}", ids
            )
        if len(ids) < batch:
            return deleted
        time.sleep(pause)
