"""How a store sends its statements on SQLite: straight to the driver unless someone watches.

Django's cursor wrapping costs about as much as a small SQLite statement, so the store runs
its statements on the driver's connection. What a Django user relies on must hold all the
same: errors are Django's, ``%%`` is a literal percent sign, statements inside ``atomic()``
roll back with it, and whatever watches the connection's queries (``DEBUG``,
``CaptureQueriesContext``, ``execute_wrapper``) sees every statement.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.db import IntegrityError, connections, transaction
from django.tasks import task_backends
from django.test.utils import CaptureQueriesContext

from conveyor.records import QueueSelector
from tests.testapp.tasks import add

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def backend() -> Any:
    found = task_backends["default"]
    assert found.store.connection.vendor == "sqlite"
    return found


def test_statements_skip_djangos_cursor_when_nobody_watches(backend: Any, monkeypatch) -> None:
    conn = backend.store.connection
    conn.ensure_connection()

    def no_cursor() -> None:
        raise AssertionError("Django's cursor was used")

    monkeypatch.setattr(conn, "cursor", no_cursor)
    result = add.using(backend="default").enqueue(1, 2)
    jobs = backend.claim("w1", QueueSelector(), 5)
    assert [job.id for job in jobs] == [result.id]


def test_watched_connections_record_every_statement(backend: Any) -> None:
    conn = backend.store.connection
    with CaptureQueriesContext(conn) as captured:
        add.using(backend="default").enqueue(1, 2)
        backend.claim("w1", QueueSelector(), 5)
    sent = [query["sql"] for query in captured.captured_queries]
    assert any(sql.startswith("INSERT INTO") for sql in sent)
    assert any(sql.startswith("UPDATE conveyor_job SET state = 'running'") for sql in sent)

    seen: list[str] = []

    def record(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        seen.append(sql)
        return execute(sql, params, many, context)

    with conn.execute_wrapper(record):
        backend.store.fetch("SELECT 1")
    assert seen == ["SELECT 1"]


def test_errors_are_djangos_and_the_connection_goes_on(backend: Any) -> None:
    add.using(backend="default").enqueue(1, 2)
    store = backend.store
    with pytest.raises(IntegrityError):  # the args column must hold JSON
        store.execute(
            "UPDATE conveyor_job SET args = %s WHERE id IN (SELECT id FROM conveyor_job)",
            ["not json"],
        )
    assert store.fetch("SELECT %s + %s", [2, 3]) == [(5,)]


def test_a_double_percent_is_a_percent_sign(backend: Any) -> None:
    rows = backend.store.fetch("SELECT strftime('%%s', %s)", ["2020-01-01 00:00:00"])
    assert rows == [("1577836800",)]


def test_statements_inside_atomic_roll_back_with_it(backend: Any) -> None:
    result = add.using(backend="default").enqueue(1, 2)
    store = backend.store
    with pytest.raises(RuntimeError), transaction.atomic(using=store.using):
        changed = store.execute("UPDATE conveyor_job SET priority = 7")
        assert changed == 1
        raise RuntimeError("roll back")
    assert store.fetch("SELECT priority FROM conveyor_job") == [(0,)]
    assert not connections[store.using].in_atomic_block
    assert backend.get_result(result.id).task.priority == 0
