"""Fill a fresh database with many Conveyor jobs, for the scale run (inside the client).

Ready jobs go in through ``conveyor.bulk_enqueue`` (timed: the enqueue rate); the backlog
beside them (scheduled and finished jobs) through set-based ``INSERT ... SELECT``, which
numbers its rows with a cross join of digits so that the same SQL runs on every engine.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from typing import Any

from django.db import connection
from django.utils import timezone

DRAIN_PRIORITY = 10  # the jobs the drain measures come first ...
SCHEDULED_PRIORITY = 50  # ... after scheduled ones, which rank higher but are not due
ENQUEUE_CHUNK = 10_000  # calls per bulk_enqueue() call
SQL_CHUNK = 100_000  # rows per INSERT ... SELECT
DIGITS = " UNION ALL ".join(f"SELECT {d} AS d" for d in range(10))

Figures = dict[str, Any]


def enqueue_ready(total: int, drain: int) -> Figures:
    """``bulk_enqueue`` ``drain`` jobs at ``DRAIN_PRIORITY``, then the rest at 0; timed."""
    from bench.app.tasks import noop_conveyor
    from conveyor import bulk_enqueue

    started = time.perf_counter()
    for priority, count in ((DRAIN_PRIORITY, drain), (0, total - drain)):
        task = noop_conveyor.using(priority=priority)
        for first in range(0, count, ENQUEUE_CHUNK):
            bulk_enqueue(task, [(i,) for i in range(first, min(first + ENQUEUE_CHUNK, count))])
    took = time.perf_counter() - started
    return {"enqueue_seconds": took, "enqueue_rate": total / took}


def insert_backlog(count: int) -> Figures:
    """Insert ``count`` scheduled jobs due in a year and ``count`` finished 30 days ago."""
    from bench.app.tasks import noop_conveyor

    now = timezone.now()
    common = {"backend_name": "conveyor", "queue_name": "default"}
    common |= {"task_path": noop_conveyor.module_path, "kwargs": {}, "errors": []}
    common |= {"lost": 0, "delivery": ""}  # Django sets no database defaults
    due, old = now + timedelta(days=365), now - timedelta(days=30)
    scheduled = common | {"priority": SCHEDULED_PRIORITY, "state": "scheduled", "attempts": 0}
    scheduled |= {"worker_ids": [], "enqueued_at": now, "run_after": due, "available_at": due}
    finished = common | {"priority": 0, "state": "succeeded", "attempts": 1}
    finished |= {"worker_ids": ["bench"], "delivery": "0" * 16, "enqueued_at": old}
    for column in ("available_at", "started_at", "last_attempted_at", "finished_at"):
        finished[column] = old
    started = time.perf_counter()
    for values in (scheduled, finished):
        for first in range(0, count, SQL_CHUNK):
            _insert_numbered(values, first, min(SQL_CHUNK, count - first))
    return {"backlog": count, "backlog_seconds": time.perf_counter() - started}


def analyze() -> None:
    """Refresh the planner's statistics, as autovacuum or InnoDB would soon do on their own."""
    statements = {"postgresql": "ANALYZE conveyor_job", "mysql": "ANALYZE TABLE conveyor_job"}
    if connection.vendor in statements:
        with connection.cursor() as cursor:
            cursor.execute(statements[connection.vendor])
            if cursor.description:
                cursor.fetchall()


def _insert_numbered(values: dict[str, Any], first: int, count: int) -> None:
    """One ``INSERT ... SELECT`` of ``count`` rows; row ``i`` gets ``args = [first + i]``."""
    columns, expressions, params = ["uuid", "args"], [_uuid(), _array_of("%s + i")], [first]
    for column, value in values.items():
        sql, value_params = sql_value(value)
        columns.append(column)
        expressions.append(sql)
        params += value_params
    places = len(str(max(count - 1, 1)))
    numbers = " + ".join(f"{10**k} * t{k}.d" for k in range(places))
    digits = ", ".join(f"({DIGITS}) AS t{k}" for k in range(places))
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO conveyor_job ({', '.join(columns)}) "
            f"SELECT {', '.join(expressions)} FROM (SELECT {numbers} AS i FROM {digits}) AS n "
            "WHERE i < %s",
            [*params, count],
        )


def sql_value(value: Any) -> tuple[str, list[Any]]:
    """The SQL for one constant column value, typed for its column, and its parameters."""
    ops = connection.ops
    if isinstance(value, datetime):
        cast = "::timestamptz" if connection.vendor == "postgresql" else ""
        return f"%s{cast}", [ops.adapt_datetimefield_value(value)]
    if isinstance(value, list | dict):
        cast = "::jsonb" if connection.vendor == "postgresql" else ""
        return f"%s{cast}", [json.dumps(value)]
    return "%s", [value]


def _uuid() -> str:
    from conveyor.models import Job

    if connection.vendor == "postgresql":
        return "gen_random_uuid()"
    if connection.vendor == "mysql":
        native = Job._meta.get_field("uuid").db_type(connection) == "uuid"  # MariaDB 10.7+
        return "UUID()" if native else "REPLACE(UUID(), '-', '')"
    return "lower(hex(randomblob(16)))"


def _array_of(sql: str) -> str:
    """A JSON array holding the one value ``sql``."""
    if connection.vendor == "postgresql":
        return f"jsonb_build_array({sql})"
    return f"json_array({sql})"
