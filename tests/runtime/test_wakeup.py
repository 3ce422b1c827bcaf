"""Idle workers wake for committed work on their own queues: LISTEN/NOTIFY, SQLite files."""

from __future__ import annotations

import logging
import sys
import threading
import time

import pytest
from django.db import connections, transaction
from django.tasks import TaskResultStatus

from conveyor import checks
from conveyor.backends.base import Waiter
from conveyor.backends.database import waiters
from conveyor.records import QueueSelector
from conveyor.runtime.loop import Loop, WorkerConfig
from tests.helpers import job, on, wait_for
from tests.testapp import tasks

DEFAULT = QueueSelector(include=frozenset({"default"}))
EMAILS = QueueSelector(include=frozenset({"emails"}))


@pytest.mark.parametrize("engine", ["postgres"], indirect=True)
def test_notify_wakes_a_waiting_worker_only_after_commit(backend, backend_alias):
    assert backend.supports_wakeup
    waiter = backend.waiter(QueueSelector())
    try:
        # Connecting says "look now": enqueues before the LISTEN reached nobody.
        assert waiter.wait(0.05) is True
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


@pytest.mark.parametrize("engine", ["postgres"], indirect=True)
def test_a_notification_wakes_only_workers_serving_its_queue(backend, backend_alias):
    waiter = backend.waiter(DEFAULT)
    try:
        assert waiter.wait(0.05) is True  # connected
        on(tasks.noop, backend_alias, queue_name="emails").enqueue()
        started = time.monotonic()
        assert waiter.wait(0.3) is False  # read, ignored, and waited out
        assert time.monotonic() - started >= 0.29
        on(tasks.noop, backend_alias, queue_name="default").enqueue()
        started = time.monotonic()
        assert waiter.wait(5.0) is True
        assert time.monotonic() - started < 1.0
    finally:
        waiter.close()


@pytest.mark.parametrize("engine", ["postgres"], indirect=True)
def test_a_worker_excluding_a_queue_is_not_woken_by_it(backend, backend_alias):
    waiter = backend.waiter(QueueSelector(exclude=frozenset({"emails"})))
    try:
        assert waiter.wait(0.05) is True
        on(tasks.noop, backend_alias, queue_name="emails").enqueue()
        assert waiter.wait(0.2) is False
        on(tasks.noop, backend_alias, queue_name="reports").enqueue()
        assert waiter.wait(5.0) is True
    finally:
        waiter.close()


@pytest.mark.parametrize("engine", ["postgres"], indirect=True)
def test_put_backs_wake_the_workers_of_their_queue_and_unknown_ones_wake_all(
    backend, backend_alias
):
    default, emails = backend.waiter(DEFAULT), backend.waiter(EMAILS)
    try:
        assert default.wait(0.05) is True and emails.wait(0.05) is True
        on(tasks.noop, backend_alias, queue_name="emails").enqueue()
        assert emails.wait(5.0) is True and default.wait(0.05) is False
        claimed = backend.claim("test-worker", EMAILS, 1)
        assert backend.unclaim(claimed) == 1  # names its queue
        assert emails.wait(5.0) is True and default.wait(0.2) is False
        backend._notify(1)  # queues unknown (as after recover()): everyone looks
        assert default.wait(5.0) is True and emails.wait(5.0) is True
    finally:
        default.close()
        emails.close()


@pytest.mark.parametrize("engine", ["postgres"], indirect=True)
def test_a_killed_listen_connection_comes_back_and_says_look_now(backend, caplog):
    waiter = backend.waiter(DEFAULT)
    try:
        assert waiter.wait(0.05) is True
        first = listener_pid(backend.database)
        terminate(backend.database, first)
        with caplog.at_level(logging.INFO, logger=waiters.__name__):
            started = time.monotonic()
            assert waiter.wait(5.0) is True  # failed, reconnected at once: look now
            assert time.monotonic() - started < 1.0
        assert listener_pid(backend.database) not in (None, first)
        messages = [r.getMessage() for r in caplog.records]
        assert sum("LISTEN connection on channel" in m and "failed" in m for m in messages) == 1
        assert sum(m.endswith(f"{backend.channel} is back.") for m in messages) == 1
        on(tasks.noop, backend.alias, queue_name="default").enqueue()
        assert waiter.wait(5.0) is True  # listening again
    finally:
        waiter.close()


@pytest.mark.parametrize("engine", ["postgres"], indirect=True)
def test_a_quiet_listen_connection_is_kept_alive_and_checked(backend, monkeypatch):
    monkeypatch.setattr(waiters, "PING_AFTER", 0.1)
    waiter = backend.waiter(DEFAULT)
    try:
        assert waiter.wait(0.05) is True
        options = {o.keyword: o.val for o in waiter.conn.pgconn.info}
        assert options[b"keepalives"] == b"1" and options[b"keepalives_idle"] == b"10"
        assert options[b"keepalives_interval"] == b"5" and options[b"keepalives_count"] == b"3"
        assert waiter.wait(0.35) is False  # pinged on the way, and still listening
        with connections[backend.database].cursor() as cursor:
            cursor.execute(
                "SELECT query FROM pg_stat_activity WHERE pid = %s", [waiter.conn.info.backend_pid]
            )
            assert cursor.fetchall() == [("SELECT 1",)]
        on(tasks.noop, backend.alias, queue_name="default").enqueue()
        assert waiter.wait(5.0) is True
    finally:
        waiter.close()


