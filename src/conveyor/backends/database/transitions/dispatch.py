"""Getting jobs to workers: storing them, staging the due ones, and claiming.

An operator may also make scheduled jobs due at once (``run_now``).

A claim leases the best ready jobs to one worker under a new delivery token; every later
write about that delivery names the token.
"""

from __future__ import annotations

import functools
import random
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import DatabaseError, OperationalError
from django.db.models.sql import InsertQuery

from conveyor.backends.database.models import Job
from conveyor.backends.database.store import (
    COLUMNS,
    HOLDER_COLUMNS,
    IS_READY,
    IS_SCHEDULED,
    TABLE,
    Store,
    fields_of,
    fresh_default,
    keep_slot,
    record_of,
)
from conveyor.records import Job as JobRecord
from conveyor.records import QueueSelector, State

INSERT_CHUNK = 500
# Rounds of insert-and-read-back before a unique enqueue gives up: each retry needs the
# job holding a key to let go of it between the insert and the read.
UNIQUE_TRIES = 5
CLAIM_ORDER = "priority DESC, available_at, id"


# The one-row INSERT of each database, and how its parameters are made.
_SINGLE_INSERT: dict[str, _OneRow] = {}


def insert_one(store: Store, values: Mapping[str, Any], notify: tuple[str, str] | None) -> None:
    """Store one new job, given as its column values (every other column at its default).

    The hot path of ``enqueue()``: no model instance is built, and each parameter is
    prepared as Django's insert compiler prepares it (see ``_one_row``).
    """
    conn, one = store.connection, _one_row(store)
    params = [
        prepare(values[name], conn) if name in values else default(conn)
        for name, prepare, default in one.steps
    ]
    _send_insert(store, one.sql, params, notify)


def insert(
    store: Store,
    rows: Sequence[Job],
    notify: tuple[str, str] | None,
    unique_for: float | None = None,
) -> list[Job]:
    """Store new jobs, with one NOTIFY ``(channel, payload)`` in the same statement.

    One statement per 500 rows, with no transaction of its own unless there are more
    (a lone INSERT is atomic): inside the caller's ``atomic()`` the jobs, and the
    wake-up, exist only if it commits. Return, for each row, the row stored for it: the
    row itself, or, for a unique job, the stored job that holds its key (see
    ``_insert_unique``).
    """
    if any(row.unique_slot is not None for row in rows):
        return _insert_unique_retrying(store, rows, notify, unique_for)
    chunks = _chunks(rows)
    if len(chunks) == 1:
        _insert_chunk(store, chunks[0], notify)
        return list(rows)
    with store.dialect.write_transaction():
        for chunk in chunks:
            _insert_chunk(store, chunk, notify)
    return list(rows)


def _chunks[T](items: Sequence[T]) -> list[Sequence[T]]:
    return [items[i : i + INSERT_CHUNK] for i in range(0, len(items), INSERT_CHUNK)]


def _insert_unique_retrying(
    store: Store, rows: Sequence[Job], notify: tuple[str, str] | None, unique_for: float | None
) -> list[Job]:
    """``_insert_unique`` in a transaction, tried again if the engine broke a deadlock with it.

    Only when that transaction is the outermost: inside the caller's ``atomic()`` a
    deadlock has rolled back the caller's work too, and the error is theirs to handle.
    """
    d, outermost = store.dialect, not store.connection.in_atomic_block
    for attempt in range(UNIQUE_TRIES):
        try:
            with d.write_transaction():
                return _insert_unique(store, rows, notify, unique_for)
        except OperationalError as e:
            if not (outermost and d.deadlock(e)) or attempt == UNIQUE_TRIES - 1:
                raise
            time.sleep(random.uniform(0, 0.01 * 2**attempt))
    raise AssertionError("unreachable")


