"""Reads and maintenance: one result, counts, pruning and expiry, a liveness probe."""

from __future__ import annotations

import time
import uuid
from datetime import datetime
from typing import Any

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
from conveyor.records import QueueSelector, QueueStats

FIND = f"SELECT {RESULT_COLUMNS} FROM {TABLE} WHERE backend_name = %s AND uuid = %s"


def find(store: Store, result_id: uuid.UUID) -> Job | None:
    """The job stored under ``result_id``, or None; what every result poll reads."""
    key = Job._meta.get_field("uuid").get_db_prep_value(result_id, store.connection)
    rows = store.rows(FIND, [store.backend, key], RESULT_COLUMNS)
    return rows[0] if rows else None


def reachable(store: Store) -> bool:
    return bool(store.fetch("SELECT 1"))


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


def prune(store: Store, before: datetime, batch: int, pause: float) -> int:
    """Delete finished jobs that ended before ``before``, one short transaction per batch."""
    return _delete(store, "finished_at < %s", [store.time(before)], batch, pause, None)


def expire(store: Store, batch: int, pause: float, limit: int | None) -> int:
    """Delete finished jobs past their retention (store clock), at most ``limit``."""
    return _delete(store, f"expires_at <= {store.dialect.now()}", [], batch, pause, limit)


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