def listener_pid(database: str) -> int | None:
    """The server process of the LISTEN connection on this test database, if there is one."""
    with connections[database].cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND query LIKE 'LISTEN%%' AND pid <> pg_backend_pid()"
        )
        rows = cursor.fetchall()
    return rows[0][0] if len(rows) == 1 else None


def terminate(database: str, pid: int | None) -> None:
    assert pid is not None
    with connections[database].cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [pid])


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
        assert waiter.wait(0.2) is False  # that commit was seen: no second wake for it
    finally:
        waiter.close()


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_sqlite_sees_a_commit_made_before_the_wait_began(backend, backend_alias):
    connections[backend.database].ensure_connection()
    waiter = backend.waiter(QueueSelector())
    try:
        assert waiter.wait(0.05) is False
        on(tasks.noop, backend_alias).enqueue()  # between the claim and the next wait
        started = time.monotonic()
        assert waiter.wait(5.0) is True
        assert time.monotonic() - started < 0.1
    finally:
        waiter.close()


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_sqlite_ignores_writes_that_commit_nothing(backend, backend_alias):
    connections[backend.database].ensure_connection()
    waiter = backend.waiter(QueueSelector())
    try:
        assert waiter.wait(0.05) is False
        # The worker's own claim finds nothing: a read, no write, nothing to wake for.
        assert backend.claim("test-worker", QueueSelector(), 1) == []
        backend.next_due(QueueSelector())
        assert waiter.wait(0.3) is False
    finally:
        waiter.close()


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_sqlite_sleeps_through_a_wait_shorter_than_a_millisecond(backend):
    # The kernel is asked for whole milliseconds: a wait with less than one left is
    # rounded up, not down to a look-and-return that spins until the deadline.
    connections[backend.database].ensure_connection()
    waiter = backend.waiter(QueueSelector())
    try:
        waiter.wait(0.01)
        cpu, wall = time.process_time(), time.monotonic()
        for _ in range(100):
            assert waiter.wait(0.0009) is False
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        assert cpu < wall / 2, f"{cpu * 1000:.0f} ms of CPU in {wall * 1000:.0f} ms of waits"
    finally:
        waiter.close()


@pytest.mark.parametrize("engine", ["mysql"], indirect=True)
def test_mysql_polls(backend):
    assert not backend.supports_wakeup
    assert backend.waiter(QueueSelector()).wait(0.01) is False


def test_interrupt_ends_a_long_wait_at_once(backend, engine):
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


# --- PostgreSQL without psycopg 3 (psycopg2 only): plain polling, and a check says why ---


@pytest.fixture
def without_psycopg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # ``import psycopg`` now fails
    monkeypatch.setattr(waiters, "_told_polling", set())


@pytest.mark.parametrize("engine", ["postgres"], indirect=True)
def test_without_psycopg_3_workers_poll_and_say_so_once(backend, without_psycopg, caplog):
    assert not backend.supports_wakeup
    with caplog.at_level(logging.INFO, logger=waiters.__name__):
        first, second = backend.waiter(DEFAULT), backend.waiter(DEFAULT)
    assert type(first) is Waiter and type(second) is Waiter
    assert first.wait(0.01) is False
    [record] = caplog.records
    assert record.levelno == logging.INFO
    assert "psycopg 3 is not installed" in record.getMessage()


@pytest.mark.parametrize("engine", ["postgres"], indirect=True)
def test_without_psycopg_3_an_idle_loop_polls_and_finds_work(
    backend, backend_alias, without_psycopg
):
    loop = Loop(backend, WorkerConfig(worker_id="test-worker", queues=QueueSelector()))

    def run() -> None:
        try:
            loop.run()
        finally:
            connections.close_all()  # the loop leaves its caller's connections open

    thread = threading.Thread(target=run)
    thread.start()
    try:
        time.sleep(0.2)  # idle, waiting
        assert thread.is_alive()
        result = on(tasks.add, backend_alias).enqueue(2, 3)
        wait_for(lambda: job(result).status == TaskResultStatus.SUCCESSFUL, timeout=5.0)
    finally:
        loop.request_stop()
        thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.mark.parametrize("engine", ["postgres"], indirect=True)
def test_the_system_check_warns_without_psycopg_3(backend, backend_alias, without_psycopg):
    [warning] = [m for m in checks.check_psycopg() if backend_alias in m.msg]
    assert warning.id == "conveyor.W004"
    assert warning.msg == (
        f"PostgreSQL database {backend.database!r} is used by Conveyor backend "
        f"{backend_alias!r} but psycopg 3 is not installed: idle workers poll every "
        "POLL_INTERVAL instead of being woken."
    )
    assert warning.hint == "pip install 'django-conveyor[postgres]'"


def test_the_psycopg_check_looks_at_postgresql_databases_only():
    databases = {
        "default": {"ENGINE": "django.db.backends.sqlite3"},
        "pg": {"ENGINE": "django.db.backends.postgresql"},
        "gis": {"ENGINE": "django.contrib.gis.db.backends.postgis"},
    }
    used = {"local": "default", "main": "pg", "maps": "gis", "broken": "absent"}
    messages = checks.psycopg_messages(databases, used)
    assert [(m.id, m.msg.split(" is used")[0]) for m in messages] == [
        ("conveyor.W004", "PostgreSQL database 'pg'"),
        ("conveyor.W004", "PostgreSQL database 'gis'"),
    ]
    assert checks.psycopg_messages(databases, {}) == []


def test_the_psycopg_check_is_quiet_when_psycopg_3_is_there():
    assert waiters.psycopg_installed()
    assert checks.check_psycopg() == []
