"""The workers admin: the registry of supervisors and worker processes, read-only."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from conveyor import clock
from conveyor.admin.common import CappedPaginator, lease_of
from conveyor.backends.database.models import Worker


class RunningFilter(admin.SimpleListFilter):
    title = gettext_lazy("running")
    parameter_name = "running"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", _("Not stopped")), ("no", _("Stopped"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() in ("yes", "no"):
            return queryset.filter(stopped_at__isnull=self.value() == "yes")
        return queryset


def status(worker: Worker) -> str:
    """Online (it beat within a lease), silent (it did not: its machine may be gone), stopped."""
    if worker.stopped_at is not None:
        return _("stopped")
    silent_since = clock.now() - timedelta(seconds=lease_of(worker.backend_name))
    return _("online") if worker.last_beat_at >= silent_since else _("silent")


@admin.register(Worker)
class WorkerAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "kind",
        "host",
        "pid",
        "queues",
        "threads",
        "started_at",
        "last_beat_at",
        "status",
        "ended",
    )
    list_filter = ("kind", RunningFilter, "backend_name")
    search_fields = ("id", "host", "supervisor")
    ordering = ("-started_at", "id")
    list_per_page = 100
    paginator = CappedPaginator
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    actions = None

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description=gettext_lazy("status"))
    def status(self, obj: Worker) -> str:
        return status(obj)
