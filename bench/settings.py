"""Settings of the benchmark project; the database under test comes from the environment.

``BENCH_DB_ENGINE``: ``sqlite``, ``postgres`` or ``mysql``. ``BENCH_DB_NAME``: the SQLite file
or the database. ``BENCH_CONN_MAX_AGE``: seconds, or ``none`` for persistent connections
(the default). ``BENCH_PG_HOST``, ``BENCH_PG_PORT``, ``BENCH_PG_USER``, ``BENCH_PG_PASSWORD``:
where PostgreSQL is; ``BENCH_MYSQL_HOST`` etc. where MySQL or MariaDB is. ``python -m bench``
sets the first three for each fresh database.
"""

import os
import tempfile
from pathlib import Path
from typing import Any

SECRET_KEY = "conveyor-bench-not-secret"
DEBUG = False  # also keeps db_worker's autoreloader off, and queries unrecorded
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = ["conveyor", "django_tasks_db", "bench.app"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# The same for both systems: journal_mode=WAL is what Conveyor sets on its own, so
# django-tasks-db gets it too.
SQLITE_OPTIONS = {
    "timeout": 20,
    "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL",
}


def _conn_max_age(text: str) -> int | None:
    return None if text.strip().lower() in ("", "none") else int(text)


def _database(engine: str, name: str, conn_max_age: int | None) -> dict[str, Any]:
    if engine == "sqlite":
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": name or str(Path(tempfile.gettempdir()) / "conveyor-bench.sqlite3"),
            "OPTIONS": SQLITE_OPTIONS,
            "CONN_MAX_AGE": conn_max_age,
        }
    if engine == "postgres":
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": name or "conveyor_bench",
            "USER": os.environ.get("BENCH_PG_USER", "postgres"),
            "PASSWORD": os.environ.get("BENCH_PG_PASSWORD", ""),
            "HOST": os.environ.get("BENCH_PG_HOST", "127.0.0.1"),
            "PORT": int(os.environ.get("BENCH_PG_PORT", "5432")),
            "CONN_MAX_AGE": conn_max_age,
        }
    if engine == "mysql":
        return {
            "ENGINE": "django.db.backends.mysql",
            "NAME": name or "conveyor_bench",
            "USER": os.environ.get("BENCH_MYSQL_USER", "root"),
            "PASSWORD": os.environ.get("BENCH_MYSQL_PASSWORD", ""),
            "HOST": os.environ.get("BENCH_MYSQL_HOST", "127.0.0.1"),
            "PORT": int(os.environ.get("BENCH_MYSQL_PORT", "3306")),
            "OPTIONS": {"charset": "utf8mb4"},
            "CONN_MAX_AGE": conn_max_age,
        }
    raise ValueError(f"BENCH_DB_ENGINE must be 'sqlite', 'postgres' or 'mysql', not {engine!r}")


DATABASES = {
    "default": _database(
        os.environ.get("BENCH_DB_ENGINE", "sqlite"),
        os.environ.get("BENCH_DB_NAME", ""),
        _conn_max_age(os.environ.get("BENCH_CONN_MAX_AGE", "none")),
    ),
}

# Each system keeps its own defaults; only the alias differs.
TASKS = {
    "conveyor": {"BACKEND": "conveyor.backends.database.DatabaseBackend"},
    "tasksdb": {"BACKEND": "django_tasks_db.DatabaseBackend"},
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(process)d %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {"conveyor": {"handlers": ["console"], "level": "INFO"}},
}
