"""SQL the ORM cannot say, per engine, for the state changes in ``conveyor.models``."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from django.db import connections, models, transaction
from django.db.models import Value
from django.db.models.functions import Cast
from django.db.models.sql import InsertQuery
from django.db.utils import NotSupportedError
from django.tasks import TaskResultStatus as Status


class JSONAppendText(models.Func):
    """Append one string to a JSON array column, in each engine's dialect."""

    output_field = models.JSONField()

    def __init__(self, array: Any, text: str) -> None:
        super().__init__(array, Value(text, output_field=models.TextField()))

    def _parts(self, compiler: Any) -> tuple[str, str, tuple[Any, ...]]:
        array_sql, array_params = compiler.compile(self.source_expressions[0])
        text_sql, text_params = compiler.compile(self.source_expressions[1])
        return array_sql, text_sql, (*array_params, *text_params)

    def as_sql(self, compiler: Any, connection: Any, *args: Any, **extra: Any) -> Any:
        raise NotSupportedError(f"Conveyor does not support the {connection.vendor} database.")

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        array, text, params = self._parts(compiler)
        return f"json_insert({array}, '$[#]', {text})", params

    def as_postgresql(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        array, text, params = self._parts(compiler)
        return f"({array} || to_jsonb(({text})::text))", params

    def as_mysql(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        array, text, params = self._parts(compiler)
        return f"JSON_ARRAY_APPEND({array}, '$', {text})", params


@contextmanager
def write_transaction(using: str) -> Iterator[None]:
    """Open a transaction that holds the write lock from its first statement.

    SQLite lets a deferred transaction read and then fail to upgrade to a write when
    another connection wrote meanwhile ("database is locked", with no waiting). Starting
    with BEGIN IMMEDIATE makes writers queue on the busy timeout instead.
    """
    conn: Any = connections[using]
    if conn.vendor != "sqlite" or conn.in_atomic_block:
        with transaction.atomic(using=using):
            yield
        return
    conn.ensure_connection()
    previous = conn.transaction_mode
    conn.transaction_mode = "IMMEDIATE"
    try:
        with transaction.atomic(using=using):
            conn.transaction_mode = previous  # BEGIN IMMEDIATE has been sent
            yield
    finally:
        conn.transaction_mode = previous


def per_row(rows: Sequence[tuple[Any, ...]], index: int, field: models.Field) -> Any:
    """A value that differs by row: ``CASE id WHEN ... THEN ...`` (or the one value)."""

    def value(row: tuple[Any, ...]) -> Any:
        # A typed parameter inside CASE still needs a cast for PostgreSQL's jsonb.
        return Cast(Value(row[index], output_field=field), output_field=field)

    if len(rows) == 1:
        return value(rows[0])
    return models.Case(
        *[models.When(pk=row[0], then=value(row)) for row in rows], output_field=field
    )


class ClaimChanges:
    """What a claim writes to each row it takes, as SQL for the one-statement claims."""

    def __init__(self, worker_id: str, now: datetime, expires: datetime) -> None:
        self.worker_id, self.now, self.expires = worker_id, now, expires

    def sql(self, conn: Any) -> tuple[str, tuple[Any, ...]]:
        now = conn.ops.adapt_datetimefield_value(self.now)
        expires = conn.ops.adapt_datetimefield_value(self.expires)
        if conn.vendor == "postgresql":
            append = "worker_ids || to_jsonb((%s)::text)"
        else:
            append = "json_insert(worker_ids, '$[#]', %s)"
        return (
            "status = %s, lease_owner = %s, lease_expires_at = %s, attempts = attempts + 1, "
            f"started_at = COALESCE(started_at, %s), last_attempted_at = %s, worker_ids = {append}",
            (Status.RUNNING, self.worker_id, expires, now, now, self.worker_id),
        )


def claim_returning_sql(
    conn: Any, table: str, pick_sql: str, pick_params: Sequence[Any], changes: ClaimChanges
) -> tuple[str, tuple[Any, ...]]:
    """One statement that picks, locks, updates and returns the claimed rows."""
    set_sql, set_params = changes.sql(conn)
    if conn.vendor == "postgresql":
        # MATERIALIZED: the LIMIT subquery runs once, so exactly ``limit`` rows are taken.
        return (
            f"WITH picked (id) AS MATERIALIZED ({pick_sql} FOR UPDATE SKIP LOCKED) "
            f"UPDATE {table} SET {set_sql} FROM picked "
            f"WHERE {table}.id = picked.id RETURNING {table}.*",
            (*pick_params, *set_params),
        )
    # SQLite: a single UPDATE takes the write lock first, so the rows it picks are its own.
    return (
        f"UPDATE {table} SET {set_sql} WHERE {table}.status = %s AND {table}.id IN "
        f"({pick_sql}) RETURNING *",
        (*set_params, Status.READY, *pick_params),
    )


def complete_from_values_sql(
    conn: Any, table: str, successes: Sequence[tuple[int, Any, datetime]]
) -> tuple[str, list[Any]]:
    """One UPDATE ... FROM (VALUES ...) that records many successes and returns their ids."""
    params: list[Any] = [Status.SUCCESSFUL]
    for pk, value, finished_at in successes:
        params += [
            pk,
            None if value is None else json.dumps(value),
            conn.ops.adapt_datetimefield_value(finished_at),
        ]
    rows = ", ".join(["(%s, %s, %s)"] * len(successes))
    if conn.vendor == "postgresql":
        source = f"(VALUES {rows}) AS v (id, rv, fin)"
        assign = "return_value = v.rv::jsonb, finished_at = v.fin::timestamptz"
        key = "v.id::bigint"
    else:
        source = f"(VALUES {rows}) AS v"
        assign = "return_value = v.column2, finished_at = v.column3"
        key = "v.column1"
    sql = (
        f"UPDATE {table} SET status = %s, {assign}, lease_owner = NULL, "
        f"lease_expires_at = NULL FROM {source} "
        f"WHERE {table}.id = {key} AND {table}.status IN (%s, %s) RETURNING {table}.id"
    )
    return sql, [*params, Status.READY, Status.RUNNING]


_SINGLE_INSERT: dict[tuple[str, str], str] = {}


def insert_sql(model: Any, rows: Sequence[Any], using: str) -> tuple[str, tuple[Any, ...]]:
    """The plain multi-row INSERT Django would send for ``rows`` (the key left to the DB).

    The one-row statement, the hot path of ``enqueue()``, is compiled once per database;
    its parameters are prepared the way Django's insert compiler prepares them.
    """
    fields = [f for f in model._meta.concrete_fields if not f.primary_key]
    key = (model._meta.label, using)
    if len(rows) == 1 and key in _SINGLE_INSERT:
        conn = connections[using]
        [row] = rows
        params = tuple(f.get_db_prep_save(f.pre_save(row, True), conn) for f in fields)
        return _SINGLE_INSERT[key], params
    query = InsertQuery(model)
    query.insert_values(fields, list(rows))
    [(sql, compiled)] = query.get_compiler(using=using).as_sql()
    if len(rows) == 1:
        _SINGLE_INSERT[key] = sql
    return sql, tuple(compiled)


def notify_after_insert_sql(
    sql: str, params: Sequence[Any], channel: str, payload: str
) -> tuple[str, tuple[Any, ...]]:
    """Wrap an INSERT so that the same statement also sends one NOTIFY (PostgreSQL)."""
    return (
        f"WITH inserted AS ({sql} RETURNING 1) "
        "SELECT pg_notify(%s, %s) FROM (SELECT 1 FROM inserted LIMIT 1) AS one",
        (*params, channel, payload),
    )
