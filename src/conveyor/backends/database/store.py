"""The database backend's plumbing: the tables, one connection's statements, row values."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import DEFERRED, JSONField
from django.tasks.base import TaskError

from conveyor import clock
from conveyor.backends.database.dialects import Dialect, dialect_for
from conveyor.backends.database.models import Job, Worker
from conveyor.options import UNIQUE_STATES
from conveyor.records import FINISHED_STATES, State
from conveyor.records import Job as JobRecord

TABLE = Job._meta.db_table
WORKERS = Worker._meta.db_table
# Columns a claim reads back; what ``to_record`` needs.
COLUMNS = (
    "id, uuid, backend_name, queue_name, task_path, priority, args, kwargs, attempts, "
    "enqueued_at, run_after, started_at, last_attempted_at, worker_ids, errors, delivery, "
    "options, available_at"  # the claim's sort key: left out, each row would be read again
)
# What a result read adds to them.
RESULT_COLUMNS = f"{COLUMNS}, state, finished_at, return_value"
FINISHED = "(" + ", ".join(f"'{s}'" for s in FINISHED_STATES) + ")"
# One state's rows, written as the partial indexes' conditions are (``IN``): SQLite uses a
# partial index only when the query repeats its condition, and ``state = 'ready'`` does not.
IS_READY = "state IN ('ready')"
IS_SCHEDULED = "state IN ('scheduled')"
IS_RUNNING = "state IN ('running')"
IS_SUCCEEDED = "state IN ('succeeded')"
# What reading a unique job back by its key returns.
HOLDER_COLUMNS = f"{RESULT_COLUMNS}, unique_slot"


def keep_slot(state: State) -> str:
    """``, unique_slot = ...``: what an UPDATE moving jobs to ``state`` does to their keys.

    A job keeps its unique key only while its state is one its ``unique_states`` covers;
    a key let go is never taken back (another job may hold it by then). Empty when every
    choice covers ``state``.
    """
    keeping = [name for name, states in UNIQUE_STATES.items() if state in states]
    if len(keeping) == len(UNIQUE_STATES):
        return ""
    if not keeping:
        return ", unique_slot = NULL"
    names = ", ".join(f"'{name}'" for name in keeping)
    return f", unique_slot = CASE WHEN unique_states IN ({names}) THEN unique_slot END"


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
        return self._run(sql, params, lambda cursor: int(cursor.rowcount))

    def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._run(sql, params, lambda cursor: list(cursor.fetchall()))

    def _run[T](self, sql: str, params: Sequence[Any], read: Callable[[Any], T]) -> T:
        """Run one statement and ``read`` its cursor: the driver's own where it may be
        used (``_driver``), else Django's."""
        conn = self.connection
        driver = _driver(conn)
        if driver is not None:
            with conn.wrap_database_errors:
                return read(driver.execute(_qmark(sql), params))
        with conn.cursor() as cursor:
            cursor.execute(sql, params)
            return read(cursor)

    def rows(self, sql: str, params: Sequence[Any], columns: str) -> list[Job]:
        """Run a statement that returns ``columns`` (in that order); its rows as ``Job``s.

        The values are converted as the ORM converts them, without building a query each
        time: reading a result and claiming are the hot paths of every job.
        """
        conn = self.connection
        reading = _reading(conn, columns)
        width = len(Job._meta.concrete_fields)
        rows = []
        for row in self.fetch(sql, params):
            values: list[Any] = [DEFERRED] * width  # columns not read stay deferred
            for index, value in zip(reading.places, reading.convert(row, conn), strict=True):
                values[index] = value
            rows.append(Job.from_db(self.using, (), values))
        return rows

    def values(self, sql: str, params: Sequence[Any], columns: str) -> list[dict[str, Any]]:
        """Like ``rows``, each row as its values by column name: no model instance is built
        (a claim turns them into records at once)."""
        conn = self.connection
        reading = _reading(conn, columns)
        names = reading.names
        fetched = self.fetch(sql, params)
        return [dict(zip(names, reading.convert(row, conn), strict=True)) for row in fetched]

    def time(self, value: datetime | None) -> Any:
        return self.connection.ops.adapt_datetimefield_value(value)

    def now(self) -> datetime:
        """The store's clock, read from the database (aware)."""
        value = self.fetch(f"SELECT {self.dialect.reached()}")[0][0]
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        return clock.aware(value)


def _driver(conn: BaseDatabaseWrapper) -> Any | None:
    """SQLite's own connection, to run a statement on directly; None: use Django's cursor.

    Django's cursor wrapping costs about as much as a small SQLite statement itself (some
    0.17 ms of a cold CPU's time, measured), and every job takes three such statements.
    Errors are still Django's (``wrap_database_errors``), and the connection is opened and
    checked as a cursor would. A connection whose queries someone watches (``DEBUG``,
    ``CaptureQueriesContext``, ``execute_wrapper()``) keeps Django's cursor, so each
    statement is recorded as before; so does every other engine, where the round trip to
    the server outweighs the wrapping by far.
    """
    if conn.vendor != "sqlite" or conn.execute_wrappers or conn.queries_logged:
        return None
    conn.close_if_health_check_failed()
    conn.ensure_connection()
    conn.validate_thread_sharing()
    conn.validate_no_broken_transaction()
    return conn.connection


def _qmark(sql: str) -> str:
    """``sql`` with the ``%s`` placeholders SQLite's driver takes as ``?``, as Django's
    SQLite cursor converts them. The statements of every job are short and few, and kept;
    long ones (a bulk insert, a long ``IN`` list) differ at each size and are not."""
    if len(sql) > QMARK_KEPT:
        return _convert_marks(sql)
    return _kept_qmark(sql)


