"""Management commands run as tasks, for schedules (as django-lightweight-queue's cron did).

A schedule names ``conveyor.commands.run_command`` with the command and its arguments. Only
commands that a code schedule runs (``schedule_command``) or that the ``CONVEYOR_COMMANDS``
setting lists may be run: a schedule saved at run time (the admin, a data migration) cannot
make a worker run just any command.
"""

from __future__ import annotations

import io
from typing import Any

from django.conf import settings
from django.core.management import call_command, get_commands
from django.tasks import task


def allowed_commands() -> set[str]:
    """The commands a scheduled run may call."""
    from conveyor.schedules import declared_commands

    return set(getattr(settings, "CONVEYOR_COMMANDS", ())) | declared_commands()


def command_problem(name: str) -> str | None:
    """Why ``name`` cannot be run as a scheduled command, or None if it can."""
    if name not in get_commands():
        return f"There is no management command {name!r}."
    if name not in allowed_commands():
        return (
            f"Management command {name!r} may not run as a task: it is not in the "
            "CONVEYOR_COMMANDS setting, and no code schedule (schedule_command) runs it."
        )
    return None


def _backend() -> str:
    tasks: dict[str, Any] = getattr(settings, "TASKS", {}) or {}
    return "default" if "default" in tasks or not tasks else next(iter(tasks))


def _queue(alias: str) -> str:
    queues = (getattr(settings, "TASKS", {}) or {}).get(alias, {}).get("QUEUES") or ["default"]
    return "default" if "default" in queues else str(queues[0])


@task(backend=_backend(), queue_name=_queue(_backend()))
def run_command(name: str, *args: str) -> str:
    """Run management command ``name`` with ``args``; return what it wrote (the end of it)."""
    if (problem := command_problem(name)) is not None:
        raise PermissionError(problem)
    out = io.StringIO()
    call_command(name, *args, stdout=out, stderr=out)
    return out.getvalue()[-4000:]
