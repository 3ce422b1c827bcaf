"""Schedules: run a task on a timetable, declared in code or made at run time.

In code, stack ``@schedule`` on a task; the worker syncs code schedules into the store at
start-up (new ones added, changed ones updated, removed ones retired), so that the admin
and the monitor show them. At run time, ``create``, ``update``, ``pause``, ``resume``,
``delete`` and ``run`` work on the stored schedules of a backend. Every worker fires the
due ones; each due time fires once (see ``WorkerStore.fire_schedules``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from django.conf import settings
from django.tasks import DEFAULT_TASK_BACKEND_ALIAS, Task, TaskResult, task_backends
from django.utils import timezone as dj_timezone

from conveyor import clock
from conveyor.backends.base import worker_store
from conveyor.backends.scheduling import MAX_CATCH_UP, MIN_GRACE
from conveyor.backends.tasks import call_problem, json_problem, resolve_task
from conveyor.cron import CRON, EVERY, MANUAL, ONCE, CatchUp, InvalidTimetable, Timetable
from conveyor.exceptions import InvalidSchedule, ScheduleChanged, ScheduleNotFound, TaskNotFound
from conveyor.records import Fired, ScheduleInfo, ScheduleSpec, SyncReport

COMMAND_TASK = "conveyor.commands.run_command"
MIN_EVERY, MAX_EVERY = 1, 10 * 365 * 86400  # seconds
MAX_JITTER = 86400.0
UPDATE_TRIES = 5
# What update() changes besides the timetable.
UPDATABLE = (
    "task",
    "args",
    "kwargs",
    "queue_name",
    "priority",
    "catch_up",
    "catch_up_limit",
    "grace",
    "due_kwarg",
    "jitter",
    "run_at_creation",
    "repeats",
)
NAME_LENGTH = 200
# Declared with @schedule or schedule_command: backend alias -> schedule name -> spec.
_DECLARED: dict[str, dict[str, ScheduleSpec]] = {}


def timetable_for(
    name: str,
    *,
    cron: str | None = None,
    every: timedelta | float | None = None,
    kind: str | None = None,
    at: datetime | None = None,
    start: datetime | None = None,
    timezone: str | None = None,
) -> Timetable:
    """The timetable those arguments describe; raise ``InvalidSchedule`` naming ``name``."""
    given = [w for w, value in (("cron", cron), ("every", every), ("at", at)) if value is not None]
    if len(given) > 1 or (given and kind and kind not in (CRON, EVERY, ONCE)):
        raise InvalidSchedule(
            f"Schedule {name!r}: give one of cron=, every=, at= or kind=, not "
            f"{', '.join(given + ([f'kind={kind!r}'] if kind else []))}. Nothing was stored."
        )
    zone = timezone or settings.TIME_ZONE or "UTC"
    every = _interval(name, every)
    if cron is not None:
        kind = CRON
    elif every is not None:
        kind = EVERY
    elif at is not None:
        kind, start = ONCE, at
    kind = kind or MANUAL
    try:
        timetable = Timetable(
            kind=kind,
            cron=cron or "",
            every=every if isinstance(every, timedelta) else None,
            start=_aware(start, zone) if start is not None else None,
            timezone=zone,
            hash_id=name,
        )
        timetable.validate()
    except (InvalidTimetable, TypeError) as e:
        raise InvalidSchedule(f"Schedule {name!r}: {e}. Nothing was stored.") from e
    return timetable


def _interval(name: str, every: Any) -> timedelta | None:
    """``every=`` as a timedelta, checked; raise ``InvalidSchedule`` naming the schedule."""
    if every is None:
        return None
    if isinstance(every, bool) or not isinstance(every, int | float | timedelta):
        raise InvalidSchedule(
            f"Schedule {name!r}: every= takes a timedelta or a number of seconds, not "
            f"{every!r}. Nothing was stored."
        )
    seconds = every.total_seconds() if isinstance(every, timedelta) else every
    if not math.isfinite(seconds) or not MIN_EVERY <= seconds <= MAX_EVERY:
        raise InvalidSchedule(
            f"Schedule {name!r}: its interval must be from {MIN_EVERY} second to "
            f"{MAX_EVERY:.0f} seconds (ten years), not {every!r}. Nothing was stored."
        )
    return every if isinstance(every, timedelta) else timedelta(seconds=seconds)


def _aware(moment: datetime, zone: str) -> datetime:
    """A naive moment is read in the schedule's time zone."""
    try:
        tz = ZoneInfo(zone)
    except Exception as e:
        raise InvalidTimetable(f"unknown time zone {zone!r}") from e
    if dj_timezone.is_aware(moment):
        return moment.astimezone(UTC)
    return moment.replace(tzinfo=tz).astimezone(UTC)


