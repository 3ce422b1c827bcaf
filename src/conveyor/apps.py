"""Django integration: discover ``tasks`` modules and tune SQLite for concurrent workers."""

from __future__ import annotations

import logging
from typing import Any

from django.apps import AppConfig
from django.db import DatabaseError
from django.db.backends.signals import connection_created
from django.utils.module_loading import autodiscover_modules

logger = logging.getLogger(__name__)


class ConveyorConfig(AppConfig):
    name = "conveyor"
    verbose_name = "Conveyor"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from conveyor import checks  # noqa: F401  (registers the system checks)

        connection_created.connect(use_wal_on_sqlite, dispatch_uid="conveyor-sqlite-wal")
        from conveyor import metrics

        if metrics.enabled():
            metrics.connect()
        autodiscover_modules("tasks")


def use_wal_on_sqlite(sender: Any, connection: Any, **kwargs: Any) -> None:
    """Let readers and one writer work at once on the SQLite files Conveyor keeps jobs in.

    Only databases a Conveyor backend in ``TASKS`` uses are switched (the mode is
    persistent, so others are left as their owners set them), and a database opened
    read-only is left as it is.
    """
    if connection.vendor != "sqlite" or connection.is_in_memory_db():
        return
    from conveyor.checks import conveyor_databases

    if connection.alias not in conveyor_databases():
        return
    try:
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode")
            if cursor.fetchone()[0].lower() != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
    except DatabaseError as e:
        # Read-only (a mode=ro URI, a file or directory without write permission): the
        # journal mode cannot change, and reading needs no WAL.
        logger.debug("SQLite database %r stays in its journal mode: %s", connection.alias, e)
