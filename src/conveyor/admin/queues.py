"""The paused queues admin: pause a queue (add), resume it (delete), clear or dedupe it.

Every change goes through ``conveyor.queues``, which checks the queue against the
backend's ``QUEUES`` and times a pause on the store's clock.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from conveyor import queues
from conveyor.admin.common import Reporting, database_backends
from conveyor.backends.database.models import QueuePause


class PauseForm(forms.ModelForm):
    backend_name = forms.ChoiceField(label=gettext_lazy("backend"))

    class Meta:
        model = QueuePause
        fields = ("backend_name", "queue_name", "until")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        aliases = [backend.alias for backend in database_backends(QueuePause)]
        field = self.fields["backend_name"]
        assert isinstance(field, forms.ChoiceField)
        field.choices = [(alias, alias) for alias in aliases]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        try:
            queues.pause(
                data.get("queue_name", ""),
                until=data.get("until"),
                backend=data.get("backend_name"),
                dry_run=True,
            )
        except ValueError as e:
            raise forms.ValidationError(str(e)) from e
        return data


@admin.register(QueuePause)
class QueuePauseAdmin(Reporting):
    form = PauseForm
    list_display = ("queue_name", "backend_name", "until", "paused_at")
    list_filter = ("backend_name",)
    ordering = ("backend_name", "queue_name")
    actions = ("clear_jobs", "remove_duplicate_jobs")

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return obj is None and super().has_change_permission(request, obj)

    def save_model(self, request: HttpRequest, obj: QueuePause, form: Any, change: bool) -> None:
        queues.pause(obj.queue_name, until=obj.until, backend=obj.backend_name)
        saved = QueuePause.objects.get(backend_name=obj.backend_name, queue_name=obj.queue_name)
        obj.pk = saved.pk

    def delete_model(self, request: HttpRequest, obj: QueuePause) -> None:
        queues.resume(obj.queue_name, backend=obj.backend_name)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        for pause in queryset:
            self.delete_model(request, pause)

    @admin.action(
        description=gettext_lazy("Delete the jobs of these queues that wait to run"),
        permissions=["delete"],
    )
    def clear_jobs(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        rows = self.picked(request, queryset)
        count = sum(queues.clear(p.queue_name, backend=p.backend_name) for p in rows)
        self.log(request, rows, _("Cleared"))
        self.message_user(request, _("Deleted %(count)d job(s).") % {"count": count})

    @admin.action(
        description=gettext_lazy("Delete duplicate jobs of these queues"),
        permissions=["delete"],
    )
    def remove_duplicate_jobs(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        rows = self.picked(request, queryset)
        count = sum(queues.remove_duplicates(p.queue_name, backend=p.backend_name) for p in rows)
        self.log(request, rows, _("Removed duplicates"))
        self.message_user(
            request, _("Deleted %(count)d duplicate job(s).") % {"count": count}, messages.INFO
        )
