"""Leases and recovery: renewing deliveries, and giving back or requeueing those cut short.

A delivery given back never started: it goes back uncounted, in its old place in line. One
cut short while it ran is requeued and counts as lost; a job lost ``max_attempts`` times
fails. Lease times are the store's clock.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from django.db import DataError, IntegrityError

from conveyor import clock
from conveyor.backends.base import Held
from conveyor.backends.database.store import (
    COLUMNS,
    IS_RUNNING,
    TABLE,
    WORKERS,
    Store,
    error_json,
    keep_slot,
    pairs,
    per_row,
    to_record,
)
from conveyor.backends.database.transitions.outcomes import announce, complete, fail, retry
from conveyor.backends.database.transitions.retention import expiry
from conveyor.records import Job as JobRecord
from conveyor.records import Outcome, PutBack, State, Success, error_from_text

HEARTBEAT_CHUNK = 500
LOST_ERROR = "conveyor.exceptions.WorkerLost"


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

    A job's own ``max_attempts`` (stored with it) wins. ``unless_renewed`` as for ``unclaim``.
    """
    rows = store.fetch(
        f"SELECT lost FROM {TABLE} WHERE id = %s AND delivery = %s AND state = 'running'",
        [job.key, job.delivery],
    )
    if not rows:
        return None
    lost = rows[0][0] + (1 if counts else 0)
    d = store.dialect
    most = int(job.options.get("max_attempts", store.max_attempts))
    failed = counts and lost >= most
    if failed:
        message = (
            f"{reason}; the job was lost {lost} times (the most allowed is {most}) and is given up."
        )
        now = clock.now()
        assign = f"state = 'failed', finished_at = %s, expires_at = %s{keep_slot(State.FAILED)}"
        params: list[Any] = [store.time(now), store.time(expiry(job, now, succeeded=False))]
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
    if changed and failed:
        announce(store)  # it ended: those waiting for its result hear it
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

    ``finished`` outcomes are saved as their delivery would have (succeeded, failed or
    retried). A success the store refuses is given back uncounted with the rest: the job
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
    ended = [(job, finished[d]) for job in held if (d := (job.key, job.delivery)) in finished]
    successes = [(job, outcome) for job, outcome in ended if outcome.error is None]
    saved = _complete_all_but_refused(store, successes)
    failures = [
        job
        for job, outcome in ended
        if outcome.error is not None
        and (retry(store, job, outcome) if outcome.retry_at else fail(store, job, outcome))
    ]
    return [job for job, _ in successes if job.id in saved] + failures


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
