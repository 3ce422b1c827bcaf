"""How a job ends: a success, a failure, a retry, or a cancel before it starts.

An outcome names its delivery's token: a late write from an older delivery changes
nothing, and a success already recorded is never overwritten.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

from conveyor import clock
from conveyor.backends.database.store import (
    TABLE,
    Store,
    error_json,
    json_text,
    keep_slot,
    pairs,
    per_row,
)
from conveyor.backends.database.transitions.retention import expiry, let_go
from conveyor.options import Retention
from conveyor.records import CANCELLED_ERROR, Outcome, State, Success, error_from_text
from conveyor.records import Job as JobRecord

OPEN = "('scheduled', 'ready', 'waiting', 'running')"


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
    expires = [expiry(job, outcome.finished_at, succeeded=True) for job, outcome in successes]
    if any(at is not None for at in expires):  # an open job has none yet: unset, it stays so
        values["expires_at"] = [store.time(at) for at in expires]
    sql = _successes(store, tuple(values), len(keys))
    if len(keys) == 1:  # a lone success (an idle worker's): no per-row CASE
        params = [*(column[0] for column in values.values()), values["last_attempted_at"][0]]
        params.append(keys[0])
    else:
        params = [p for column in values.values() for p in pairs(keys, column)]
        params += [*pairs(keys, values["last_attempted_at"]), *keys]
    # Each row updated now took its own delivery's token: saved by it. Only the others
    # are looked up (already saved by the same delivery, or ended otherwise).
    updated: set[Any] = set()
    if d.update_returning:
        returning, extra = d.returning_ids(sql, done_channel(store))
        updated = {row[0] for row in store.fetch(returning, [*params, *extra])}
    else:
        store.execute(sql, params)
    missing = [key for key in keys if key not in updated]
    saved = _saved_by(store, missing, State.SUCCEEDED) if missing else {}
    saved.update((job.key, job.delivery) for job, _ in successes if job.key in updated)
    done = {job.id for job, _ in successes if saved.get(job.key) == job.delivery}
    let_go(store, successes, done)
    return done


@functools.lru_cache(maxsize=64)
def _successes(store: Store, columns: tuple[str, ...], count: int) -> str:
    """The UPDATE saving the successes of ``count`` jobs: each of ``columns`` set per row
    (key, value pairs), then ``started_at`` if unset (pairs), then the keys. One job's
    takes its values plainly: each column's value, its start time, its key. Kept per
    store, columns and count (the statement depends on nothing else)."""
    d = store.dialect
    kinds = {"return_value": d.json_value(), "delivery": "%s"}

    def value(kind: str) -> str:
        return kind if count == 1 else per_row(count, kind)

    assign = ", ".join(f"{c} = {value(kinds.get(c, d.time_value()))}" for c in columns)
    where = "id = %s" if count == 1 else f"id IN ({', '.join(['%s'] * count)})"
    return (
        f"UPDATE {TABLE} SET state = 'succeeded', {assign}, "
        f"started_at = COALESCE(started_at, {value(d.time_value())}), "
        f"lease_owner = NULL{keep_slot(State.SUCCEEDED)}, "
        f"lease_expires_at = NULL WHERE {where} AND state IN {OPEN}"
    )


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
    """What every end of a delivery writes: when it ran, and the error it raised if any."""
    started = store.time(outcome.started_at)
    ran = "started_at = COALESCE(started_at, %s), last_attempted_at = %s"
    if outcome.error is None:  # snoozed: runs again later, no failure
        return ran, [started, started]
    errors = f"errors = {store.dialect.append_json('errors')}"
    return f"{ran}, {errors}", [started, started, error_json(outcome.error)]


def fail(store: Store, job: JobRecord, outcome: Outcome) -> bool:
    """Record a final failure of this delivery (a cancel, if it stopped because asked to)."""
    attempt, params = _attempt(store, outcome)
    state = State.CANCELLED if outcome.cancelled else State.FAILED
    expires = expiry(job, outcome.finished_at, succeeded=False)
    ended = _end_delivery(
        store,
        job,
        f"state = '{state}', finished_at = %s, expires_at = %s, {attempt}{keep_slot(state)}",
        [store.time(outcome.finished_at), store.time(expires), *params],
        state,
    )
    announce(store)
    return ended


def done_channel(store: Store) -> str:
    """Where those waiting for results of this backend hear that jobs ended."""
    return f"conveyor_done_{store.backend}"[:63]


def announce(store: Store) -> None:
    """Tell those waiting for results that jobs ended, where the engine can."""
    statement = store.dialect.announce(done_channel(store))
    if statement is not None:
        store.execute(*statement)


def retry(store: Store, job: JobRecord, outcome: Outcome) -> bool:
    """Record a failed (or snoozed) attempt; the job falls due again after its delay.

    The delay (``retry_at - finished_at``, both read on the worker's clock) runs on the
    store's clock, so a worker whose clock is off does not move the retry. ``run_after``
    takes the new due time too, so the job's result says when it runs next.
    """
    assert outcome.retry_at is not None
    attempt, params = _attempt(store, outcome)
    delay = max(0.0, (outcome.retry_at - outcome.finished_at).total_seconds())
    later = store.dialect.later()
    return _end_delivery(
        store,
        job,
        f"state = '{'scheduled' if delay > 0 else 'ready'}', available_at = {later}, "
        f"run_after = {later}, {attempt}",
        [delay, delay, *params],
        State.SCHEDULED,
        State.READY,
    )


def cancel(store: Store, key: int) -> bool:
    """Cancel a job that has not started; it is kept as long as its ``failed_ttl`` says."""
    d = store.dialect
    error = error_json(error_from_text(CANCELLED_ERROR, "the job was cancelled"))
    # The options never change once stored: reading them first races with nothing.
    rows = store.rows(f"SELECT options FROM {TABLE} WHERE id = %s", [key], "options")
    now = clock.now()
    retention = Retention.from_stored((rows[0].options if rows else None) or {})
    expires = retention.expires(now, succeeded=False)
    cancelled = store.execute(
        f"UPDATE {TABLE} SET state = 'cancelled', finished_at = %s, expires_at = %s, "
        f"errors = {d.append_json('errors')}{keep_slot(State.CANCELLED)} "
        "WHERE id = %s AND state IN ('scheduled', 'ready', 'waiting')",
        [store.time(now), store.time(expires), error, key],
    )
    if cancelled:
        announce(store)
    return bool(cancelled)


def request_cancel(store: Store, key: int) -> bool:
    """Ask the worker running this job to stop it; False if it is not running."""
    return bool(
        store.execute(
            f"UPDATE {TABLE} SET cancel_requested = %s WHERE id = %s AND state = 'running'",
            [True, key],
        )
    )


def cancels(store: Store, deliveries: Sequence[tuple[int, str]]) -> set[tuple[int, str]]:
    """Which of these running deliveries were asked to stop."""
    if not deliveries:
        return set()
    marks = ", ".join(["%s"] * len(deliveries))
    rows = store.fetch(
        f"SELECT id, delivery FROM {TABLE} WHERE id IN ({marks}) AND state = 'running' "
        "AND cancel_requested = %s",
        [*(key for key, _ in deliveries), True],
    )
    return {(key, token) for key, token in rows} & set(deliveries)


def report_progress(store: Store, job: JobRecord, progress: dict[str, Any]) -> bool:
    """Note what the running task says of its progress; False once the delivery is over."""
    return bool(
        store.execute(
            f"UPDATE {TABLE} SET progress = {store.dialect.json_value()} "
            "WHERE id = %s AND delivery = %s AND state = 'running'",
            [json.dumps(progress), job.key, job.delivery],
        )
    )
