"""PostgreSQL wakes idle workers with LISTEN/NOTIFY, only for committed enqueues."""

from __future__ import annotations

import time

import pytest
from django.db import connections, transaction

from conveyor.records import QueueSelector
from tests.helpers import on
from tests.testapp import tasks


@pytest.mark.parametrize("engine", ["postgres"], indirect=True)
def test_notify_wakes_a_waiting_worker_only_after_commit(backend, backend_alias):
    assert backend.supports_wakeup
    waiter = backend.waiter(QueueSelector())
    try:
        assert waiter.wait(0.05) is False  # connects and listens
        with pytest.raises(RuntimeError), transaction.atomic(using=backend.database):
            on(tasks.noop, backend_alias).enqueue()
            raise RuntimeError
        assert waiter.wait(0.3) is False
        on(tasks.noop, backend_alias).enqueue()
        started = time.monotonic()
        assert waiter.wait(5.0) is True
        assert time.monotonic() - started < 5.0
    finally:
        waiter.close()


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_sqlite_wakes_a_waiting_worker_on_commit(backend, backend_alias):
    assert backend.supports_wakeup
    # Opening the first connection creates the -wal file, which wakes watchers harmlessly.
    connections[backend.database].ensure_connection()
    waiter = backend.waiter(QueueSelector())
    try:
        assert waiter.wait(0.05) is False
        with pytest.raises(RuntimeError), transaction.atomic(using=backend.database):
            on(tasks.noop, backend_alias).enqueue()
            raise RuntimeError
        assert waiter.wait(0.2) is False
        on(tasks.noop, backend_alias).enqueue()
        assert waiter.wait(5.0) is True
    finally:
        waiter.close()


@pytest.mark.parametrize("engine", ["mysql"], indirect=True)
def test_mysql_polls(backend):
    assert not backend.supports_wakeup
    assert backend.waiter(QueueSelector()).wait(0.01) is False


def test_interrupt_ends_a_long_wait_at_once(backend, engine):
    import threading

    if engine == "sqlite":
        connections[backend.database].ensure_connection()
    waiter = backend.waiter(QueueSelector())
    try:
        waiter.wait(0.01)
        threading.Timer(0.2, waiter.interrupt).start()
        started = time.monotonic()
        assert waiter.wait(30.0) is False
        assert time.monotonic() - started < 5.0
    finally:
        waiter.close()
