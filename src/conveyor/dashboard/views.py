"""The dashboard's pages (staff only) and buttons (POST, CSRF-checked, permission-checked).

Every button acts through Conveyor's API and says what it did with Django's messages; the
log line names the user, the job or schedule, and its task.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from functools import wraps
from typing import Any
from urllib.parse import urlencode

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import NoReverseMatch, reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.http import require_GET, require_POST

from conveyor import clock, control, queues
from conveyor import schedules as schedule_api
from conveyor.backends.base import StoreBackend
from conveyor.control import CancelOutcome
from conveyor.dashboard.board import chosen, read, refresh, stores
from conveyor.monitor import describe
from conveyor.monitoring import online

logger = logging.getLogger(__name__)

View = Callable[..., HttpResponse]
WORKERS_SHOWN = 200
RUNNING_READ = 1000  # running jobs read to count each worker's


def staff_only(view: View) -> View:
    """Send a visitor to log in; refuse a user who is not active staff (403)."""

    @wraps(view)
    def checked(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        user = request.user
        if not user.is_authenticated:
            return redirect_to_login(request.get_full_path(), _login_url())
        if not (user.is_active and user.is_staff):
            raise PermissionDenied("The Conveyor dashboard is for staff users.")
        return view(request, *args, **kwargs)

    return checked


def _login_url() -> str:
    try:
        return reverse("admin:login")
    except NoReverseMatch:
        return str(settings.LOGIN_URL)


def _backend(request: HttpRequest) -> StoreBackend:
    alias = request.POST.get("backend") or request.GET.get("backend")
    backend = chosen(alias)
    if backend is None:
        raise Http404(f"No Conveyor backend {alias!r} a worker drives is configured in TASKS.")
    return backend


def _context(request: HttpRequest, backend: StoreBackend, page: str, **more: Any) -> dict:
    user = request.user
    here = reverse(f"conveyor_dashboard:{page}") + "?" + urlencode({"backend": backend.alias})
    return {
        "page": page,
        "here": here,  # where a button brings the user back to (not the live fragment)
        "notes": messages.get_messages(request),
        "alias": backend.alias,
        "backends": stores(),
        "live_every": refresh(),
        "can_change_jobs": user.has_perm("conveyor.change_job"),
        "can_change_schedules": user.has_perm("conveyor.change_schedule"),
        "can_change_queues": user.has_perm("conveyor.change_queuepause"),
        **more,
    }


# --- pages -------------------------------------------------------------------------------------


@require_GET
@never_cache
@staff_only
def overview(request: HttpRequest) -> HttpResponse:
    backend = _backend(request)
    board = read(backend)
    context = _context(request, backend, "overview", board=board)
    return render(request, "conveyor/dashboard/overview.html", context)


@require_GET
@never_cache
@staff_only
def live(request: HttpRequest) -> HttpResponse:
    """The overview's panels alone: what an open page fetches every few seconds."""
    backend = _backend(request)
    context = _context(request, backend, "overview", board=read(backend))
    return render(request, "conveyor/dashboard/panels.html", context)


@require_GET
@never_cache
@staff_only
def workers(request: HttpRequest) -> HttpResponse:
    backend = _backend(request)
    now, lease = clock.now(), backend.conveyor_options.lease
    rows, error = _look(backend, lambda: _workers(backend, now, lease))
    online = sum(row["online"] for row in rows)
    context = _context(request, backend, "workers", now=now, online=online, error=error)
    return render(request, "conveyor/dashboard/workers.html", {**context, "workers": rows})


def _workers(backend: StoreBackend, now: Any, lease: float) -> list[dict[str, Any]]:
    held = Counter(job.worker_id for job in backend.running(limit=RUNNING_READ))
    found = backend.workers(alive=False)
    found.sort(key=lambda w: (not online(w, now, lease), w.stopped_at is not None, w.id))
    return [
        {"info": w, "online": online(w, now, lease), "running": held.get(w.id, 0)}
        for w in found[:WORKERS_SHOWN]
    ]


@require_GET
@never_cache
@staff_only
def schedules(request: HttpRequest) -> HttpResponse:
    backend = _backend(request)
    found, error = _look(backend, lambda: backend.schedules(retired=True))
    found.sort(key=lambda i: (i.retired, i.name))
    context = _context(request, backend, "schedules", now=clock.now(), error=error)
    return render(request, "conveyor/dashboard/schedules.html", {**context, "schedules": found})


def _look[T](backend: StoreBackend, reads: Callable[[], list[T]]) -> tuple[list[T], str]:
    """What ``reads`` returns, and no error; or nothing and why the store could not be read
    (in a savepoint inside a transaction, so the request goes on)."""
    try:
        with backend.reading():
            return reads(), ""
    except Exception as e:  # any store, any driver: the page says so
        backend.close()
        return [], describe(e)


# --- buttons -----------------------------------------------------------------------------------


