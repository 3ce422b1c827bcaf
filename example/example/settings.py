"""A small project that uses Conveyor on SQLite, the embedded default."""

from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = "example-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["localhost", "127.0.0.1"]
USE_TZ = True
TIME_ZONE = "UTC"

INSTALLED_APPS = [
    # The admin and the dashboard (example/example/urls.py): runserver, then /conveyor/.
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "conveyor",
    "shop",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "example.urls"
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
STATIC_URL = "static/"

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
    # (see them in `manage.py shell`, the admin or the dashboard) rather than printed here.
    "loggers": {
        "conveyor": {"handlers": ["console"], "level": "CRITICAL", "propagate": False},
        "django.tasks": {"handlers": ["console"], "level": "CRITICAL", "propagate": False},
    },
}