def spec_for(
    name: str,
    task_path: str,
    timetable: Timetable,
    *,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    queue_name: str = "",
    priority: int | None = None,
    catch_up: str = "once",
    catch_up_limit: int = 100,
    grace: float = 60.0,
    due_kwarg: str = "",
    jitter: float = 0.0,
    run_at_creation: bool = False,
    repeats: int | None = None,
    source: str = "database",
) -> ScheduleSpec:
    """A checked ``ScheduleSpec``; raise ``InvalidSchedule`` naming the schedule and problem."""
    kwargs = dict(kwargs or {})

    def refuse(problem: str) -> InvalidSchedule:
        return InvalidSchedule(
            f"Schedule {name!r} (task {task_path}): {problem}. Nothing was stored."
        )

    if not isinstance(name, str) or not name.strip() or len(name) > NAME_LENGTH:
        raise InvalidSchedule(
            f"A schedule needs a name of 1 to {NAME_LENGTH} characters, not {name!r}."
        )
    if not isinstance(args, list | tuple):
        raise refuse(f"args must be a list, not {type(args).__name__}")
    try:
        catch = CatchUp(catch_up)
    except ValueError:
        choices = ", ".join(c.value for c in CatchUp)
        raise refuse(f"catch_up must be one of {choices}, not {catch_up!r}") from None
    problems = _json_problems(args, kwargs) + [
        problem
        for ok, problem in [
            (
                _whole(catch_up_limit, 1, MAX_CATCH_UP),
                f"catch_up_limit must be 1 to {MAX_CATCH_UP}",
            ),
            (
                _seconds(grace, MIN_GRACE, 7 * 86400),
                f"grace must be {MIN_GRACE:g} seconds (a look for due schedules comes about "
                "once a second) to a week",
            ),
            (_seconds(jitter, 0, MAX_JITTER), f"jitter must be 0 to {MAX_JITTER:g} seconds"),
            (repeats is None or _whole(repeats, 1, 2**31 - 1), "repeats must be 1 to 2147483647"),
            (not due_kwarg or due_kwarg.isidentifier(), f"due_kwarg {due_kwarg!r} is not a name"),
            (not due_kwarg or due_kwarg not in kwargs, f"due_kwarg {due_kwarg!r} is in kwargs too"),
            (priority is None or _whole(priority, -100, 100), "priority must be -100 to 100"),
        ]
        if not ok
    ]
    if problems:
        raise refuse(problems[0])
    return ScheduleSpec(
        name=name,
        task_path=task_path,
        timetable=timetable,
        args=tuple(args),
        kwargs=kwargs,
        queue_name=queue_name or "",
        priority=priority,
        catch_up=catch,
        catch_up_limit=catch_up_limit,
        grace=float(grace),
        due_kwarg=due_kwarg,
        jitter=float(jitter),
        run_at_creation=run_at_creation,
        repeats=repeats,
        source=source,
    )


