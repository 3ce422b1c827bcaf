"""System checks that run with plain ``manage.py check`` (and so at worker start), and WAL.

The settings-only checks must never touch a database: these tests that run them carry no
``django_db`` mark, so pytest-django fails any query, and the SQLite databases they add
point into a directory that does not exist, so a connection could not open anyway.
"""

from __future__ import annotations

import copy
import os
import sqlite3
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core import checks
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections
from django.db.utils import load_backend
from django.test import override_settings

from conveyor.checks import (
    check_mysql_version,
    check_sqlite_timeout,
    check_use_tz,
    conveyor_databases,
    mysql_version_messages,
)

SQLITE = "django.db.backends.sqlite3"
DATABASE_BACKEND = "conveyor.backends.database.DatabaseBackend"
NOWHERE = "/nonexistent-conveyor-dir/jobs.sqlite3"


@contextmanager
def configured_database(alias: str, params: dict[str, Any]) -> Iterator[None]:
    """Add ``alias`` to ``DATABASES`` (settings only: nothing here connects to it)."""
    connections.settings[alias] = connections.configure_settings(
        {"default": {}, alias: copy.deepcopy(params)}
    )[alias]
    try:
        yield
    finally:
        del connections.settings[alias]


def tasks_using(**databases: str) -> dict[str, Any]:
    """``TASKS`` as configured, plus one Conveyor backend per ``alias=database``."""
    extra = {
        alias: {"BACKEND": DATABASE_BACKEND, "OPTIONS": {"DATABASE": database}}
        for alias, database in databases.items()
    }
    return {**settings.TASKS, **extra}


def ids(messages: list[checks.CheckMessage]) -> list[str]:
    return [str(message.id) for message in messages]


# --- which databases are Conveyor's --------------------------------------------------


def test_conveyor_databases_come_from_tasks_without_building_backends():
    tasks = {
        "a": {"BACKEND": DATABASE_BACKEND},
        "b": {"BACKEND": DATABASE_BACKEND, "OPTIONS": {"DATABASE": "jobs"}},
        "memory": {"BACKEND": "conveyor.backends.memory.MemoryBackend"},
        "immediate": {"BACKEND": "django.tasks.backends.immediate.ImmediateBackend"},
        "broken": {"BACKEND": "no.such.Backend"},
        "odd": {"BACKEND": "conveyor.conf.BackendOptions"},
        "bad-options": {"BACKEND": DATABASE_BACKEND, "OPTIONS": {"DATABASE": "x", "NOPE": 1}},
    }
    assert conveyor_databases(tasks) == {"default", "jobs", "x"}
    servers = {alias for alias in ("postgres", "mysql") if alias in settings.DATABASES}
    assert conveyor_databases() == {"default", *servers}  # the test settings' TASKS


# --- W001: the SQLite busy timeout, in plain check --------------------------------------


def test_sqlite_timeout_check_is_not_a_database_check():
    assert checks.Tags.database not in check_sqlite_timeout.tags  # type: ignore[attr-defined]
    assert "conveyor" in check_sqlite_timeout.tags  # type: ignore[attr-defined]


@pytest.mark.django_db(databases="__all__")  # Django's own model checks query every database
def test_plain_check_warns_about_a_short_timeout_on_a_conveyor_database(monkeypatch):
    monkeypatch.setitem(settings.DATABASES["default"]["OPTIONS"], "timeout", 1)
    [warning] = [m for m in checks.run_checks() if m.id == "conveyor.W001"]
    assert "DATABASES['default'] waits only 1s" in warning.msg
    err = StringIO()
    call_command("check", stderr=err)
    assert "conveyor.W001" in err.getvalue() and "DATABASES['default']" in err.getvalue()


@pytest.mark.django_db(databases="__all__")
def test_the_worker_runs_the_checks_before_it_starts(monkeypatch):
    monkeypatch.setitem(settings.DATABASES["default"]["OPTIONS"], "timeout", 2)
    err = StringIO()
    # The unknown backend stops the command after the checks ran, before any worker.
    with pytest.raises(CommandError, match="--backend 'nope'"):
        call_command("conveyor", "worker", "--backend", "nope", skip_checks=False, stderr=err)
    assert "conveyor.W001" in err.getvalue() and "waits only 2s" in err.getvalue()


def test_conveyors_settings_checks_never_touch_a_database():
    # No django_db mark: any query fails the test; and the new database cannot be opened.
    params = {"ENGINE": SQLITE, "NAME": NOWHERE, "OPTIONS": {"timeout": 1}}
    with (
        configured_database("jobs_db", params),
        override_settings(TASKS=tasks_using(j="jobs_db"), USE_TZ=False),
    ):
        messages = checks.run_checks(tags=["conveyor"])
    assert sorted(ids(messages)) == ["conveyor.W001", "conveyor.W002"]
    # Django keeps its checks in a set: their order is not fixed.
    [timeout] = [m for m in messages if m.id == "conveyor.W001"]
    assert "DATABASES['jobs_db'] waits only 1s" in timeout.msg


def test_the_timeout_warning_ignores_databases_conveyor_does_not_use():
    params = {"ENGINE": SQLITE, "NAME": NOWHERE, "OPTIONS": {"timeout": 1}}
    with configured_database("other_db", params):
        assert check_sqlite_timeout() == []
    # A database without OPTIONS waits Django's 5 s.
    with (
        configured_database("bare_db", {"ENGINE": SQLITE, "NAME": NOWHERE}),
        override_settings(TASKS=tasks_using(j="bare_db")),
    ):
        [warning] = check_sqlite_timeout()
        assert "DATABASES['bare_db'] waits only 5s" in warning.msg


# --- W002: USE_TZ -----------------------------------------------------------------------


