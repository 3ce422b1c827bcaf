"""Every state change of a job, each written once, for every engine.

A transition is one short transaction (mostly one statement) built from the pieces the
engine's dialect supplies. Writes about a delivery name its token and are refused once the
job has been delivered again. Lease times use the store's clock (``dialect.now()``), never
the caller's.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

from django.db import DataError, IntegrityError
from django.db.models.sql import InsertQuery
from django.utils import timezone

from conveyor.backends.base import Held
from conveyor.backends.database.models import Job
from conveyor.backends.database.store import (
    COLUMNS,
    IS_READY,
    IS_RUNNING,
    IS_SCHEDULED,
    TABLE,
    WORKERS,
    Store,
    error_json,
    json_text,
    pairs,
    per_row,
    to_record,
)
from conveyor.records import Job as JobRecord
from conveyor.records import Outcome, PutBack, QueueSelector, State, Success, error_from_text

INSERT_CHUNK = 500
HEARTBEAT_CHUNK = 500
CLAIM_ORDER = "priority DESC, available_at, id"
OPEN = "('scheduled', 'ready', 'waiting', 'running')"
LOST_ERROR = "conveyor.exceptions.WorkerLost"


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
        f"SELECT id FROM {TABLE} WHERE {IS_SCHEDULED} AND backend_name = %s "
        f"AND available_at <= {d.now()}"
    )
    # A read, so no write lock is taken while nothing is due. In index order: a bare LIMIT 1
    # lets PostgreSQL guess a match is near and scan the whole table when none is.
    if not store.fetch(f"{due} ORDER BY available_at LIMIT 1", [store.backend]):
        return 0
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
    base = f"{columns} FROM {TABLE} WHERE {IS_READY} AND backend_name = %s"
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
    # started_at and last_attempted_at are written when the task really starts.
    assign = (
        f"state = 'running', lease_owner = %s, delivery = %s, lease_expires_at = {d.later()}, "
        f"attempts = attempts + 1, worker_ids = {d.append_text('worker_ids')}"
    )
    assign_params = [worker_id, token, store.lease, worker_id]
    if d.update_returning:
        if d.probe_before_claim and not store.fetch(*_arms(store, queues, 1)):
            return []  # nothing to take: a read, so no write lock is taken
        returning = ", ".join(f"{TABLE}.{column}" for column in COLUMNS.split(", "))
        sql, params = d.claim_statement(
            TABLE, (pick, pick_params), (assign, assign_params), returning
        )
        rows = store.rows(sql, params, returning)
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
    rows = store.rows(
        f"SELECT id, available_at FROM {TABLE} WHERE {IS_SCHEDULED} AND backend_name = %s "
        "ORDER BY available_at LIMIT 1",
        [store.backend],
        "id, available_at",
    )
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
    keys = [job.key for job, _ in successes]
    values = {
        "return_value": [json_text(outcome.return_value) for _, outcome in successes],
        "finished_at": [store.time(outcome.finished_at) for _, outcome in successes],
        "last_attempted_at": [store.time(outcome.started_at) for _, outcome in successes],
        "delivery": [job.delivery for job, _ in successes],
    }
    kinds = {"return_value": d.json_value(), "delivery": "%s"}
    assign, params = [], []
    for column, column_values in values.items():
        assign.append(f"{column} = {per_row(len(keys), kinds.get(column, d.time_value()))}")
        params += [p for pair in zip(keys, column_values, strict=True) for p in pair]
    marks = ", ".join(["%s"] * len(keys))
    sql = (
        f"UPDATE {TABLE} SET state = 'succeeded', {', '.join(assign)}, "
        f"started_at = COALESCE(started_at, {per_row(len(keys), d.time_value())}), "
        "lease_owner = NULL, "
        f"lease_expires_at = NULL WHERE id IN ({marks}) AND state IN {OPEN}"
    )
    params = [*params, *pairs(keys, values["last_attempted_at"]), *keys]
    # Each row updated now took its own delivery's token: saved by it. Only the others
    # are looked up (already saved by the same delivery, or ended otherwise).
    updated: set[Any] = set()
    if d.update_returning:
        updated = {row[0] for row in store.fetch(f"{sql} RETURNING id", params)}
    else:
        store.execute(sql, params)
    missing = [key for key in keys if key not in updated]
    saved = _saved_by(store, missing, State.SUCCEEDED) if missing else {}
    saved.update((job.key, job.delivery) for job, _ in successes if job.key in updated)
    return {job.id for job, _ in successes if saved.get(job.key) == job.delivery}


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


def _attempt(store: Store, outcome: Outcome) -> tuple[str, list[Any]]:
    """What every end of a delivery writes: when it ran, and the error it raised."""
    d = store.dialect
    assert outcome.error is not None
    started = store.time(outcome.started_at)
    return (
        f"started_at = COALESCE(started_at, %s), last_attempted_at = %s, "
        f"errors = {d.append_json('errors')}",
        [started, started, error_json(outcome.error)],
    )


def fail(store: Store, job: JobRecord, outcome: Outcome) -> bool:
    """Record a final failure of this delivery."""
    attempt, params = _attempt(store, outcome)
    return _end_delivery(
        store,
        job,
        f"state = 'failed', finished_at = %s, {attempt}",
        [store.time(outcome.finished_at), *params],
        State.FAILED,
    )


def retry(store: Store, job: JobRecord, outcome: Outcome) -> bool:
    """Record a failed attempt; the job falls due again at ``retry_at`` (store clock)."""
    assert outcome.retry_at is not None
    attempt, params = _attempt(store, outcome)
    due = store.time(outcome.retry_at)
    return _end_delivery(
        store,
        job,
        f"state = CASE WHEN %s <= {store.dialect.now()} THEN 'ready' ELSE 'scheduled' END, "
        f"available_at = %s, {attempt}",
        [due, due, *params],
        State.SCHEDULED,
        State.READY,
    )


def unclaim(store: Store, jobs: Sequence[JobRecord], unless_renewed: float | None = None) -> int:
    """Undo deliveries that never started: uncounted, in their old place in line.

    With ``unless_renewed``, only those whose lease ran out that many seconds ago: a
    heartbeat that lands meanwhile keeps its delivery.
    """
    d = store.dialect
    guard, guard_params = _lapsed_for(store, unless_renewed)
    undone = 0
    for job in jobs:
        worker_ids = json.dumps(list(job.worker_ids[:-1]))
        undone += store.execute(
            f"UPDATE {TABLE} SET state = 'ready', lease_owner = NULL, lease_expires_at = NULL, "
            f"worker_ids = {d.json_value()}, attempts = attempts - 1 "
            f"WHERE id = %s AND delivery = %s AND state = 'running'{guard}",
            [worker_ids, job.key, job.delivery, *guard_params],
        )
    return undone


def _lapsed_for(store: Store, seconds: float | None) -> tuple[str, list[Any]]:
    """An extra condition: the lease ran out at least ``seconds`` ago (store clock)."""
    if seconds is None:
        return "", []
    return f" AND lease_expires_at < {store.dialect.earlier()}", [seconds]


def requeue(
    store: Store, job: JobRecord, reason: str, counts: bool, unless_renewed: float | None = None
) -> PutBack | None:
    """Put back a delivery cut short; fail the job once it was lost ``max_attempts`` times.

    ``unless_renewed`` as for ``unclaim``.
    """
    rows = store.fetch(
        f"SELECT lost FROM {TABLE} WHERE id = %s AND delivery = %s AND state = 'running'",
        [job.key, job.delivery],
    )
    if not rows:
        return None
    lost = rows[0][0] + (1 if counts else 0)
    d = store.dialect
    failed = counts and lost >= store.max_attempts
    if failed:
        message = (
            f"{reason}; the job was lost {lost} times (the most allowed is "
            f"{store.max_attempts}) and is given up."
        )
        assign = "state = 'failed', finished_at = %s"
        params: list[Any] = [store.time(timezone.now())]
    else:
        message, assign, params = reason, "state = 'ready'", []
    error = error_json(error_from_text(LOST_ERROR, message))
    guard, guard_params = _lapsed_for(store, unless_renewed)
    changed = store.execute(
        f"UPDATE {TABLE} SET {assign}, lost = %s, errors = {d.append_json('errors')}, "
        "lease_owner = NULL, lease_expires_at = NULL "
        f"WHERE id = %s AND delivery = %s AND state = 'running'{guard}",
        [*params, lost, error, job.key, job.delivery, *guard_params],
    )
    return PutBack(job=job, counted=counts, failed=failed) if changed else None


def _held(store: Store, where: str, params: Sequence[Any]) -> list[JobRecord]:
    sql = f"SELECT {COLUMNS} FROM {TABLE} WHERE {IS_RUNNING} AND {where}"
    return [to_record(row) for row in store.rows(sql, params, COLUMNS)]


def release(
    store: Store,
    worker_id: str,
    reason: str,
    executing: Collection[tuple[int, str]],
    counts: bool,
    finished: Mapping[tuple[int, str], Outcome],
) -> list[PutBack]:
    """Save what ``worker_id`` had finished, requeue what it was executing, give back the rest.

    A finished success the store refuses is given back uncounted with the rest: the job
    runs again and its next outcome is refused, and failed, the usual way.
    """
    held = _held(store, "lease_owner = %s", [worker_id])
    saved = _save_finished(store, held, finished)
    done = [PutBack(job=job, counted=False, failed=False, saved=True) for job in saved]
    for job in held:
        if job in saved:
            continue
        if (job.key, job.delivery) in executing:
            put_back = requeue(store, job, reason, counts)
        elif unclaim(store, [job]):
            put_back = PutBack(job=job, counted=False, failed=False)
        else:
            put_back = None
        if put_back is not None:
            done.append(put_back)
    return done


def _save_finished(
    store: Store, held: Sequence[JobRecord], finished: Mapping[tuple[int, str], Outcome]
) -> list[JobRecord]:
    successes = [(job, finished[d]) for job in held if (d := (job.key, job.delivery)) in finished]
    saved = _complete_all_but_refused(store, successes)
    return [job for job, _ in successes if job.id in saved]


def _complete_all_but_refused(store: Store, successes: Sequence[Success]) -> set[str]:
    """``complete``, leaving out values the database refuses (those jobs run again)."""
    try:
        return complete(store, successes)  # one statement: autocommit keeps it whole
    except (DataError, IntegrityError, TypeError, ValueError):
        if len(successes) == 1:
            return set()
    return {saved for one in successes for saved in _complete_all_but_refused(store, [one])}


def give_back(
    store: Store, worker_id: str, deliveries: Collection[tuple[int, str]]
) -> list[JobRecord]:
    """Give back, uncounted, these deliveries of ``worker_id``."""
    if not deliveries:
        return []
    held = _held(store, "lease_owner = %s", [worker_id])
    return [job for job in held if (job.key, job.delivery) in deliveries and unclaim(store, [job])]


def reclaim(store: Store, worker_ids: Sequence[str]) -> list[JobRecord]:
    """Give back, uncounted, deliveries of these workers not renewed for two leases.

    Their worker renews every delivery it knows of each third of a lease; one it has not
    renewed for a whole lease past expiry is one it never heard of.
    """
    if not worker_ids:
        return []
    marks = ", ".join(["%s"] * len(worker_ids))
    lapsed = _held(
        store,
        f"lease_owner IN ({marks}) AND lease_expires_at < {store.dialect.earlier()}",
        [*worker_ids, store.lease],
    )
    return [job for job in lapsed if unclaim(store, [job], unless_renewed=store.lease)]


# --- leases ----------------------------------------------------------------------------------


def heartbeat(store: Store, worker_ids: Sequence[str], deliveries: Sequence[Held]) -> int:
    """Renew the leases of these deliveries and beat the workers' rows (store clock).

    A delivery whose task has started gets ``started_at`` (if it has none yet) and
    ``last_attempted_at``: a long task shows when it started while it runs.
    """
    d = store.dialect
    if worker_ids:
        marks = ", ".join(["%s"] * len(worker_ids))
        store.execute(
            f"UPDATE {WORKERS} SET last_beat_at = {d.now()} WHERE id IN ({marks})",
            list(worker_ids),
        )
    # In chunks: every engine bounds the parameters of one statement.
    return sum(
        _renew(store, deliveries[i : i + HEARTBEAT_CHUNK])
        for i in range(0, len(deliveries), HEARTBEAT_CHUNK)
    )


def _renew(store: Store, deliveries: Sequence[Held]) -> int:
    d = store.dialect
    keys = [key for key, _, _ in deliveries]
    started = [store.time(at) for _, _, at in deliveries]
    marks = ", ".join(["%s"] * len(keys))
    when = per_row(len(keys), d.time_value())
    return store.execute(
        f"UPDATE {TABLE} SET lease_expires_at = {d.later()}, "
        f"started_at = COALESCE(started_at, {when}), "
        f"last_attempted_at = COALESCE({when}, last_attempted_at) "
        f"WHERE id IN ({marks}) AND state = 'running' AND delivery = {per_row(len(keys), '%s')}",
        [
            store.lease,
            *pairs(keys, started),
            *pairs(keys, started),
            *keys,
            *pairs(keys, [token for _, token, _ in deliveries]),
        ],
    )


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
    return sum(requeue(store, job, reason, True, unless_renewed=0.0) is not None for job in stale)


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
