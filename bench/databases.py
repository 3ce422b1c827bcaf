"""Fresh, migrated databases for each measurement: SQLite files, PostgreSQL and MySQL databases.

Each engine migrates one template once; every phase then gets its own copy of it (a new
SQLite file, or ``CREATE DATABASE ... TEMPLATE``), dropped when the phase ends. MySQL and
MariaDB have no templates: each phase's database is created and migrated afresh.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.workers import MANAGE, ROOT

ENGINES = ("sqlite", "postgres", "mysql")
ENGINE_LABELS = {"sqlite": "SQLite", "postgres": "PostgreSQL", "mysql": "MySQL/MariaDB"}
MIGRATE_TIMEOUT = 300.0


def base_env(conn_max_age: str, source: Path) -> dict[str, str]:
    """The environment of every bench subprocess: bench settings, Conveyor from ``source``."""
    env = dict(os.environ)
    paths = [str(ROOT), str(source)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env.update(
        PYTHONPATH=os.pathsep.join(paths),
        DJANGO_SETTINGS_MODULE="bench.settings",
        BENCH_CONN_MAX_AGE=conn_max_age,
        BENCH_CONVEYOR_SRC=str(source),
    )
    return env


class Engine(ABC):
    """One database server (or SQLite) that hands out fresh migrated databases."""

    name: str

    def __init__(self, conn_max_age: str, source: Path, database: str = "conveyor_bench") -> None:
        self.conn_max_age = conn_max_age
        self.source = source
        self.database = database  # on a server: the database each phase gets

    def env(self, db_name: str) -> dict[str, str]:
        """The environment that points the bench project at ``db_name``."""
        return {
            **base_env(self.conn_max_age, self.source),
            "BENCH_DB_ENGINE": self.name,
            "BENCH_DB_NAME": db_name,
        }

    def migrate(self, db_name: str) -> None:
        subprocess.run(
            [sys.executable, str(MANAGE), "migrate", "--verbosity", "0"],
            cwd=ROOT,
            env=self.env(db_name),
            check=True,
            timeout=MIGRATE_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )

    @abstractmethod
    def prepare(self) -> None:
        """Create and migrate the template."""

    @abstractmethod
    def fresh(self) -> contextlib.AbstractContextManager[dict[str, str]]:
        """A new copy of the template, as the environment that selects it."""

    @abstractmethod
    def version(self) -> str:
        """The server or library version."""

    @abstractmethod
    def close(self) -> None:
        """Remove everything this engine created."""


class SQLiteEngine(Engine):
    name = "sqlite"

    def __init__(self, conn_max_age: str, source: Path, database: str = "conveyor_bench") -> None:
        super().__init__(conn_max_age, source, database)
        self.dir = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
        self.template = self.dir / "template.sqlite3"
        self.copies = 0

    def prepare(self) -> None:
        self.migrate(str(self.template))

    @contextlib.contextmanager
    def fresh(self) -> Iterator[dict[str, str]]:
        self.copies += 1
        path = self.dir / f"bench-{self.copies}.sqlite3"
        with (
            contextlib.closing(sqlite3.connect(self.template)) as source,
            contextlib.closing(sqlite3.connect(path)) as target,
        ):
            source.backup(target)
        try:
            yield self.env(str(path))
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)

    def version(self) -> str:
        return sqlite3.sqlite_version

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class PostgresEngine(Engine):
    name = "postgres"

    @property
    def template(self) -> str:
        return f"{self.database}_template"

    def _admin(self) -> Any:
        import psycopg

        return psycopg.connect(
            host=os.environ.get("BENCH_PG_HOST", "127.0.0.1"),
            port=int(os.environ.get("BENCH_PG_PORT", "5432")),
            user=os.environ.get("BENCH_PG_USER", "postgres"),
            password=os.environ.get("BENCH_PG_PASSWORD", ""),
            dbname="postgres",
            autocommit=True,
            connect_timeout=10,
        )

    def _execute(self, *statements: str) -> None:
        with self._admin() as conn:
            for statement in statements:
                conn.execute(statement)

    def _drop(self, name: str) -> None:
        self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def prepare(self) -> None:
        self._drop(self.database)
        self._drop(self.template)
        self._execute(f'CREATE DATABASE "{self.template}"')
        self.migrate(self.template)

    @contextlib.contextmanager
    def fresh(self) -> Iterator[dict[str, str]]:
        self._drop(self.database)
        self._execute(f'CREATE DATABASE "{self.database}" TEMPLATE "{self.template}"')
        try:
            yield self.env(self.database)
        finally:
            self._drop(self.database)

    def version(self) -> str:
        with self._admin() as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(row[0])

    def close(self) -> None:
        for name in (self.database, self.template):
            with contextlib.suppress(Exception):
                self._drop(name)


class MySQLEngine(Engine):
    name = "mysql"

    def _admin(self) -> Any:
        import MySQLdb

        return MySQLdb.connect(
            host=os.environ.get("BENCH_MYSQL_HOST", "127.0.0.1"),
            port=int(os.environ.get("BENCH_MYSQL_PORT", "3306")),
            user=os.environ.get("BENCH_MYSQL_USER", "root"),
            passwd=os.environ.get("BENCH_MYSQL_PASSWORD", ""),
            connect_timeout=10,
        )

    def _execute(self, *statements: str) -> list[tuple[Any, ...]]:
        with contextlib.closing(self._admin()) as conn, contextlib.closing(conn.cursor()) as cur:
            for statement in statements:
                cur.execute(statement)
            return list(cur.fetchall())

    def prepare(self) -> None:
        self._execute(f"DROP DATABASE IF EXISTS `{self.database}`")

    @contextlib.contextmanager
    def fresh(self) -> Iterator[dict[str, str]]:
        self._execute(
            f"DROP DATABASE IF EXISTS `{self.database}`",
            f"CREATE DATABASE `{self.database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci",
        )
        try:
            self.migrate(self.database)
            yield self.env(self.database)
        finally:
            self._execute(f"DROP DATABASE IF EXISTS `{self.database}`")

    def version(self) -> str:
        return str(self._execute("SELECT VERSION()")[0][0])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._execute(f"DROP DATABASE IF EXISTS `{self.database}`")


ENGINE_CLASSES: dict[str, type[Engine]] = {
    "sqlite": SQLiteEngine,
    "postgres": PostgresEngine,
    "mysql": MySQLEngine,
}


def engine(name: str, conn_max_age: str, source: Path, database: str = "conveyor_bench") -> Engine:
    """The engine called ``name`` (see ``ENGINES``), running Conveyor from ``source``."""
    if name in ENGINE_CLASSES:
        return ENGINE_CLASSES[name](conn_max_age, source, database)
    raise ValueError(f"unknown database {name!r}; choose from {', '.join(ENGINES)}")
