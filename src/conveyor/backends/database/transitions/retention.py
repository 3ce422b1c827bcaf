"""Retention: when a finished job may be deleted, and letting go of a task's old successes.

A job's ``expires_at`` is set by the transition that finishes it, from the retention stored
with it; ``keep_last`` marks the successes of a task beyond its newest N as expired when a
new success is saved. Deleting the expired jobs is ``operations.expire``: one index, in
batches.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime

from conveyor.backends.database.store import IS_SUCCEEDED, TABLE, Store
from conveyor.options import Retention, trims
from conveyor.records import Job as JobRecord
from conveyor.records import Success

# Successes just past the newest N that one save looks at. A save lets go of the few it
# pushed out; a task that had many more (keep_last set on a task with a long history) is
# trimmed by the saves that follow, as expiry deletes what the earlier ones let go of.


def expiry(job: JobRecord, finished_at: datetime, *, succeeded: bool) -> datetime | None:
    """When ``job``, finished at ``finished_at``, may be deleted; None: it is kept."""
    return Retention.from_stored(job.options).expires(finished_at, succeeded=succeeded)


def let_go(store: Store, successes: Sequence[Success], saved: Collection[str]) -> None:
    """Expire the successes of ``keep_last`` tasks that the saved ones pushed out."""
    for (task_path, keep), window in trims(successes, saved).items():
        trim(store, task_path, keep, window)


def trim(store: Store, task_path: str, keep: int, window: int) -> int:
    """Expire the successes of ``task_path`` from the ``keep``-th newest, ``window`` of them.

    Both statements go through the succeeded jobs' index (task, finish time), reading
    ``keep + window`` entries at most; return how many were let go now.
    """
    ids = [
        row[0]
        for row in store.fetch(
            f"SELECT id FROM {TABLE} WHERE backend_name = %s AND task_path = %s AND "
            f"{IS_SUCCEEDED} ORDER BY finished_at DESC, id DESC LIMIT %s OFFSET %s",
            [store.backend, task_path, window, keep],
        )
    ]
    if not ids:
        return 0
    marks = ", ".join(["%s"] * len(ids))
    return store.execute(
        f"UPDATE {TABLE} SET expires_at = finished_at WHERE id IN ({marks}) AND {IS_SUCCEEDED} "
        "AND (expires_at IS NULL OR expires_at > finished_at)",
        ids,
    )
