"""Filters for the jobs list that offer values known without reading the whole table."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.translation import gettext_lazy

from conveyor.admin.common import database_backends
from conveyor.backends.database.models import Job

RECENT = 2000  # jobs whose tasks the task filter offers: the latest ones


class ValueFilter(admin.SimpleListFilter):
    """Filter on one column, offering values known without reading the whole table."""

    field = ""

    def known(self) -> set[str]:
        raise NotImplementedError

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        chosen = self.value()
        names = self.known() | ({chosen} if chosen else set())
        return [(name, name) for name in sorted(names)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        chosen = self.value()
        return queryset.filter(**{self.field: chosen}) if chosen else queryset


class BackendFilter(ValueFilter):
    title = gettext_lazy("backend")
    parameter_name = field = "backend_name"

    def known(self) -> set[str]:
        return {backend.alias for backend in database_backends(Job)}


class QueueFilter(ValueFilter):
    title = gettext_lazy("queue")
    parameter_name = field = "queue_name"

    def known(self) -> set[str]:
        return {name for backend in database_backends(Job) for name in backend.queues}


class TaskFilter(ValueFilter):
    """The tasks of the latest jobs: finding every task would read every row."""

    title = gettext_lazy("task")
    parameter_name = field = "task_path"

    def known(self) -> set[str]:
        latest = Job.objects.order_by("-id").values_list("task_path", flat=True)[:RECENT]
        return set(latest)