def _insert_unique(
    store: Store, rows: Sequence[Job], notify: tuple[str, str] | None, unique_for: float | None
) -> list[Job]:
    """Insert each row unless a stored job holds its key; return the job holding each key.

    The unique index decides (never a look before the insert): the INSERT skips the rows
    whose key is taken, even by a transaction that commits meanwhile (the engine makes it
    wait for that one), and the holders are read back after it. A holder may let go of
    its key in between (it ended): those rows are tried again. With ``unique_for``, a
    holder enqueued that many seconds ago (store clock) lets go of its key first. Within
    ``rows``, the first of each key is inserted and the others get its job.
    """
    first: dict[str, Job] = {}
    for row in rows:
        if row.unique_slot is not None:
            first.setdefault(row.unique_slot, row)
    plain = [row for row in rows if row.unique_slot is None]
    for chunk in _chunks(plain):
        _insert_chunk(store, chunk, notify)
    holders: dict[str, Job] = {}
    pending = list(first.values())
    for _ in range(UNIQUE_TRIES):
        slots = [str(row.unique_slot) for row in pending]
        if unique_for is not None:
            _let_go_older(store, slots, unique_for)
        for chunk in _chunks(pending):
            _insert_chunk(store, chunk, notify, unless_taken=True)
        holders.update(_holders(store, slots))
        pending = [row for row in pending if row.unique_slot not in holders]
        if not pending:
            return [holders[row.unique_slot] if row.unique_slot else row for row in rows]
    raise DatabaseError(
        f"Could not store {len(pending)} unique job(s): their keys were taken and let go "
        f"{UNIQUE_TRIES} times while enqueueing."
    )


def _let_go_older(store: Store, slots: Sequence[str], seconds: float) -> None:
    """Let jobs holding these keys that were enqueued ``seconds`` ago or more let go."""
    for chunk in _chunks(slots):
        marks = ", ".join(["%s"] * len(chunk))
        store.execute(
            f"UPDATE {TABLE} SET unique_slot = NULL WHERE unique_slot IN ({marks}) "
            f"AND enqueued_at <= {store.dialect.earlier()}",
            [*chunk, seconds],
        )


def _holders(store: Store, slots: Sequence[str]) -> dict[str, Job]:
    """The stored jobs holding these unique keys, by key."""
    found: dict[str, Job] = {}
    for chunk in _chunks(slots):
        marks = ", ".join(["%s"] * len(chunk))
        sql = (
            f"SELECT {HOLDER_COLUMNS} FROM {TABLE} WHERE unique_slot IN ({marks})"
            f"{store.dialect.read_latest}"
        )
        found.update((str(row.unique_slot), row) for row in store.rows(sql, chunk, HOLDER_COLUMNS))
    return found


def _insert_chunk(
    store: Store,
    rows: Sequence[Job],
    notify: tuple[str, str] | None,
    unless_taken: bool = False,
) -> None:
    sql, params = _insert_sql(store, rows)
    if unless_taken:
        sql = store.dialect.insert_unless_taken(sql, "unique_slot")
    _send_insert(store, sql, params, notify)


def _send_insert(
    store: Store, sql: str, params: Sequence[Any], notify: tuple[str, str] | None
) -> None:
    if notify is not None:
        sql = store.dialect.notify_after(sql)  # type: ignore[attr-defined]
        params = (*params, *notify)
    store.execute(sql, params)


def _insert_sql(store: Store, rows: Sequence[Job]) -> tuple[str, tuple[Any, ...]]:
    """The multi-row INSERT Django would send (the key left to the database)."""
    query = InsertQuery(Job)
    query.insert_values(_INSERTED, list(rows))
    [(sql, compiled)] = query.get_compiler(using=store.using).as_sql()
    return sql, tuple(compiled)


_INSERTED = [f for f in Job._meta.concrete_fields if not f.primary_key]
# Column types whose values Django stores as they are, when they already have their type.
_PLAIN = {"CharField": str, "IntegerField": int, "SmallIntegerField": int, "BooleanField": bool}

Prepare = Callable[[Any, Any], Any]


@dataclass(frozen=True, slots=True)
class _OneRow:
    """The one-row INSERT of a database, and for each column in its order: the column's
    name, how a value given for it is prepared, and its default value, prepared."""

    sql: str
    steps: tuple[tuple[str, Prepare, Callable[[Any], Any]], ...]


def _one_row(store: Store) -> _OneRow:
    found = _SINGLE_INSERT.get(store.using)
    if found is None:
        sql, _ = _insert_sql(store, [Job()])
        steps = [(f.attname, _preparer(f), _default(f, store.connection)) for f in _INSERTED]
        found = _SINGLE_INSERT[store.using] = _OneRow(sql, tuple(steps))
    return found


def _default(field: Any, conn: Any) -> Callable[[Any], Any]:
    """A column's default, prepared once if it is a constant (a new one each time if not,
    such as a fresh UUID)."""
    if fresh_default(field):
        return lambda connection: field.get_db_prep_save(field.get_default(), connection)
    prepared = field.get_db_prep_save(field.get_default(), conn)
    return lambda connection: prepared


