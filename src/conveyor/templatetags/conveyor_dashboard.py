"""Filters the dashboard's templates show times, latencies and progress with."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, TypeGuard

from django import template
from django.utils import timezone

from conveyor import clock
from conveyor.monitoring import describe_timetable, duration, progress, relative, seconds, since
from conveyor.records import ScheduleInfo

register = template.Library()


@register.filter
def ago(moment: datetime | None, now: datetime) -> str:
    """``12s ago`` or ``in 4m 05s`` from ``now``; ``-`` for no time."""
    return relative(moment, now)


@register.filter
def running_for(started: datetime | None, now: datetime) -> str:
    """How long a job has run by ``now``; ``starting`` if its task has not started."""
    return "starting" if started is None else duration(since(started, now))


@register.filter
def latency(value: float | None) -> str:
    """A wait in milliseconds or seconds; ``-`` if nothing was measured."""
    return seconds(value)


@register.filter
def local(moment: datetime | None) -> str:
    """A time in the project's time zone, to the second."""
    if moment is None:
        return "-"
    return timezone.localtime(clock.aware(moment)).strftime("%Y-%m-%d %H:%M:%S")


@register.filter
def progress_text(reported: Mapping[str, Any] | None) -> str:
    """``3/10 30% copying`` from what a task reported."""
    return progress(reported).plain


@register.filter
def progress_share(reported: Mapping[str, Any] | None) -> str:
    """How far a task is, from 0 to 100, for a bar; empty if it did not say."""
    if not reported:
        return ""
    done, total = reported.get("done"), reported.get("total")
    if not (_number(done) and _number(total) and total):
        return ""
    return f"{max(0.0, min(100.0, 100 * done / total)):.0f}"


def _number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


@register.filter
def timetable(info: ScheduleInfo) -> str:
    """``cron 30 2 * * * (Europe/Paris)``, ``every 0:05:00`` and so on."""
    return describe_timetable(info)


@register.filter
def short_error(error_class: str) -> str:
    """The class name of a dotted exception path."""
    return error_class.rpartition(".")[2]
