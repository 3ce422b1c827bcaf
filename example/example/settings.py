"""A small project that uses Conveyor on SQLite, the embedded default."""

from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = "example-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["localhost", "127.0.0.1"]
USE_TZ = True
TIME_ZONE = "UTC"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "conveyor",
    "shop",
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": BASE_DIR / "db.sqlite3",
        # Conveyor switches the file to WAL; NORMAL sync is safe with WAL and much faster.
        "OPTIONS": {"timeout": 20, "init_command": "PRAGMA synchronous=NORMAL"},
    }
}

TASKS = {
    "default": {
        "BACKEND": "conveyor.backends.database.DatabaseBackend",
        "QUEUES": ["default", "emails"],
        "OPTIONS": {},
    }
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    # The demo's summary counts failed tasks; their tracebacks are kept on each result
    # (see them in `manage.py shell` or, later, the admin) rather than printed here.
    "loggers": {
        "conveyor": {"handlers": ["console"], "level": "CRITICAL", "propagate": False},
        "django.tasks": {"handlers": ["console"], "level": "CRITICAL", "propagate": False},
    },
}