def _json_problems(args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[str]:
    named = [(f"positional argument {i}", v) for i, v in enumerate(args)]
    named += [(f"keyword argument {k!r}", v) for k, v in kwargs.items()]
    return [
        f"{where} ({type(value).__name__}) is not JSON: {problem}"
        for where, value in named
        if (problem := json_problem(value)) is not None
    ]


def _whole(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _seconds(value: Any, low: float, high: float) -> bool:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and math.isfinite(value) and low <= value <= high


def _check_call(spec: ScheduleSpec, task: Task) -> None:
    """Refuse arguments the task's function cannot take (the due time's keyword too)."""
    kwargs = dict(spec.kwargs)
    if spec.due_kwarg:
        kwargs[spec.due_kwarg] = ""
    if (problem := call_problem(task, spec.args, kwargs)) is not None:
        raise InvalidSchedule(
            f"Schedule {spec.name!r} (task {spec.task_path}): its arguments do not fit the "
            f"task: {problem}. Nothing was stored."
        )


def _check_queue(spec: ScheduleSpec, task: Task, alias: str) -> None:
    changes: dict[str, Any] = {"backend": alias}
    if spec.queue_name:
        changes["queue_name"] = spec.queue_name
    try:
        task.using(**changes)
    except Exception as e:
        raise InvalidSchedule(
            f"Schedule {spec.name!r} (task {spec.task_path}): {e}. Nothing was stored."
        ) from e


# --- in code ---------------------------------------------------------------------------------


def schedule(
    name: str,
    *,
    cron: str | None = None,
    every: timedelta | float | None = None,
    kind: str | None = None,
    at: datetime | None = None,
    start: datetime | None = None,
    timezone: str | None = None,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    backend: str | None = None,
    **options: Any,
) -> Callable[[Task], Task]:
    """Run the task below on a timetable; several, with distinct names, may be stacked.

    ``cron`` (five fields, or six with seconds first), ``every`` (a ``timedelta`` or
    seconds), ``at`` (one run), ``kind`` (``hourly``, ``daily``, ``weekly``, ``biweekly``,
    ``monthly``, ``bimonthly``, ``quarterly``, ``yearly``, from ``start``), or none of
    them: it runs only when asked to. ``options``: ``queue_name``, ``priority``,
    ``catch_up`` ("skip", "once", "all"), ``catch_up_limit``, ``grace``, ``due_kwarg``,
    ``jitter``, ``run_at_creation``, ``repeats``.
    """
    timetable = timetable_for(
        name, cron=cron, every=every, kind=kind, at=at, start=start, timezone=timezone
    )

    def decorate(task: Task) -> Task:
        if not isinstance(task, Task):
            raise InvalidSchedule(
                f"Schedule {name!r}: @schedule goes above @task (it decorates a task, not "
                f"a {type(task).__name__})."
            )
        alias = backend or task.backend
        spec = spec_for(
            name, task.module_path, timetable, args=args, kwargs=kwargs, source="code", **options
        )
        _check_call(spec, task)
        _check_queue(spec, task, alias)
        declare(spec, alias)
        return task

    return decorate


def schedule_command(
    name: str,
    command: str,
    *command_args: str,
    backend: str | None = None,
    **timing: Any,
) -> None:
    """Run a management command on a timetable, as a task (``conveyor.commands``)."""
    from django.core.management import get_commands

    if command not in get_commands():
        raise InvalidSchedule(f"Schedule {name!r}: no management command {command!r}.")
    options = {k: timing.pop(k) for k in list(timing) if k not in _TIMING}
    timetable = timetable_for(name, **timing)
    spec = spec_for(
        name, COMMAND_TASK, timetable, args=[command, *command_args], source="code", **options
    )
    declare(spec, backend or DEFAULT_TASK_BACKEND_ALIAS)


_TIMING = ("cron", "every", "kind", "at", "start", "timezone")


def declare(spec: ScheduleSpec, alias: str) -> None:
    """Add a code schedule to those synced into ``alias``'s store at start-up."""
    declared = _DECLARED.setdefault(alias, {})
    earlier = declared.get(spec.name)
    if earlier is not None and earlier.fingerprint() != spec.fingerprint():
        raise InvalidSchedule(
            f"Schedule {spec.name!r} is declared twice for backend {alias!r} ({earlier.task_path} "
            f"and {spec.task_path}); give each its own name."
        )
    declared[spec.name] = spec


def declared(alias: str | None = None) -> list[ScheduleSpec]:
    """The code schedules of a backend (of every backend, without ``alias``)."""
    if alias is not None:
        return list(_DECLARED.get(alias, {}).values())
    return [spec for specs in _DECLARED.values() for spec in specs.values()]


def declared_commands() -> set[str]:
    """The management commands code schedules run: those a scheduled command may be."""
    return {str(spec.args[0]) for spec in declared() if spec.task_path == COMMAND_TASK}


def sync(backend: str | None = None) -> SyncReport:
    """Make the backend's stored code schedules those declared now."""
    alias = backend or DEFAULT_TASK_BACKEND_ALIAS
    return worker_store(alias).sync_schedules(declared(alias))


# --- at run time -----------------------------------------------------------------------------


def create(
    name: str,
    task: Task | str,
    *,
    cron: str | None = None,
    every: timedelta | float | None = None,
    kind: str | None = None,
    at: datetime | None = None,
    start: datetime | None = None,
    timezone: str | None = None,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    backend: str | None = None,
    paused: bool = False,
    **options: Any,
) -> ScheduleInfo:
    """Store a new schedule of a registered task (or its dotted path); see ``schedule``."""
    timetable = timetable_for(
        name, cron=cron, every=every, kind=kind, at=at, start=start, timezone=timezone
    )
    path = task.module_path if isinstance(task, Task) else str(task)
    spec = spec_for(name, path, timetable, args=args, kwargs=kwargs, **options)
    alias = backend or (task.backend if isinstance(task, Task) else DEFAULT_TASK_BACKEND_ALIAS)
    _check_runnable(spec, alias)
    return worker_store(alias).add_schedule(spec, paused=paused)


def create_command(
    name: str, command: str, *command_args: str, backend: str | None = None, **timing: Any
) -> ScheduleInfo:
    """Store a new schedule that runs a management command (one ``COMMANDS`` allows)."""
    options = {k: timing.pop(k) for k in list(timing) if k not in (*_TIMING, "paused")}
    paused = bool(timing.pop("paused", False))
    timetable = timetable_for(name, **timing)
    spec = spec_for(name, COMMAND_TASK, timetable, args=[command, *command_args], **options)
    alias = backend or DEFAULT_TASK_BACKEND_ALIAS
    _check_runnable(spec, alias)
    return worker_store(alias).add_schedule(spec, paused=paused)


def check(spec: ScheduleSpec, *, backend: str | None = None) -> None:
    """Raise ``InvalidSchedule`` if the runs of ``spec`` could not be enqueued on ``backend``.

    What ``create`` and ``update`` check before they store anything: a registered task,
    arguments it can take, a queue the backend has; a form checks a spec it built with it.
    """
    _check_runnable(spec, backend or DEFAULT_TASK_BACKEND_ALIAS)


def _check_runnable(spec: ScheduleSpec, alias: str) -> None:
    """Refuse a schedule whose runs could not be enqueued: checked when it is saved."""
    try:
        task = resolve_task(spec.task_path)
    except TaskNotFound as e:
        raise InvalidSchedule(
            f"Schedule {spec.name!r}: {e}. A schedule runs only registered tasks (functions "
            "decorated with @task); nothing was stored."
        ) from e
    _check_call(spec, task)
    _check_queue(spec, task, alias)
    if spec.task_path == COMMAND_TASK:
        from conveyor.commands import command_problem

        if problem := command_problem(str(spec.args[0]) if spec.args else ""):
            raise InvalidSchedule(f"Schedule {spec.name!r}: {problem} Nothing was stored.")
    backend = task_backends[alias]
    now = clock.now()
    try:
        backend.scheduled_call(spec, now, now)  # type: ignore[attr-defined]
    except Exception as e:
        raise InvalidSchedule(f"Schedule {spec.name!r}: {e}") from e


def update(name: str, *, backend: str | None = None, **changes: Any) -> ScheduleInfo:
    """Change a stored schedule made at run time; unnamed fields keep their values.

    Read, changed and saved again if someone else changed it in between: two updates of
    different fields both stand.
    """
    alias = backend or DEFAULT_TASK_BACKEND_ALIAS
    unknown = sorted(set(changes) - set(_TIMING) - set(UPDATABLE))
    if unknown:
        raise InvalidSchedule(
            f"Schedule {name!r}: update() cannot change {', '.join(unknown)}; it changes "
            f"{', '.join((*_TIMING, *UPDATABLE))} (pause() and resume() pause it). Nothing "
            "was stored."
        )
    store = worker_store(alias)
    for _ in range(UPDATE_TRIES):
        info = store.get_schedule(name)
        if info is None or info.retired:
            raise ScheduleNotFound(f"No schedule {name!r} on backend {alias!r}.")
        new = _updated(info, alias, dict(changes))
        try:
            return store.change_schedule(new, was=info.fingerprint)
        except ScheduleChanged:
            continue
    raise ScheduleChanged(
        f"Schedule {name!r} kept changing while it was updated; nothing was stored."
    )


def _updated(info: ScheduleInfo, alias: str, changes: dict[str, Any]) -> ScheduleSpec:
    """``info``'s definition with ``changes``, checked as ``create`` checks it."""
    spec, name = info.spec, info.name
    if spec.source == "code":
        raise InvalidSchedule(
            f"Schedule {name!r} is declared in code (@schedule): change it there. Nothing "
            "was stored."
        )
    timing = {k: changes.pop(k) for k in list(changes) if k in _TIMING}
    timetable = spec.timetable
    if timing:
        timetable = timetable_for(name, **(_timing_of(timetable, timing) | timing))
    task = changes.pop("task", spec.task_path)
    path = task.module_path if isinstance(task, Task) else str(task)
    new = spec_for(name, path, timetable, source=spec.source, **(spec.options() | changes))
    _check_runnable(new, alias)
    return new


def _timing_of(timetable: Timetable, given: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments that make ``timetable``, less what ``given`` replaces.

    A new cron=, every=, at= or kind= replaces the old one (with its start, unless given).
    """
    kept: dict[str, Any] = {"timezone": timetable.timezone}
    if any(key in given for key in ("cron", "every", "at", "kind")):
        return kept
    if timetable.kind == CRON:
        kept["cron"] = timetable.cron
    elif timetable.kind == EVERY:
        kept["every"] = timetable.every
    elif timetable.kind == ONCE:
        kept["at"] = timetable.start
    elif timetable.kind != MANUAL:
        kept["kind"] = timetable.kind
    if timetable.kind not in (ONCE, MANUAL) and timetable.start is not None:
        kept["start"] = timetable.start
    if timetable.kind == ONCE and "start" in given:
        kept["at"] = given["start"]
    return kept


def pause(name: str, *, backend: str | None = None) -> None:
    """Stop a schedule's runs until it is resumed."""
    _toggle(name, backend, paused=True)


def resume(name: str, *, backend: str | None = None) -> None:
    """Let a paused schedule run again, from its next due time after now."""
    _toggle(name, backend, paused=False)


def _toggle(name: str, backend: str | None, *, paused: bool) -> None:
    alias = backend or DEFAULT_TASK_BACKEND_ALIAS
    if not worker_store(alias).pause_schedule(name, paused):
        raise ScheduleNotFound(f"No schedule {name!r} on backend {alias!r}.")


def delete(name: str, *, backend: str | None = None) -> None:
    """Delete a schedule made at run time (or a retired code one); its jobs stay."""
    alias = backend or DEFAULT_TASK_BACKEND_ALIAS
    if not worker_store(alias).delete_schedule(name):
        raise ScheduleNotFound(f"No schedule {name!r} on backend {alias!r}.")


def get(name: str, *, backend: str | None = None) -> ScheduleInfo:
    """The stored schedule of that name."""
    alias = backend or DEFAULT_TASK_BACKEND_ALIAS
    info = worker_store(alias).get_schedule(name)
    if info is None:
        raise ScheduleNotFound(f"No schedule {name!r} on backend {alias!r}.")
    return info


def all(*, backend: str | None = None, retired: bool = False) -> list[ScheduleInfo]:
    """The stored schedules of a backend, by name."""
    return worker_store(backend or DEFAULT_TASK_BACKEND_ALIAS).schedules(retired=retired)


def run(name: str, *, backend: str | None = None) -> TaskResult:
    """Enqueue one run of a schedule now, outside its timetable; return its result."""
    alias = backend or DEFAULT_TASK_BACKEND_ALIAS
    store = worker_store(alias)
    fired: Fired = store.run_schedule(name)
    if fired.result_id is None:
        raise InvalidSchedule(
            f"Schedule {name!r}: its task {fired.task_path} could not be enqueued (see the log)."
        )
    return store.get_result(fired.result_id)


__all__ = [
    "check",
    "create",
    "create_command",
    "declared",
    "delete",
    "get",
    "pause",
    "resume",
    "run",
    "schedule",
    "schedule_command",
    "spec_for",
    "sync",
    "timetable_for",
    "update",
]