@functools.lru_cache(maxsize=256)
def _kept_qmark(sql: str) -> str:
    return _convert_marks(sql)


def _convert_marks(sql: str) -> str:
    return _FORMAT_MARK.sub("?", sql).replace("%%", "%")


QMARK_KEPT = 2000  # characters: longer statements are converted each time
_FORMAT_MARK = re.compile(r"(?<!%)%s")

Converter = Callable[[tuple[Any, ...], BaseDatabaseWrapper], list[Any]]


@dataclass(frozen=True, slots=True)
class _Reading:
    """How rows of some columns of the jobs table are read, as the ORM would read them."""

    names: tuple[str, ...]  # the columns, in order
    places: tuple[int, ...]  # each one's place among ``Job``'s fields
    convert: Converter  # a row -> its values, converted, in the columns' order


_READINGS: dict[tuple[str, str], _Reading] = {}


def _reading(conn: BaseDatabaseWrapper, columns: str) -> _Reading:
    key = (conn.alias, columns)  # per database: each may read times in its own zone
    if key not in _READINGS:
        _READINGS[key] = _make_reading(conn, columns)
    return _READINGS[key]


def _make_reading(conn: BaseDatabaseWrapper, columns: str) -> _Reading:
    names = tuple(name.strip().rpartition(".")[2] for name in columns.split(","))
    fields = Job._meta.concrete_fields
    where = {field.column: i for i, field in enumerate(fields)}
    steps = []  # (position, how its value is converted), for the columns that need it
    for position, name in enumerate(names):
        field = fields[where[name]]
        col = field.get_col(TABLE)
        converters = (*conn.ops.get_db_converters(col), *col.get_db_converters(conn))
        if converters:
            steps.append((position, _column_converter(field, col, converters)))

    def convert(row: tuple[Any, ...], connection: BaseDatabaseWrapper) -> list[Any]:
        values = list(row)
        for position, converter in steps:
            value = values[position]
            if value is not None:  # every converter of these columns keeps NULL as None
                values[position] = converter(value, connection)
        return values

    return _Reading(names, tuple(where[name] for name in names), convert)


def _column_converter(
    field: Any, col: Any, converters: Sequence[Callable[..., Any]]
) -> Callable[[Any, BaseDatabaseWrapper], Any]:
    """One column's converters as one call: a JSON column whose only converter is the
    field's own (no decoder of its own) is read with ``json.loads``, as it would."""
    plain_json = isinstance(field, JSONField) and field.decoder is None
    if plain_json and list(converters) == [field.from_db_value]:
        return _json_column
    if len(converters) == 1:
        [only] = converters
        return lambda value, connection: only(value, col, connection)

    def chained(value: Any, connection: BaseDatabaseWrapper) -> Any:
        for converter in converters:
            value = converter(value, col, connection)
        return value

    return chained


def _json_column(value: Any, connection: BaseDatabaseWrapper) -> Any:
    """``JSONField.from_db_value`` for a plain column (not a key of one)."""
    if value == "[]":  # most jobs' errors, and their arguments often: no parser needed
        return []
    if value == "{}":
        return {}
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def to_record(row: Job) -> JobRecord:
    """The frozen value the runtime works with, for one delivered row."""
    return record_of(fields_of(row))


def fields_of(row: Job) -> dict[str, Any]:
    """``row``'s values by column name, deferred ones read now (as attribute access would)."""
    deferred = row.get_deferred_fields()
    if deferred:
        row.refresh_from_db(fields=list(deferred))
    return vars(row)


def new_row_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """A new job's column values: ``values``, and every other column's default (no key)."""
    return {**_defaults(), "id": None, **values}


@functools.cache
def _defaults() -> dict[str, Any]:
    # Lists and dicts among them are shared: a record copies what it keeps of them. A
    # default made anew for each row (the uuid) is left out: the caller gives it.
    fields = Job._meta.concrete_fields
    return {field.attname: field.get_default() for field in fields if not fresh_default(field)}


def fresh_default(field: Any) -> bool:
    """Say whether ``field``'s default is made anew for each row (such as a uuid), rather
    than a constant (a list or dict default is an empty one each time, always equal)."""
    return field.has_default() and callable(field.default) and field.default not in (list, dict)


def record_of(values: Mapping[str, Any]) -> JobRecord:
    """The record of a row read as ``values`` by column name (``COLUMNS`` at least)."""
    return JobRecord(
        id=str(values["uuid"]),
        task_path=values["task_path"],
        backend=values["backend_name"],
        queue_name=values["queue_name"],
        priority=values["priority"],
        args=values["args"],
        kwargs=values["kwargs"],
        attempt=values["attempts"],
        enqueued_at=values["enqueued_at"],
        run_after=values["run_after"],
        started_at=values["started_at"],
        last_attempted_at=values["last_attempted_at"],
        worker_ids=tuple(values["worker_ids"]),
        errors=tuple(TaskError(**error) for error in values["errors"]),
        delivery=values["delivery"],
        key=values["id"],
        options=values["options"] or {},
    )


def error_json(error: TaskError) -> str:
    return json.dumps(
        {"exception_class_path": error.exception_class_path, "traceback": error.traceback}
    )


def pairs(keys: Sequence[Any], values: Sequence[Any]) -> list[Any]:
    """``[key1, value1, key2, value2, ...]``: the parameters of a ``per_row`` CASE."""
    return [p for pair in zip(keys, values, strict=True) for p in pair]


def per_row(count: int, value: str) -> str:
    """``CASE id WHEN %s THEN <value> ...`` for ``count`` rows (parameters: key, value)."""
    return "CASE id " + " ".join([f"WHEN %s THEN {value}"] * count) + " END"


def json_text(value: Any) -> str | None:
    return None if value is None else json.dumps(value, allow_nan=False)
