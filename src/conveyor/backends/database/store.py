"""The database backend's plumbing: the tables, one connection's statements, row values."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import DEFERRED
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
        with self.connection.cursor() as cursor:
            cursor.execute(sql, params)
            return int(cursor.rowcount)

    def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.connection.cursor() as cursor:
            cursor.execute(sql, params)
            return list(cursor.fetchall())

    def rows(self, sql: str, params: Sequence[Any], columns: str) -> list[Job]:
        """Run a statement that returns ``columns`` (in that order); its rows as ``Job``s.

        The values are converted as the ORM converts them, without building a query each
        time: reading a result and claiming are the hot paths of every job.
        """
        conn = self.connection
        convert = _converter(conn, columns)
        with conn.cursor() as cursor:
            cursor.execute(sql, params)
            fetched = cursor.fetchall()
        return [Job.from_db(self.using, (), convert(row, conn)) for row in fetched]

    def time(self, value: datetime | None) -> Any:
        return self.connection.ops.adapt_datetimefield_value(value)

    def now(self) -> datetime:
        """The store's clock, read from the database (aware)."""
        value = self.fetch(f"SELECT {self.dialect.reached()}")[0][0]
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        return clock.aware(value)


Converter = Callable[[tuple[Any, ...], BaseDatabaseWrapper], list[Any]]
_CONVERTERS: dict[tuple[str, str], Converter] = {}


def _converter(conn: BaseDatabaseWrapper, columns: str) -> Converter:
    """A function turning one row of ``columns`` into ``Job``'s field values, in order."""
    key = (conn.alias, columns)  # per database: each may read times in its own zone
    if key not in _CONVERTERS:
        _CONVERTERS[key] = _make_converter(conn, columns)
    return _CONVERTERS[key]


def _make_converter(conn: BaseDatabaseWrapper, columns: str) -> Converter:
    names = [name.strip().rpartition(".")[2] for name in columns.split(",")]
    fields = Job._meta.concrete_fields
    where = {field.column: i for i, field in enumerate(fields)}
    steps = []
    for name in names:
        col = fields[where[name]].get_col(TABLE)
        found = (*conn.ops.get_db_converters(col), *col.get_db_converters(conn))
        steps.append((where[name], col, found))

    def convert(row: tuple[Any, ...], connection: BaseDatabaseWrapper) -> list[Any]:
        values: list[Any] = [DEFERRED] * len(fields)  # columns not read stay deferred
        for value, (index, col, converters) in zip(row, steps, strict=True):
            for converter in converters:
                value = converter(value, col, connection)
            values[index] = value
        return values

    return convert


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
        options=row.options or {},
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