def _button(permission: str) -> Callable[[View], View]:
    """POST only, CSRF-checked, staff only, and ``permission`` needed."""

    def decorate(view: View) -> View:
        @wraps(view)
        def checked(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if not request.user.has_perm(permission):
                raise PermissionDenied(f"This needs the permission {permission}.")
            return view(request, *args, **kwargs)

        return require_POST(csrf_protect(staff_only(checked)))

    return decorate


def _back(request: HttpRequest, backend: StoreBackend, page: str = "overview") -> HttpResponse:
    target = request.POST.get("next", "")
    if not url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        target = reverse(f"conveyor_dashboard:{page}") + "?" + urlencode({"backend": backend.alias})
    return HttpResponseRedirect(target)


def _who(request: HttpRequest) -> str:
    return str(request.user.get_username())


@_button("conveyor.change_job")
def retry(request: HttpRequest, job_id: str) -> HttpResponse:
    """Enqueue a finished job's call again, as a new job."""
    backend = _backend(request)
    try:
        task_path = backend.get_result(job_id).task.module_path
        again = control.enqueue_again(job_id, backend.alias)
    except Exception as e:  # unknown id, not finished, task gone, queue no longer configured
        messages.error(request, f"Job {job_id} was not retried: {describe(e)}", fail_silently=True)
        return _back(request, backend)
    logger.info(
        "%s retried job %s (task %s) from the dashboard as job %s",
        _who(request),
        job_id,
        task_path,
        again.id,
    )
    said = f"Job {job_id} ({task_path}) was enqueued again as job {again.id}."
    messages.success(request, said, fail_silently=True)
    return _back(request, backend)


@_button("conveyor.change_job")
def cancel(request: HttpRequest, job_id: str) -> HttpResponse:
    """Cancel a job that has not started; ask a running one to stop."""
    backend = _backend(request)
    try:
        task_path = backend.get_result(job_id).task.module_path
        outcome = control.cancel(job_id, backend.alias)
    except Exception as e:  # unknown id, store unreachable
        messages.error(
            request, f"Job {job_id} was not cancelled: {describe(e)}", fail_silently=True
        )
        return _back(request, backend)
    said = {
        CancelOutcome.CANCELLED: "was cancelled",
        CancelOutcome.STOPPING: "is running: its worker was asked to stop it",
        CancelOutcome.FINISHED: "had already finished",
    }[outcome]
    logger.info(
        "%s cancelled job %s (task %s) from the dashboard: %s",
        _who(request),
        job_id,
        task_path,
        outcome.value,
    )
    level = messages.WARNING if outcome is CancelOutcome.FINISHED else messages.SUCCESS
    messages.add_message(request, level, f"Job {job_id} ({task_path}) {said}.", fail_silently=True)
    return _back(request, backend)


SCHEDULE_VERBS: dict[str, Callable[..., Any]] = {
    "run": schedule_api.run,
    "pause": schedule_api.pause,
    "resume": schedule_api.resume,
}


@_button("conveyor.change_schedule")
def schedule_action(request: HttpRequest, name: str, verb: str) -> HttpResponse:
    """Run a schedule now, pause it or resume it."""
    backend = _backend(request)
    act = SCHEDULE_VERBS.get(verb)
    if act is None:
        raise Http404(f"Schedules can be run, paused or resumed, not {verb!r}.")
    try:
        done = act(name, backend=backend.alias)
    except Exception as e:  # unknown or retired schedule, store unreachable
        messages.error(request, f"Schedule {name!r}: {describe(e)}", fail_silently=True)
        return _back(request, backend, "schedules")
    ran = f" as job {done.id}" if verb == "run" else ""
    logger.info("%s did %s on schedule %r from the dashboard%s", _who(request), verb, name, ran)
    past = {"run": "was run now", "pause": "is paused", "resume": "is resumed"}[verb]
    messages.success(request, f"Schedule {name!r} {past}{ran}.", fail_silently=True)
    return _back(request, backend, "schedules")


@_button("conveyor.change_queuepause")
def queue_action(request: HttpRequest, name: str, verb: str) -> HttpResponse:
    """Pause a queue until it is resumed, or resume it."""
    backend = _backend(request)
    if verb not in ("pause", "resume"):
        raise Http404(f"Queues can be paused or resumed, not {verb!r}.")
    try:
        if verb == "pause":
            queues.pause(name, backend=backend.alias)
            said = "is paused: workers take no job from it until it is resumed"
        else:
            said = "is resumed" if queues.resume(name, backend=backend.alias) else "was not paused"
    except Exception as e:  # a queue the backend does not have, store unreachable
        messages.error(request, f"Queue {name!r}: {describe(e)}", fail_silently=True)
        return _back(request, backend)
    logger.info("%s did %s on queue %r from the dashboard", _who(request), verb, name)
    messages.success(request, f"Queue {name!r} {said}.", fail_silently=True)
    return _back(request, backend)
