"""The jobs admin: find jobs, read one, and retry, run now, cancel or delete them.

A job is never added or edited by hand: every change is an action, through Conveyor's API
(``enqueue_again``, ``cancel``) or its store's verbs (``run_now``). The list reads only the
columns it shows, counts at most ``CappedPaginator.cap`` rows, and offers filter choices
known without reading the table, so it stays quick with millions of jobs.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.actions import delete_selected as confirm_and_delete
from django.contrib.admin.views.main import ChangeList
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy, ngettext

from conveyor import control
from conveyor.admin.common import CappedPaginator, Reporting, moment, pretty
from conveyor.admin.filters import BackendFilter, QueueFilter, TaskFilter
from conveyor.backends.base import worker_store
from conveyor.backends.database.models import Job, ScheduleFiring
from conveyor.control import CancelOutcome
from conveyor.records import FINISHED_STATES, State

# What the list reads: the columns it shows and what actions decide by. Never the JSON.
LIST_FIELDS = (
    "id",
    "uuid",
    "backend_name",
    "queue_name",
    "task_path",
    "priority",
    "state",
    "attempts",
    "enqueued_at",
    "finished_at",
)
RETRYABLE = (State.FAILED, State.CANCELLED)
UNFINISHED = ~Q(state__in=FINISHED_STATES)
# What a job's page shows, beside its call and outcome.
SUMMARY = (
    "uuid",
    "task_path",
    "state",
    "backend_name",
    "queue_name",
    "priority",
    "fired_by",
    "progress_shown",
)
ATTEMPTS = (
    "attempts",
    "lost",
    "worker_ids_shown",
    "lease_owner",
    "lease_expires_at",
    "cancel_requested",
)
TIMES = (
    "enqueued_at",
    "run_after",
    "available_at",
    "started_at",
    "last_attempted_at",
    "finished_at",
    "expires_at",
)
OPTIONS = ("options_shown", "delivery", "unique_slot")


class JobChangeList(ChangeList):
    """The list of jobs, reading only the columns it shows."""

    def get_queryset(self, request: HttpRequest, exclude_parameters: Any = None) -> QuerySet[Any]:
        return super().get_queryset(request, exclude_parameters).only(*LIST_FIELDS)


@admin.register(Job)
class JobAdmin(Reporting):
    list_display = (
        "uuid",
        "task_path",
        "state",
        "queue_name",
        "backend_name",
        "priority",
        "attempts",
        "enqueued",
        "finished_at",
    )
    list_filter = ("state", QueueFilter, TaskFilter, BackendFilter, "enqueued_at", "finished_at")
    search_fields = ("uuid", "task_path")
    search_help_text = gettext_lazy(
        "A result id finds its job; other text finds the jobs whose task path holds it."
    )
    ordering = ("-id",)
    sortable_by = ("enqueued",)  # by id: sorting by a column without an index reads them all
    list_per_page = 100
    paginator = CappedPaginator
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    actions = ("retry_jobs", "run_jobs_now", "cancel_jobs", "delete_selected")
    fieldsets = (
        (None, {"fields": SUMMARY}),
        (gettext_lazy("Call"), {"fields": ("args_shown", "kwargs_shown")}),
        (gettext_lazy("Outcome"), {"fields": ("return_value_shown", "errors_shown")}),
        (gettext_lazy("Attempts"), {"fields": ATTEMPTS}),
        (gettext_lazy("Times"), {"fields": TIMES}),
        (gettext_lazy("Options"), {"classes": ("collapse",), "fields": OPTIONS}),
    )
    readonly_fields = (
        *SUMMARY,
        "args_shown",
        "kwargs_shown",
        "return_value_shown",
        "errors_shown",
        *ATTEMPTS,
        *TIMES,
        *OPTIONS,
    )

    # --- who may do what: jobs are read, and changed only through actions -------------------

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # A job's page is read-only; the permission is what the actions ask for.
        return obj is None and super().has_change_permission(request)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        if obj is not None and obj.state not in FINISHED_STATES:
            return False
        return super().has_delete_permission(request, obj)

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return JobChangeList

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Any], search_term: str
    ) -> tuple[QuerySet[Any], bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        try:
            return queryset.filter(uuid=uuid.UUID(term)), False  # its unique index
        except ValueError:
            return queryset.filter(task_path__icontains=term), False

    # --- the list and the page -------------------------------------------------------------

    @admin.display(description=gettext_lazy("enqueued at"), ordering="id")
    def enqueued(self, obj: Job) -> Any:
        return obj.enqueued_at

    @admin.display(description=gettext_lazy("fired by schedule"))
    def fired_by(self, obj: Job) -> str:
        firings = ScheduleFiring.objects.using(obj._state.db).select_related("schedule")
        firing = firings.filter(result_id=obj.uuid).first()
        if firing is None:
            return "-"
        url = reverse(f"{self.admin_site.name}:conveyor_schedule_change", args=[firing.schedule_id])
        due = _("due %(at)s") % {"at": moment(firing.due_at)}
        how = _("on demand") if firing.on_demand else due
        return format_html('<a href="{}">{}</a> ({})', url, firing.schedule.name, how)

    @admin.display(description=gettext_lazy("progress"))
    def progress_shown(self, obj: Job) -> str:
        if not obj.progress:
            return "-"
        done, total = obj.progress.get("done"), obj.progress.get("total")
        message = obj.progress.get("message") or ""
        return f"{done} / {total} {message}".strip()

    @admin.display(description=gettext_lazy("positional arguments"))
    def args_shown(self, obj: Job) -> SafeString:
        return pretty(obj.args)

    @admin.display(description=gettext_lazy("keyword arguments"))
    def kwargs_shown(self, obj: Job) -> SafeString:
        return pretty(obj.kwargs)

    @admin.display(description=gettext_lazy("return value"))
    def return_value_shown(self, obj: Job) -> SafeString | str:
        return pretty(obj.return_value) if obj.state == State.SUCCEEDED else "-"

    @admin.display(description=gettext_lazy("errors"))
    def errors_shown(self, obj: Job) -> SafeString | str:
        if not obj.errors:
            return "-"
        return format_html_join(
            "",
            "<p><strong>{}. {}</strong></p><pre>{}</pre>",
            (
                (n, error.get("exception_class_path", ""), error.get("traceback", ""))
                for n, error in enumerate(obj.errors, 1)
            ),
        )

    @admin.display(description=gettext_lazy("worker of each attempt"))
    def worker_ids_shown(self, obj: Job) -> SafeString | str:
        if not obj.worker_ids:
            return "-"
        items = format_html_join("", "<li>{}</li>", ((w,) for w in obj.worker_ids))
        return format_html("<ol>{}</ol>", items)

    @admin.display(description=gettext_lazy("options"))
    def options_shown(self, obj: Job) -> SafeString:
        return pretty(obj.options or {})

    # --- actions ---------------------------------------------------------------------------

    @admin.action(
        permissions=["change"],
        description=gettext_lazy("Retry the selected failed or cancelled jobs (as new jobs)"),
    )
    def retry_jobs(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        ended = self.picked(request, queryset, Q(state__in=RETRYABLE), _("not failed or cancelled"))
        problems, retried = [], 0
        for job in ended:
            try:
                again = control.enqueue_again(str(job.uuid), job.backend_name)
            except Exception as e:  # its task is gone, its queue no longer configured, ...
                problems.append(_("job %(id)s: %(error)s") % {"id": job.uuid, "error": e})
                continue
            self.log(request, [job], _("Retried as job %(id)s.") % {"id": again.id})
            retried += 1
        if retried:
            self.message_user(
                request,
                ngettext(
                    "%(count)d job was enqueued again, as a new job.",
                    "%(count)d jobs were enqueued again, as new jobs.",
                    retried,
                )
                % {"count": retried},
                messages.SUCCESS,
            )
        self.report_problems(request, problems)

    @admin.action(
        permissions=["change"], description=gettext_lazy("Run the selected scheduled jobs now")
    )
    def run_jobs_now(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        due: dict[str, list[Job]] = defaultdict(list)
        for job in self.picked(request, queryset, Q(state=State.SCHEDULED), _("not scheduled")):
            due[job.backend_name].append(job)
        moved, problems = 0, []
        for alias, group in due.items():
            try:
                moved += worker_store(alias).run_now([str(job.uuid) for job in group])
            except Exception as e:  # its backend is no longer configured
                problems.append(_("backend %(alias)s: %(error)s") % {"alias": alias, "error": e})
                continue
            self.log(request, group, _("Made due now."))
        self.message_user(
            request,
            ngettext("%(count)d job runs now.", "%(count)d jobs run now.", moved)
            % {"count": moved},
            messages.SUCCESS if moved else messages.WARNING,
        )
        self.report_problems(request, problems)

    @admin.action(
        permissions=["change"],
        description=gettext_lazy("Cancel the selected jobs (running ones are asked to stop)"),
    )
    def cancel_jobs(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        open_jobs = self.picked(request, queryset, UNFINISHED, _("already finished"))
        outcomes: dict[CancelOutcome, list[Job]] = defaultdict(list)
        problems = []
        for job in open_jobs:
            try:
                outcomes[control.cancel(str(job.uuid), job.backend_name)].append(job)
            except Exception as e:  # deleted meanwhile, or its backend is gone
                problems.append(_("job %(id)s: %(error)s") % {"id": job.uuid, "error": e})
        self.log(request, outcomes[CancelOutcome.CANCELLED], _("Cancelled."))
        self.log(request, outcomes[CancelOutcome.STOPPING], _("Cancelled: asked to stop."))
        self.message_user(request, cancel_summary(outcomes), messages.SUCCESS)
        self.report_problems(request, problems)

    @admin.action(
        permissions=["delete"], description=gettext_lazy("Delete the selected finished jobs")
    )
    def delete_selected(self, request: HttpRequest, queryset: QuerySet[Any]) -> HttpResponse | None:
        finished = [
            job.pk
            for job in self.picked(
                request, queryset, Q(state__in=FINISHED_STATES), _("not finished")
            )
        ]
        if not finished:
            return None
        chosen = Job.objects.filter(pk__in=finished).only(*LIST_FIELDS).order_by("-id")
        response: HttpResponse | None = confirm_and_delete(self, request, chosen)
        return response

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        queryset.filter(state__in=FINISHED_STATES).delete()  # finished states never change


def cancel_summary(outcomes: dict[CancelOutcome, list[Job]]) -> str:
    """What a cancel did, in one sentence."""
    counts: Iterable[tuple[int, str, str]] = (
        (
            len(outcomes[CancelOutcome.CANCELLED]),
            "%(count)d job was cancelled.",
            "%(count)d jobs were cancelled.",
        ),
        (
            len(outcomes[CancelOutcome.STOPPING]),
            "%(count)d running job was asked to stop.",
            "%(count)d running jobs were asked to stop.",
        ),
        (
            len(outcomes[CancelOutcome.FINISHED]),
            "%(count)d job had finished meanwhile.",
            "%(count)d jobs had finished meanwhile.",
        ),
    )
    said = [ngettext(one, many, n) % {"count": n} for n, one, many in counts if n]
    return " ".join(said) or _("No job was cancelled.")
