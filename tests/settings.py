"""Settings for Conveyor's own tests: SQLite always, PostgreSQL and MariaDB when reachable."""

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tests.services import available

SECRET_KEY = "conveyor-tests-not-secret"
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "conveyor",
    "tests.testapp",
]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# The admin, for tests/admin/.
ROOT_URLCONF = "tests.urls"
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # quick test users
STATIC_URL = "static/"

if not os.environ.get("CONVEYOR_TEST_SQLITE_DIR"):
    # One directory per test run: worker subprocesses inherit it; removed at exit.
    os.environ["CONVEYOR_TEST_SQLITE_DIR"] = tempfile.mkdtemp("-conveyor")
    atexit.register(shutil.rmtree, os.environ["CONVEYOR_TEST_SQLITE_DIR"], ignore_errors=True)
SQLITE_DIR = Path(os.environ["CONVEYOR_TEST_SQLITE_DIR"])
DATABASES: dict[str, dict[str, Any]] = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(SQLITE_DIR / "conveyor.sqlite3"),
        "OPTIONS": {"timeout": 20, "init_command": "PRAGMA synchronous=NORMAL"},
        "TEST": {"NAME": str(SQLITE_DIR / "test_conveyor.sqlite3")},
    },
}
# Separate names let several test runs share the database servers at once.
TEST_DB = os.environ.get("CONVEYOR_TEST_DB", "test_conveyor")
_servers = available()
if _servers["postgres"]:
    DATABASES["postgres"] = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "postgres",
        "USER": "postgres",
        "HOST": "127.0.0.1",
        "PORT": 5432,
        "TEST": {"NAME": TEST_DB, "DEPENDENCIES": []},
    }
if _servers["mysql"]:
    DATABASES["mysql"] = {
        "ENGINE": "django.db.backends.mysql",
        "NAME": "test",
        "USER": "root",
        "PASSWORD": "",
        "HOST": "127.0.0.1",
        "PORT": 3306,
        "OPTIONS": {"charset": "utf8mb4"},
        "TEST": {
            "NAME": TEST_DB,
            "CHARSET": "utf8mb4",
            "COLLATION": "utf8mb4_unicode_ci",
            "DEPENDENCIES": [],
        },
    }

# Worker subprocesses started by the tests point at the databases the test run created.
for _alias, _name in json.loads(os.environ.get("CONVEYOR_TEST_DB_NAMES", "{}")).items():
    if _alias in DATABASES:
        DATABASES[_alias]["NAME"] = _name

_options = json.loads(os.environ.get("CONVEYOR_TEST_OPTIONS", "{}"))
QUEUES = ["default", "emails", "reports"]
TASKS: dict[str, dict[str, Any]] = {
    "default": {
        "BACKEND": "conveyor.backends.database.DatabaseBackend",
        "QUEUES": QUEUES,
        "OPTIONS": {"DATABASE": "default", **_options},
    },
}
for _alias in ("postgres", "mysql"):
    if _alias in DATABASES:
        TASKS[_alias] = {
            "BACKEND": "conveyor.backends.database.DatabaseBackend",
            "QUEUES": QUEUES,
            "OPTIONS": {"DATABASE": _alias, **_options},
        }
TASKS["memory"] = {
    "BACKEND": "conveyor.backends.memory.MemoryBackend",
    "QUEUES": QUEUES,
    "OPTIONS": _options,
}
# Eager mode: tasks run inside enqueue(), or when the transaction on "default" commits.
TASKS["eager"] = {"BACKEND": "conveyor.eager.EagerBackend", "QUEUES": QUEUES}
TASKS["eager_commit"] = {
    "BACKEND": "conveyor.eager.EagerBackend",
    "QUEUES": QUEUES,
    "OPTIONS": {"RUN_AT": "commit"},
}
TASKS["immediate"] = {
    "BACKEND": "django.tasks.backends.immediate.ImmediateBackend",
    "QUEUES": QUEUES,
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(process)d %(levelname)s %(name)s %(message)s"}
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {"conveyor": {"handlers": ["console"], "level": "INFO"}},
}
