"""Django integration: discover ``tasks`` modules and tune SQLite for concurrent workers."""

from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.db.backends.signals import connection_created
from django.utils.module_loading import autodiscover_modules


class ConveyorConfig(AppConfig):
    name = "conveyor"
    verbose_name = "Conveyor"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from conveyor import checks  # noqa: F401  (registers the system checks)

        connection_created.connect(use_wal_on_sqlite, dispatch_uid="conveyor-sqlite-wal")
        autodiscover_modules("tasks")


def use_wal_on_sqlite(sender: Any, connection: Any, **kwargs: Any) -> None:
    """Let readers and one writer work at once on file databases (the mode is persistent)."""
    if connection.vendor != "sqlite" or connection.is_in_memory_db():
        return
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA journal_mode")
        if cursor.fetchone()[0].lower() != "wal":
            cursor.execute("PRAGMA journal_mode=WAL")
