"""System checks for settings that would make a Conveyor deployment misbehave.

The settings-only checks are tagged ``conveyor`` (not ``database``), so plain
``manage.py check`` runs them, and so does every management command, the worker
included; they never connect to a database. The server-version check needs a connection
and is tagged ``database``: ``migrate`` and ``check --database ALIAS`` run it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import fields
from typing import Any

from django.conf import settings
from django.core import checks
from django.db import DatabaseError, connections
from django.utils.module_loading import import_string

# MariaDB keeps DESC index parts from 10.8, MySQL from 8.0; older versions ignore them.
MARIADB_MINIMUM = (10, 8)
MYSQL_MINIMUM = (8, 0)


def conveyor_databases(tasks: dict[str, dict[str, Any]] | None = None) -> set[str]:
    """The ``DATABASES`` aliases that Conveyor backends in ``TASKS`` keep jobs in.

    Read from the settings alone (no backend is built, no database is touched): a
    backend counts if its class is a Conveyor backend with a ``DATABASE`` option.
    """
    return set(backend_databases(tasks).values())


def backend_databases(tasks: dict[str, dict[str, Any]] | None = None) -> dict[str, str]:
    """Each Conveyor backend in ``TASKS`` that keeps jobs in a database, and that database."""
    from conveyor.backends.base import ConveyorBackend

    aliases = {}
    for name, params in (settings.TASKS if tasks is None else tasks).items():
        try:
            backend_class = import_string(params["BACKEND"])
        except (ImportError, KeyError, TypeError):
            continue  # Django's own check reports a backend it cannot import.
        if not (isinstance(backend_class, type) and issubclass(backend_class, ConveyorBackend)):
            continue
        option = {f.name: f for f in fields(backend_class.options_class)}.get("database")
        if option is not None:
            aliases[name] = (params.get("OPTIONS") or {}).get("DATABASE", option.default)
    return aliases


@checks.register("conveyor")
def check_sqlite_timeout(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Warn when SQLite would give up on a busy database too quickly for several workers."""
    return sqlite_timeout_messages(settings.DATABASES, conveyor_databases())


def sqlite_timeout_messages(
    databases: dict[str, dict[str, Any]], used: Collection[str] | None = None
) -> list[checks.CheckMessage]:
    """The warnings ``check_sqlite_timeout`` gives for these ``DATABASES``.

    Only the aliases in ``used`` are looked at (all of them if it is None).
    """
    messages: list[checks.CheckMessage] = []
    for alias, db in databases.items():
        if used is not None and alias not in used:
            continue
        if not db.get("ENGINE", "").endswith("sqlite3"):
            continue
        timeout = (db.get("OPTIONS") or {}).get("timeout", 5)
        if timeout < 10:
            messages.append(
                checks.Warning(
                    f"DATABASES[{alias!r}] waits only {timeout}s for a busy SQLite database; "
                    "with several Conveyor worker processes writing, use at least 10.",
                    hint=f"Set DATABASES[{alias!r}]['OPTIONS']['timeout'] = 20.",
                    id="conveyor.W001",
                )
            )
    return messages


@checks.register("conveyor")
def check_use_tz(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Warn when times are naive while a Conveyor backend keeps jobs in a database."""
    if settings.USE_TZ or not conveyor_databases():
        return []
    return [
        checks.Warning(
            "USE_TZ is False. Conveyor compares lease and schedule times with the database's "
            "own clock in UTC, while Django keeps naive local times in TIME_ZONE: wherever "
            "the two differ, and for an hour at each daylight-saving change, scheduled jobs "
            "run early or late and leases expire too soon or too late.",
            hint="Set USE_TZ = True (Django's default), so every time is stored in UTC.",
            id="conveyor.W002",
        )
    ]


@checks.register("conveyor")
def check_psycopg(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Warn when a PostgreSQL database keeps jobs but psycopg 3 (LISTEN/NOTIFY) is missing."""
    from conveyor.backends.database.waiters import psycopg_installed

    messages = psycopg_messages(settings.DATABASES, backend_databases())
    return [] if not messages or psycopg_installed() else messages


def psycopg_messages(
    databases: dict[str, dict[str, Any]], used: dict[str, str]
) -> list[checks.CheckMessage]:
    """The warnings ``check_psycopg`` gives without psycopg 3, for backend -> database ``used``."""
    return [
        checks.Warning(
            f"PostgreSQL database {database!r} is used by Conveyor backend {backend!r} but "
            "psycopg 3 is not installed: idle workers poll every POLL_INTERVAL instead of "
            "being woken.",
            hint="pip install 'django-conveyor[postgres]'",
            id="conveyor.W004",
        )
        for backend, database in sorted(used.items())
        if _is_postgresql(databases.get(database) or {})
    ]


def _is_postgresql(db: dict[str, Any]) -> bool:
    engine = str(db.get("ENGINE", ""))
    return engine.endswith((".postgresql", ".postgis"))


@checks.register(checks.Tags.database)
def check_mysql_version(
    app_configs: Any = None, databases: Iterable[str] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """Warn when a Conveyor database is a MariaDB or MySQL too old for its claim index."""
    messages: list[checks.CheckMessage] = []
    for alias in sorted(conveyor_databases() & set(databases or ())):
        if alias not in settings.DATABASES:
            continue  # the backend's own check reports it (conveyor.E001)
        connection: Any = connections[alias]
        if connection.vendor != "mysql":
            continue
        try:
            version = connection.mysql_version
        except DatabaseError:
            continue  # unreachable: the command that needs it reports the connection
        messages += mysql_version_messages(alias, connection.mysql_is_mariadb, version)
    return messages


def mysql_version_messages(
    alias: str, is_mariadb: bool, version: tuple[int, ...]
) -> list[checks.CheckMessage]:
    """The warning ``check_mysql_version`` gives for a server of this kind and version."""
    name, minimum = ("MariaDB", MARIADB_MINIMUM) if is_mariadb else ("MySQL", MYSQL_MINIMUM)
    if tuple(version[:2]) >= minimum:
        return []
    shown, needed = ".".join(map(str, version)), ".".join(map(str, minimum))
    return [
        checks.Warning(
            f"DATABASES[{alias!r}] is {name} {shown}, which ignores DESC in index "
            "definitions; Conveyor's claim index orders ready jobs by priority, highest "
            "first, so without descending index parts every claim sorts all ready jobs.",
            hint=f"Use {name} {needed} or later.",
            id="conveyor.W003",
        )
    ]