def _preparer(field: Any) -> Prepare:
    """How a value for ``field`` is prepared: as Django prepares it, skipping the steps
    that return a plain string, number or flag as it is."""
    plain = _PLAIN.get(field.get_internal_type())
    prepare = field.get_db_prep_save
    if plain is None:
        return prepare

    def prepare_plain(value: Any, conn: Any) -> Any:
        return value if type(value) is plain else prepare(value, conn)

    return prepare_plain


def stage(store: Store, limit: int) -> int:
    """Make scheduled jobs that are due by the store's clock ready, oldest due first."""
    d = store.dialect
    due = (
        f"SELECT id FROM {TABLE} WHERE {IS_SCHEDULED} AND backend_name = %s "
        f"AND available_at <= {d.reached()}"
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


def run_now(store: Store, keys: Sequence[Any]) -> int:
    """Make these scheduled jobs (their ``uuid`` column values) ready, due now (store clock).

    One transaction; ``available_at`` becomes now, so each joins the line behind the ready
    jobs of its priority, and ``run_after`` too, so its result says when it became due.
    """
    now = store.dialect.reached()  # after every job Django wrote as ready this millisecond
    moved = 0
    with store.dialect.write_transaction():
        for chunk in _chunks(keys):
            marks = ", ".join(["%s"] * len(chunk))
            moved += store.execute(
                f"UPDATE {TABLE} SET state = 'ready', available_at = {now}, run_after = {now} "
                f"WHERE backend_name = %s AND uuid IN ({marks}) AND {IS_SCHEDULED}",
                [store.backend, *chunk],
            )
    return moved


@functools.lru_cache(maxsize=256)
def _arms(store: Store, queues: QueueSelector, limit: int) -> tuple[str, tuple[Any, ...]]:
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
        return sql + tail, (*params, limit)
    names = sorted(queues.include - queues.exclude)
    if len(names) == 1:
        return f"{base} AND queue_name = %s{tail}", (store.backend, names[0], limit)
    arms = " UNION ALL ".join(
        f"{columns} FROM ({base} AND queue_name = %s{tail}) AS q{i}" for i in range(len(names))
    )
    per_queue = [p for name in names for p in (store.backend, name, limit)]
    return (
        f"{columns} FROM ({arms}) AS picked ORDER BY {CLAIM_ORDER} LIMIT %s",
        (*per_queue, limit),
    )


def claim(store: Store, worker_id: str, queues: QueueSelector, limit: int) -> list[JobRecord]:
    """Lease up to ``limit`` of the best ready jobs to ``worker_id``, under a new token."""
    if queues.include is not None and not (queues.include - queues.exclude):
        return []
    d = store.dialect
    pick, pick_params = _arms(store, queues, limit)
    token = secrets.token_hex(8)
    assign_params = [worker_id, token, store.lease, worker_id]
    if d.update_returning:
        if d.probe_before_claim and not store.fetch(*_arms(store, queues, 1)):
            return []  # nothing to take: a read, so no write lock is taken
        sql, params = d.claim_statement(
            TABLE, (pick, list(pick_params)), (_assign(store), assign_params), RETURNING
        )
        rows = store.values(sql, params, RETURNING)
    else:
        locked = _claim_locked(store, pick, list(pick_params), _assign(store), assign_params, token)
        rows = [fields_of(row) for row in locked]
    rows.sort(
        key=lambda row: (-row["priority"], row["available_at"] or row["enqueued_at"], row["id"])
    )
    return [record_of(row) for row in rows]


RETURNING = ", ".join(f"{TABLE}.{column}" for column in COLUMNS.split(", "))


def _assign(store: Store) -> str:
    """What a claim sets; its parameters: the worker id, the token, the lease, the worker id.

    ``started_at`` and ``last_attempted_at`` are written when the task really starts. Made
    at each claim: the store's clock in it depends on settings (``USE_TZ``) and on a test's
    moved clock (``conveyor.testing.store_clock``).
    """
    d = store.dialect
    return (
        f"state = 'running', lease_owner = %s, delivery = %s, lease_expires_at = {d.later()}, "
        f"attempts = attempts + 1, worker_ids = {d.append_text('worker_ids')}"
        f"{keep_slot(State.RUNNING)}"
    )


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
