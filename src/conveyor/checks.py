"""System checks for settings that would make a Conveyor deployment misbehave."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks


@checks.register(checks.Tags.database)
def check_sqlite_timeout(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Warn when SQLite would give up on a busy database too quickly for several workers."""
    return sqlite_timeout_messages(settings.DATABASES)


def sqlite_timeout_messages(databases: dict[str, dict[str, Any]]) -> list[checks.CheckMessage]:
    """The warnings ``check_sqlite_timeout`` gives for these ``DATABASES``."""
    messages: list[checks.CheckMessage] = []
    for alias, db in databases.items():
        if not db.get("ENGINE", "").endswith("sqlite3"):
            continue
        timeout = db.get("OPTIONS", {}).get("timeout", 5)
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
