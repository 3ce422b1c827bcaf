"""Queue administration on the database: pauses, clearing, duplicates removed."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import datetime, timedelta

from conveyor import clock
from conveyor.backends.database.models import Job, QueuePause
from conveyor.backends.database.store import TABLE, Store

PENDING = "('ready', 'scheduled')"
CHUNK = 500  # ids in one DELETE


def pause(
    store: Store, queue: str, until: datetime | None, seconds: float | None
) -> datetime | None:
    now = store.now()
    if seconds is not None:
        until = now + timedelta(seconds=seconds)
    QueuePause.objects.using(store.using).update_or_create(
        backend_name=store.backend,
        queue_name=queue,
        defaults={"until": clock.stored(until), "paused_at": clock.stored(now)},
    )
    return until


def resume(store: Store, queue: str) -> bool:
    """End the queue's pause; False if none was in effect."""
    was = queue in paused(store)
    QueuePause.objects.using(store.using).filter(
        backend_name=store.backend, queue_name=queue
    ).delete()
    return was


def paused(store: Store) -> dict[str, datetime | None]:
    """The pauses in effect now (those that ended stay until the queue is paused again)."""
    sql = (
        f"SELECT queue_name, until FROM {QueuePause._meta.db_table} WHERE backend_name = %s "
        f"AND (until IS NULL OR until > {store.dialect.now()})"
    )
    field = QueuePause._meta.get_field("until")
    conn = store.connection
    found = {}
    for queue, until in store.fetch(sql, [store.backend]):
        for convert in conn.ops.get_db_converters(field.get_col(QueuePause._meta.db_table)):
            until = convert(until, field, conn)
        found[queue] = None if until is None else clock.aware(until)
    return found


def clear(store: Store, queue: str) -> int:
    """Delete the ready and scheduled jobs of ``queue``, a chunk per transaction.

    Each state is read through its own index, and only jobs there when it began: jobs
    enqueued meanwhile stay.
    """
    top = store.fetch(f"SELECT MAX(id) FROM {TABLE}")[0][0] or 0
    deleted = 0
    for state in ("IN ('ready')", "IN ('scheduled')"):
        while ids := [
            row[0]
            for row in store.fetch(
                f"SELECT id FROM {TABLE} WHERE state {state} AND backend_name = %s "
                "AND queue_name = %s AND id <= %s LIMIT %s",
                [store.backend, queue, top, CHUNK],
            )
        ]:
            removed = _delete(store, ids)
            deleted += removed
            if removed == 0:
                break  # claimed meanwhile: none of these can go
    return deleted


def remove_duplicates(store: Store, queue: str) -> int:
    """Delete pending jobs whose task and arguments an older pending job of ``queue`` has.

    The calls are read once, in order, a chunk at a time; what is kept of each distinct
    call is a 16-byte digest, so a queue of millions of large calls fits in memory.
    """
    seen: set[bytes] = set()
    doubles: list[int] = []
    for key, task_path, args, kwargs in _pending_calls(store, queue):
        text = json.dumps([task_path, args, kwargs], sort_keys=True, separators=(",", ":"))
        call = hashlib.blake2b(text.encode(), digest_size=16).digest()
        if call in seen:
            doubles.append(key)
        else:
            seen.add(call)
    return sum(_delete(store, doubles[i : i + CHUNK]) for i in range(0, len(doubles), CHUNK))


def _pending_calls(store: Store, queue: str) -> Iterator[tuple[int, str, object, object]]:
    rows = (
        Job.objects.using(store.using)
        .filter(backend_name=store.backend, queue_name=queue, state__in=["ready", "scheduled"])
        .order_by("id")
        .values_list("id", "task_path", "args", "kwargs")
    )
    yield from rows.iterator(chunk_size=2000)


def _delete(store: Store, ids: list[int]) -> int:
    if not ids:
        return 0
    marks = ", ".join(["%s"] * len(ids))
    with store.dialect.write_transaction():
        return store.execute(
            f"DELETE FROM {TABLE} WHERE id IN ({marks}) AND state IN {PENDING}", ids
        )
