"""The schedules admin: see every schedule, pause, resume or run them, edit run-time ones.

Schedules declared in code are read-only here (they change in code). Adding and changing a
schedule made at run time goes through ``ScheduleForm``, which checks it as the API does,
and the store's ``add_schedule`` and ``change_schedule``; actions and deletes go through
``conveyor.schedules``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy, ngettext

from conveyor import schedules
from conveyor.admin.common import Reporting, moment
from conveyor.admin.schedule_form import ScheduleForm
from conveyor.backends.base import worker_store
from conveyor.backends.database.models import Schedule, ScheduleFiring
from conveyor.backends.database.transitions.schedules import info_of
from conveyor.monitoring import describe_timetable

FIRINGS_SHOWN = 10
DEFINITION = ("name", "backend_name", "task_path", "args", "kwargs", "queue_name", "priority")
TIMETABLE = ("kind", "cron", "every", "start_at", "timezone")
RUNS = ("catch_up", "catch_up_limit", "grace", "due_kwarg", "jitter", "run_at_creation", "repeats")
STATE = (
    "source",
    "paused",
    "timetable",
    "next_run_at",
    "last_run_at",
    "runs",
    "repeats_left",
    "last_job",
    "recent_firings",
    "retired_at",
    "created_at",
    "updated_at",
)


class RetiredFilter(admin.SimpleListFilter):
    title = gettext_lazy("retired")
    parameter_name = "retired"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("no", _("No")), ("yes", _("Yes"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() in ("yes", "no"):
            return queryset.filter(retired_at__isnull=self.value() == "no")
        return queryset


@admin.register(Schedule)
class ScheduleAdmin(Reporting):
    form = ScheduleForm
    list_display = (
        "name",
        "task_path",
        "timetable",
        "next_run_at",
        "last_run_at",
        "runs",
        "paused",
        "source",
        "retired",
    )
    list_filter = ("paused", "source", RetiredFilter, "backend_name")
    search_fields = ("name", "task_path")
    ordering = ("name",)
    actions = ("pause_schedules", "resume_schedules", "run_schedules_now")

    # --- who may do what: code schedules are read-only -------------------------------------

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        if obj is not None and obj.source == "code":
            return False
        return super().has_change_permission(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        if obj is not None and obj.source == "code" and obj.retired_at is None:
            return False  # removed from the code, it is retired and may be deleted then
        return super().has_delete_permission(request, obj)

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        sets: list[tuple[Any, dict[str, Any]]] = [
            (None, {"fields": DEFINITION}),
            (_("Timetable"), {"fields": TIMETABLE}),
            (_("Runs"), {"fields": (*RUNS, "paused") if obj is None else RUNS}),
        ]
        if obj is not None:
            sets.append((_("State"), {"fields": STATE}))
        return sets

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return () if obj is None else ("name", "backend_name", *STATE)

    # --- saving and deleting through the store -----------------------------------------

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        spec, alias = form.spec, form.cleaned_data.get("backend_name", obj.backend_name)
        store = worker_store(alias)
        if change:
            store.change_schedule(spec)
        else:
            store.add_schedule(spec, paused=bool(form.cleaned_data.get("paused")))
        stored = Schedule.objects.using(obj._state.db or None)
        obj.pk = stored.values_list("pk", flat=True).get(backend_name=alias, name=spec.name)

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        schedules.delete(obj.name, backend=obj.backend_name)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        for row in queryset:
            schedules.delete(row.name, backend=row.backend_name)

    # --- the list and the page ---------------------------------------------------------

    @admin.display(description=gettext_lazy("timetable"))
    def timetable(self, obj: Schedule) -> str:
        try:
            return describe_timetable(info_of(obj))
        except Exception:  # a row written by hand that cannot run (the worker logs it)
            return obj.cron or obj.kind

    @admin.display(description=gettext_lazy("retired"), boolean=True)
    def retired(self, obj: Schedule) -> bool:
        return obj.retired_at is not None

    @admin.display(description=gettext_lazy("last job"))
    def last_job(self, obj: Schedule) -> SafeString | str:
        return self._job_link(obj.last_result_id) if obj.last_result_id else "-"

    @admin.display(description=gettext_lazy("latest runs"))
    def recent_firings(self, obj: Schedule) -> SafeString | str:
        firings = ScheduleFiring.objects.using(obj._state.db).filter(schedule=obj)
        latest = list(firings.order_by("-fired_at", "-id")[:FIRINGS_SHOWN])
        if not latest:
            return "-"
        rows = (
            (
                moment(f.due_at),
                _("on demand") if f.on_demand else _("timetable"),
                self._job_link(f.result_id) if f.result_id else "-",
            )
            for f in latest
        )
        items = format_html_join("", "<li>{} ({}): {}</li>", rows)
        return format_html("<ul>{}</ul>", items)

    def _job_link(self, result_id: Any) -> SafeString:
        url = reverse(f"{self.admin_site.name}:conveyor_job_changelist")
        return format_html('<a href="{}?q={}">{}</a>', url, result_id, result_id)

    # --- actions ---------------------------------------------------------------------------

    @admin.action(permissions=["change"], description=gettext_lazy("Pause the selected schedules"))
    def pause_schedules(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        done = ("%(count)d schedule was paused.", "%(count)d schedules were paused.")
        self._each(request, queryset, schedules.pause, _("Paused."), done)

    @admin.action(permissions=["change"], description=gettext_lazy("Resume the selected schedules"))
    def resume_schedules(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        done = ("%(count)d schedule was resumed.", "%(count)d schedules were resumed.")
        self._each(request, queryset, schedules.resume, _("Resumed."), done)

    @admin.action(
        permissions=["change"],
        description=gettext_lazy("Run the selected schedules once now (outside the timetable)"),
    )
    def run_schedules_now(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        def run(name: str, backend: str) -> str:
            return _("Ran once now: job %(id)s.") % {"id": schedules.run(name, backend=backend).id}

        done = ("%(count)d schedule was run once now.", "%(count)d schedules were run once now.")
        self._each(request, queryset, run, None, done)

    def _each(
        self,
        request: HttpRequest,
        queryset: QuerySet[Any],
        verb: Callable[..., Any],
        said: str | None,
        done_text: tuple[str, str],
    ) -> None:
        """Apply ``verb`` to each schedule, logging ``said`` (or what it returns) for each."""
        done, problems = 0, []
        for row in self.picked(request, queryset):
            try:
                outcome = verb(row.name, backend=row.backend_name)
            except Exception as e:  # not found, retired, its task gone, ...
                problems.append(_("schedule %(name)s: %(error)s") % {"name": row.name, "error": e})
                continue
            self.log(request, [row], said or str(outcome))
            done += 1
        if done:
            self.message_user(
                request,
                ngettext(*done_text, done) % {"count": done},
                messages.SUCCESS,
            )
        self.report_problems(request, problems)
