"""What the admin pages share: the backends they show, paging without full counts, how values
are shown, and how actions report."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.models import CHANGE, LogEntry
from django.core.paginator import Paginator
from django.db import models, router
from django.http import HttpRequest
from django.tasks import task_backends
from django.utils import formats, timezone
from django.utils.functional import cached_property
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from conveyor.backends.database import DatabaseBackend

ACTION_LIMIT = 1000  # rows one run of an action acts on, at most
DEFAULT_LEASE = 30.0  # seconds, for a worker whose backend is no longer configured
SHOWN_PROBLEMS = 5  # problems an action names; the rest are counted
SHOWN = 100_000  # characters of one JSON value shown on a page, at most


def pretty(value: Any) -> SafeString:
    """A JSON value, indented and escaped, in a ``<pre>`` block (cut short if very long)."""
    text = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)
    if len(text) > SHOWN:
        cut = len(text) - SHOWN
        text = text[:SHOWN] + "\n" + _("... (%(count)d more characters)") % {"count": cut}
    return format_html("<pre>{}</pre>", text)


def moment(value: Any) -> str:
    """A stored time as the admin shows times: in the current time zone."""
    if not value:
        return "-"
    return str(formats.localize(timezone.localtime(value) if timezone.is_aware(value) else value))


class CappedPaginator(Paginator):
    """Counts at most ``cap`` rows (and one more, to know there are more): never a table."""

    cap = 10_000

    @cached_property
    def count(self) -> int:
        rows: Any = self.object_list
        if isinstance(rows, models.QuerySet):
            return rows.order_by()[: self.cap + 1].count()
        return len(rows)

    @property
    def capped(self) -> bool:
        """Say whether there are more rows than were counted."""
        return self.count > self.cap


def database_backends(model: type[models.Model]) -> list[DatabaseBackend]:
    """The database backends whose rows the admin shows: those in the database it reads."""
    using = router.db_for_read(model)
    found = []
    for alias in getattr(settings, "TASKS", {}):
        try:
            backend = task_backends[alias]
        except Exception:  # a backend that cannot be built here has nothing to show
            continue
        if isinstance(backend, DatabaseBackend) and backend.database == using:
            found.append(backend)
    return found


def lease_of(alias: str) -> float:
    """The lease, in seconds, of backend ``alias``: how long a silent worker counts as alive."""
    try:
        options = getattr(task_backends[alias], "conveyor_options", None)
    except Exception:
        return DEFAULT_LEASE
    return float(options.lease) if options is not None else DEFAULT_LEASE


class Reporting(admin.ModelAdmin):
    """Actions that act on at most ``ACTION_LIMIT`` rows, log each and say what they did."""

    action_limit = ACTION_LIMIT

    def picked(
        self,
        request: HttpRequest,
        queryset: models.QuerySet[Any],
        fit: models.Q | None = None,
        why_not: str = "",
    ) -> list[Any]:
        """The selected rows an action acts on: those that ``fit``, the newest ``action_limit``.

        Says how many of the selection do not fit (``why_not``), and whether some that do
        were left for the next run of the action.
        """
        if fit is not None:
            unfit = queryset.exclude(fit).order_by()[: self.action_limit].count()
            self.report_skipped(request, unfit, why_not)
            queryset = queryset.filter(fit)
        rows = list(queryset.order_by("-pk")[: self.action_limit + 1])
        if len(rows) > self.action_limit:
            self.message_user(
                request,
                _(
                    "Only the first %(limit)d selected were acted on; run the action again "
                    "for the rest."
                )
                % {"limit": self.action_limit},
                messages.WARNING,
            )
        return rows[: self.action_limit]

    def log(self, request: HttpRequest, rows: Sequence[models.Model], message: str) -> None:
        """Write one admin log entry per row acted on."""
        user_id: Any = request.user.pk
        if rows:
            LogEntry.objects.log_actions(user_id, rows, CHANGE, message)

    def report_problems(self, request: HttpRequest, problems: Iterable[str]) -> None:
        """Say which rows an action could not act on, and why (the first few, then a count)."""
        found = list(problems)
        if not found:
            return
        shown = "; ".join(found[:SHOWN_PROBLEMS])
        more = len(found) - SHOWN_PROBLEMS
        if more > 0:
            shown += " " + ngettext("(and %(count)d more)", "(and %(count)d more)", more) % {
                "count": more
            }
        self.message_user(request, shown, messages.ERROR)

    def report_skipped(self, request: HttpRequest, count: int, why: str) -> None:
        if count:
            self.message_user(
                request,
                ngettext(
                    "%(count)d selected was left alone: %(why)s.",
                    "%(count)d selected were left alone: %(why)s.",
                    count,
                )
                % {"count": count, "why": why},
                messages.WARNING,
            )
