"""The form that adds and changes schedules made at run time, checked as the API checks them.

``clean`` builds the schedule's timetable and spec with ``conveyor.schedules.timetable_for``
and ``spec_for`` and checks it with ``conveyor.schedules.check``: whatever the API would
refuse is an error on the form, and nothing is stored.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from django import forms
from django.conf import settings
from django.core.exceptions import ValidationError
from django.utils import timezone as dj_timezone
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from conveyor import clock, schedules
from conveyor.admin.common import database_backends
from conveyor.backends.database.models import Schedule
from conveyor.cron import CRON, DAY_STEPS, EVERY, HOURLY, KINDS, MONTH_STEPS, ONCE, CatchUp
from conveyor.exceptions import InvalidSchedule
from conveyor.records import ScheduleSpec

# Kinds whose runs are whole steps from a first run (``start``).
STEPPED = (EVERY, HOURLY, *DAY_STEPS, *MONTH_STEPS)
# Where a timetable's error shows, by kind.
TIMING_FIELD = {CRON: "cron", EVERY: "every", ONCE: "start_at"}
FIELDS = (
    "name",
    "backend_name",
    "task_path",
    "args",
    "kwargs",
    "queue_name",
    "priority",
    "kind",
    "cron",
    "every",
    "start_at",
    "timezone",
    "catch_up",
    "catch_up_limit",
    "grace",
    "due_kwarg",
    "jitter",
    "run_at_creation",
    "repeats",
    "paused",
)


def wall_time(moment: datetime, zone: str) -> datetime:
    """A stored moment as the wall clock of ``zone`` reads it (naive)."""
    try:
        tz = ZoneInfo(zone)
    except Exception:
        return moment
    return clock.aware(moment).astimezone(tz).replace(tzinfo=None)


class ScheduleForm(forms.ModelForm):
    """A schedule made at run time: its definition, checked before anything is stored."""

    backend_name = forms.ChoiceField(label=gettext_lazy("backend"))
    kind = forms.ChoiceField(
        label=gettext_lazy("kind"),
        choices=[(kind, kind) for kind in KINDS],
        initial=CRON,
        help_text=gettext_lazy(
            "cron: the cron expression; every: the interval; once: the first run's moment; "
            "hourly, daily, ... : from the first run; manual: only when asked to."
        ),
    )
    catch_up = forms.ChoiceField(
        label=gettext_lazy("catch-up"), choices=[(c.value, c.value) for c in CatchUp]
    )
    args = forms.JSONField(
        label=gettext_lazy("positional arguments"),
        required=False,
        initial=list,
        help_text=gettext_lazy("A JSON list."),
    )
    kwargs = forms.JSONField(
        label=gettext_lazy("keyword arguments"),
        required=False,
        initial=dict,
        help_text=gettext_lazy("A JSON object."),
    )

    class Meta:
        model = Schedule
        fields = FIELDS
        help_texts = {
            "start_at": gettext_lazy(
                "On the wall clock of the schedule's time zone: the moment of a 'once' "
                "schedule, or the first run of an interval or calendar kind."
            ),
            "every": gettext_lazy("For example 00:05:00, or 1 00:00:00 for a day."),
        }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spec: ScheduleSpec | None = None
        if "backend_name" in self.fields:
            aliases = [backend.alias for backend in database_backends(Schedule)]
            self.fields["backend_name"].choices = [(alias, alias) for alias in aliases]  # type: ignore[attr-defined]
        if self.instance.pk is None and "timezone" in self.fields:
            self.fields["timezone"].initial = settings.TIME_ZONE or "UTC"
        elif self.instance.start_at is not None:
            self.initial["start_at"] = wall_time(self.instance.start_at, self.instance.timezone)

    def clean_timezone(self) -> str:
        zone = str(self.cleaned_data["timezone"])
        try:
            ZoneInfo(zone)
        except Exception as e:
            raise ValidationError(_("Unknown time zone %(zone)r.") % {"zone": zone}) from e
        return zone

    def clean_args(self) -> list[Any]:
        value = self.cleaned_data["args"]
        if value is None:
            return []
        if not isinstance(value, list):
            raise ValidationError(_("Give the positional arguments as a JSON list."))
        return value

    def clean_kwargs(self) -> dict[str, Any]:
        value = self.cleaned_data["kwargs"]
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValidationError(_("Give the keyword arguments as a JSON object."))
        return value

    def clean(self) -> dict[str, Any]:
        data: dict[str, Any] = super().clean() or {}
        if self.errors:
            return data
        name = data.get("name", self.instance.name)
        kind = data["kind"]
        try:
            timetable = schedules.timetable_for(name, **self.timing(data))
        except InvalidSchedule as e:
            self.add_error(TIMING_FIELD.get(kind), str(e))
            return data
        try:
            spec = schedules.spec_for(
                name,
                data["task_path"],
                timetable,
                args=data["args"],
                kwargs=data["kwargs"],
                queue_name=data["queue_name"],
                priority=data["priority"],
                catch_up=data["catch_up"],
                catch_up_limit=data["catch_up_limit"],
                grace=data["grace"],
                due_kwarg=data["due_kwarg"],
                jitter=data["jitter"],
                run_at_creation=data["run_at_creation"],
                repeats=data["repeats"],
            )
            schedules.check(spec, backend=data.get("backend_name", self.instance.backend_name))
        except InvalidSchedule as e:
            raise ValidationError(str(e)) from e
        self.spec = spec
        return data

    @staticmethod
    def timing(data: dict[str, Any]) -> dict[str, Any]:
        """The timetable arguments of ``timetable_for`` that the form's values make."""
        kind = data["kind"]
        start = data.get("start_at")
        if start is not None and dj_timezone.is_aware(start):
            start = dj_timezone.make_naive(start)  # read in the schedule's time zone
        timing: dict[str, Any] = {"kind": kind, "timezone": data["timezone"]}
        if kind == CRON:
            timing["cron"] = data["cron"]
        elif kind == EVERY:
            timing["every"] = data["every"]
        elif kind == ONCE:
            timing["at"] = start
        if kind in STEPPED and start is not None:
            timing["start"] = start
        return timing