def test_naive_times_are_warned_about_when_conveyor_keeps_jobs_in_a_database():
    assert check_use_tz() == []
    with override_settings(USE_TZ=False):
        [warning] = check_use_tz()
        assert warning.id == "conveyor.W002" and "USE_TZ" in warning.msg
        assert "UTC" in warning.msg and warning.hint and "USE_TZ = True" in warning.hint
    memory_only = {"memory": {"BACKEND": "conveyor.backends.memory.MemoryBackend"}}
    with override_settings(USE_TZ=False, TASKS=memory_only):
        assert check_use_tz() == []


# --- W003: the MySQL/MariaDB version ----------------------------------------------------


@pytest.mark.parametrize(
    ("is_mariadb", "version", "warned"),
    [
        (True, (10, 6, 21), True),
        (True, (10, 7, 8), True),
        (True, (10, 8, 0), False),
        (True, (11, 4, 5), False),
        (False, (5, 7, 44), True),
        (False, (8, 0, 11), False),
        (False, (9, 1, 0), False),
    ],
)
def test_old_mysql_and_mariadb_are_warned_about(is_mariadb, version, warned):
    messages = mysql_version_messages("jobs", is_mariadb, version)
    assert ids(messages) == (["conveyor.W003"] if warned else [])
    if warned:
        name = "MariaDB" if is_mariadb else "MySQL"
        assert f"DATABASES['jobs'] is {name} {'.'.join(map(str, version))}" in messages[0].msg
        assert "10.8" in str(messages[0].hint) if is_mariadb else "8.0" in str(messages[0].hint)


def test_the_version_check_is_a_database_check():
    assert checks.Tags.database in check_mysql_version.tags  # type: ignore[attr-defined]
    assert check_mysql_version(databases=None) == []  # plain check: no database is asked
    assert check_mysql_version(databases=["default"]) == []  # SQLite


@pytest.mark.django_db(databases=["mysql"])
def test_the_version_check_asks_the_server():
    if "mysql" not in settings.DATABASES:
        pytest.skip("no mysql server on this machine")
    assert check_mysql_version(databases=["mysql"]) == []  # the test server is recent
    err = StringIO()
    call_command("check", "--database", "mysql", stderr=err)
    assert "conveyor.W003" not in err.getvalue()


# --- WAL only on Conveyor's SQLite databases, never on a read-only one -------------------


@contextmanager
def sqlite_connection(alias: str, name: str, **options: Any) -> Iterator[Any]:
    """A connection made for the test (not in ``DATABASES``) to the SQLite file ``name``."""
    params = connections.configure_settings(
        {"default": {}, alias: {"ENGINE": SQLITE, "NAME": name, "OPTIONS": options}}
    )[alias]
    connection = load_backend(SQLITE).DatabaseWrapper(params, alias)
    connections[alias] = connection
    try:
        yield connection
    finally:
        connection.close()
        del connections[alias]


def journal_mode(connection: Any) -> str:
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA journal_mode")
        return str(cursor.fetchone()[0]).lower()


def new_database(path: Path) -> Path:
    """A SQLite file in the default (rollback journal) mode, with one table."""
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (x INTEGER)")
        db.execute("INSERT INTO t VALUES (1)")
    db.close()
    return path


@pytest.mark.django_db
def test_wal_only_on_the_databases_conveyor_uses(tmp_path):
    assert journal_mode(connections["default"]) == "wal"  # the test settings' Conveyor database
    jobs, other = new_database(tmp_path / "jobs.sqlite3"), new_database(tmp_path / "other.sqlite3")
    with override_settings(TASKS=tasks_using(j="wal_jobs")):
        with sqlite_connection("wal_jobs", str(jobs)) as connection:
            assert journal_mode(connection) == "wal"
        with sqlite_connection("wal_other", str(other)) as connection:
            assert journal_mode(connection) == "delete"
    with sqlite_connection("wal_other", str(other)) as connection:
        assert journal_mode(connection) == "delete"


@pytest.mark.django_db
def test_a_read_only_uri_database_is_left_alone(tmp_path):
    path = new_database(tmp_path / "readonly.sqlite3")
    with (
        override_settings(TASKS=tasks_using(j="wal_ro")),
        sqlite_connection("wal_ro", f"file:{path}?mode=ro", uri=True) as connection,
    ):
        assert journal_mode(connection) == "delete"
        with connection.cursor() as cursor:
            cursor.execute("SELECT x FROM t")
            assert cursor.fetchall() == [(1,)]


def read_without_write_permission(name: str) -> str:
    """Open ``name`` as a Conveyor database; return its journal mode, or the error."""
    try:
        with sqlite_connection("wal_locked", name) as connection:
            mode = journal_mode(connection)
            with connection.cursor() as cursor:
                cursor.execute("SELECT x FROM t")
                return mode if cursor.fetchall() == [(1,)] else "wrong rows"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def in_unprivileged_child(function: Any, *args: Any) -> str:
    """Run ``function`` in a forked child as user ``nobody`` (root ignores permissions)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, function(*args).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    return answer


@pytest.mark.django_db
def test_a_database_without_write_permission_is_left_alone():
    folder = Path(tempfile.mkdtemp("-conveyor-ro"))
    path = new_database(folder / "locked.sqlite3")
    try:
        path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        folder.chmod(0o555)
        with override_settings(TASKS=tasks_using(j="wal_locked")):
            if os.geteuid() == 0:
                answer = in_unprivileged_child(read_without_write_permission, str(path))
            else:
                answer = read_without_write_permission(str(path))
        assert answer == "delete"
    finally:
        folder.chmod(0o755)
        path.chmod(0o644)
        for child in folder.iterdir():
            child.unlink()
        folder.rmdir()
