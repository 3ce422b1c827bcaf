"""Schedules: saving them, and firing each due time once, whatever number of workers try.

A tick locks one due schedule's row (skipping rows another worker holds; SQLite takes its
one write lock), works out the due times to fire (``conveyor.backends.scheduling``),
inserts a firing per due time under the unique key (schedule, due time), enqueues its job,
and moves the schedule's next run past them, all in one transaction: a worker killed
half-way leaves nothing, and the next tick of any worker fires the same due times. The
firings are kept apart from the jobs, so that deleting a job never frees its due time.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from django.db import IntegrityError, OperationalError
from django.db.models import Q, QuerySet

from conveyor import clock
from conveyor.backends import scheduling
from conveyor.backends.database.models import Schedule, ScheduleFiring
from conveyor.backends.database.store import Store
from conveyor.cron import CatchUp, Timetable
from conveyor.exceptions import (
    InvalidSchedule,
    ScheduleChanged,
    ScheduleExists,
    ScheduleNotFound,
)
from conveyor.records import Fired, ScheduleInfo, ScheduleSpec, SyncReport

logger = logging.getLogger(__name__)

SYNC_TRIES = 5  # a code schedule two workers add at once: the loser reads it and goes on
CATCH_UPS = {c.value for c in CatchUp}

# Enqueues the runs due at these times of a schedule; returns each one's result id, or
# None where the run could not be enqueued (the error was logged).
Enqueue = Callable[[ScheduleSpec, Sequence[datetime], datetime], list[str | None]]


def _rows(store: Store) -> QuerySet[Schedule]:
    return Schedule.objects.using(store.using).filter(backend_name=store.backend)


def _locked(store: Store, *, skip: bool = False) -> QuerySet[Schedule]:
    """Rows locked for an update: waiting for other holders, or, ``skip``, passing them by."""
    skip = skip and store.connection.features.has_select_for_update_skip_locked
    return _rows(store).select_for_update(skip_locked=skip)


def _stored(moment: datetime | None) -> Any:
    return clock.stored(moment)


def _read(moment: datetime | None) -> datetime | None:
    return None if moment is None else clock.aware(moment)


def timetable_of(row: Schedule) -> Timetable:
    return Timetable(
        kind=row.kind,
        cron=row.cron,
        every=row.every,
        start=_read(row.start_at),
        timezone=row.timezone,
        hash_id=row.name,
    )


def spec_of(row: Schedule) -> ScheduleSpec:
    return ScheduleSpec(
        name=row.name,
        task_path=row.task_path,
        timetable=timetable_of(row),
        args=tuple(row.args),
        kwargs=dict(row.kwargs),
        queue_name=row.queue_name,
        priority=row.priority,
        catch_up=CatchUp(row.catch_up) if row.catch_up in CATCH_UPS else CatchUp.ONCE,
        catch_up_limit=row.catch_up_limit,
        grace=row.grace,
        due_kwarg=row.due_kwarg,
        jitter=row.jitter,
        run_at_creation=row.run_at_creation,
        repeats=row.repeats,
        source=row.source,
    )


def info_of(row: Schedule) -> ScheduleInfo:
    return ScheduleInfo(
        spec=spec_of(row),
        backend=row.backend_name,
        paused=row.paused,
        retired=row.retired_at is not None,
        next_run_at=_read(row.next_run_at),
        last_run_at=_read(row.last_run_at),
        last_result_id=str(row.last_result_id) if row.last_result_id else None,
        runs=row.runs,
        repeats_left=row.repeats_left,
        created_at=_read(row.created_at),
        updated_at=_read(row.updated_at),
        fingerprint=row.fingerprint,
    )


def _definition(spec: ScheduleSpec, timetable: Timetable) -> dict[str, Any]:
    """The columns that hold ``spec``'s definition."""
    return spec.options() | {
        "task_path": spec.task_path,
        "kind": timetable.kind,
        "cron": timetable.cron,
        "every": timetable.every,
        "start_at": _stored(timetable.start),
        "timezone": timetable.timezone,
        "source": spec.source,
        "fingerprint": spec.fingerprint(),
    }


def _create(store: Store, spec: ScheduleSpec, now: datetime, paused: bool) -> Schedule:
    timetable = scheduling.anchored(spec, now)
    first = scheduling.first_run(spec, timetable, now, new=True)
    return Schedule.objects.using(store.using).create(
        backend_name=store.backend,
        name=spec.name,
        paused=paused,
        repeats_left=spec.repeats,
        next_run_at=_stored(first),
        created_at=_stored(now),
        updated_at=_stored(now),
        **_definition(spec, timetable),
    )


def _redefine(row: Schedule, spec: ScheduleSpec, now: datetime) -> None:
    """Give ``row`` the definition ``spec``; its next run is worked out again."""
    timetable = scheduling.anchored(spec, now)
    left = scheduling.repeats_after_change(row.repeats, row.repeats_left, spec.repeats)
    pending = None if row.retired_at is not None else _read(row.next_run_at)
    for name, value in _definition(spec, timetable).items():
        setattr(row, name, value)
    last_run = _read(row.last_run_at)
    row.next_run_at = _stored(scheduling.changed_run(spec, timetable, now, last_run, pending))
    row.repeats_left = left
    if left == 0:
        row.next_run_at = None
    row.retired_at = None
    row.updated_at = _stored(now)


def add(store: Store, spec: ScheduleSpec, paused: bool) -> ScheduleInfo:
    with store.dialect.write_transaction():
        try:
            return info_of(_create(store, spec, store.now(), paused))
        except IntegrityError as e:
            raise ScheduleExists(
                f"Schedule {spec.name!r} already exists on backend {store.backend!r}; "
                "change it, or delete it first."
            ) from e


def change(store: Store, spec: ScheduleSpec, was: str | None = None) -> ScheduleInfo:
    with store.dialect.write_transaction():
        row = _locked(store).filter(name=spec.name).first()
        if row is None:
            raise ScheduleNotFound(f"No schedule {spec.name!r} on backend {store.backend!r}.")
        if was is not None and row.fingerprint != was:
            raise ScheduleChanged(f"Schedule {spec.name!r} was changed meanwhile.")
        if row.source == "code" and spec.source != "code":
            raise InvalidSchedule(
                f"Schedule {spec.name!r} is declared in code (@schedule): change it there."
            )
        _redefine(row, spec, store.now())
        row.save(using=store.using)
        return info_of(row)


def sync(store: Store, specs: Sequence[ScheduleSpec]) -> SyncReport:
    """Make the stored code schedules ``specs``; tried again if another worker added one."""
    for attempt in range(SYNC_TRIES):
        try:
            with store.dialect.write_transaction():
                store.dialect.serialize(f"conveyor-sync-{store.backend}")  # one at a time
                return _sync(store, specs)
        except (IntegrityError, OperationalError) as e:
            retry = isinstance(e, IntegrityError) or store.dialect.deadlock(e)
            if not retry or attempt == SYNC_TRIES - 1:
                raise
            time.sleep(random.uniform(0, 0.05 * 2**attempt))
    raise AssertionError("unreachable")


def _sync(store: Store, specs: Sequence[ScheduleSpec]) -> SyncReport:
    now = store.now()
    names = {spec.name for spec in specs}
    # One order for every syncer: two of them never wait on each other's rows in a circle.
    locked = _locked(store).filter(Q(name__in=names) | Q(fingerprint="")).order_by("name")
    stored = {row.name: row for row in locked}
    added: list[str] = []
    changed: list[str] = []
    for loose in stored.values():
        if loose.fingerprint == "" and loose.name not in names:
            _complete(store, loose, now)
    for spec in specs:
        row = stored.get(spec.name)
        if row is None:
            _create(store, spec, now, paused=False)
            added.append(spec.name)
        elif row.source != "code":
            logger.error(
                "Schedule %r is declared in code (@schedule) but a schedule made at run time "
                "on backend %r has that name: the code one is left out; rename one of them.",
                spec.name,
                store.backend,
            )
        elif row.fingerprint != spec.fingerprint() or row.retired_at is not None:
            _redefine(row, spec, now)
            row.save(using=store.using)
            changed.append(spec.name)
    gone = _rows(store).filter(source="code", retired_at=None).exclude(name__in=names)
    retired = sorted(gone.values_list("name", flat=True))
    gone.update(retired_at=_stored(now), next_run_at=None, updated_at=_stored(now))
    return SyncReport(added=tuple(added), changed=tuple(changed), retired=tuple(retired))


def _complete(store: Store, row: Schedule, now: datetime) -> None:
    """Work out what a row written without Conveyor's API (a data migration) lacks.

    It is checked as the API checks a schedule; one that fails is logged and left as it
    is, never run.
    """
    from conveyor.schedules import spec_for

    try:
        timetable = timetable_of(row)
        timetable.validate()
        spec = spec_for(row.name, row.task_path, timetable, source=row.source, **_options_of(row))
    except Exception as e:
        logger.error("Schedule %r cannot run: %s Fix or delete it.", row.name, e)
        return
    if row.runs == 0 and row.repeats_left is None:
        row.repeats_left = row.repeats
    _redefine(row, spec, now)
    row.created_at = row.created_at or _stored(now)
    row.save(using=store.using)
    logger.info("Schedule %r (written directly to the table) is set up.", row.name)


def _options_of(row: Schedule) -> dict[str, Any]:
    return {
        "args": row.args,
        "kwargs": row.kwargs,
        "queue_name": row.queue_name,
        "priority": row.priority,
        "catch_up": row.catch_up,
        "catch_up_limit": row.catch_up_limit,
        "grace": row.grace,
        "due_kwarg": row.due_kwarg,
        "jitter": row.jitter,
        "run_at_creation": row.run_at_creation,
        "repeats": row.repeats,
    }


def pause(store: Store, name: str, paused: bool) -> bool:
    with store.dialect.write_transaction():
        row = _locked(store).filter(name=name).first()
        if row is None:
            return False
        if row.paused and not paused:
            now = store.now()
            nxt = scheduling.resumed_run(timetable_of(row), _read(row.next_run_at), now)
            row.next_run_at = _stored(nxt)
        row.paused = paused
        row.updated_at = _stored(store.now())
        row.save(using=store.using)
        return True


def delete(store: Store, name: str) -> bool:
    with store.dialect.write_transaction():
        row = _rows(store).filter(name=name).first()
        if row is None:
            return False
        if row.source == "code" and row.retired_at is None:
            raise InvalidSchedule(
                f"Schedule {name!r} is declared in code (@schedule): remove it there; it is "
                "retired at the next start-up, and can be deleted then."
            )
        row.delete()
        return True


def listing(store: Store, retired: bool) -> list[ScheduleInfo]:
    rows = _rows(store).order_by("name")
    if not retired:
        rows = rows.filter(retired_at=None)
    return [info_of(row) for row in rows]


def get(store: Store, name: str) -> ScheduleInfo | None:
    row = _rows(store).filter(name=name).first()
    return info_of(row) if row is not None else None


def due(store: Store, limit: int) -> list[int]:
    """The keys of schedules whose next run is due (store clock), the most overdue first."""
    sql = (
        f"SELECT id FROM {Schedule._meta.db_table} WHERE backend_name = %s "
        f"AND next_run_at <= {store.dialect.reached()} AND paused = %s AND retired_at IS NULL "
        "ORDER BY next_run_at LIMIT %s"
    )
    return [row[0] for row in store.fetch(sql, [store.backend, False, limit])]


def fire(store: Store, key: int, enqueue: Enqueue) -> list[Fired]:
    """Fire the due times of one schedule, if it is still due and no other worker holds it."""
    with store.dialect.short_waits():
        row = _locked(store, skip=True).filter(pk=key, paused=False, retired_at=None).first()
        now = store.now()
        next_run = _read(row.next_run_at) if row is not None else None
        if row is None or next_run is None or next_run > now:
            return []  # another worker fired it, or holds it now
        spec, timetable = spec_of(row), timetable_of(row)
        owed = scheduling.firing(
            spec, timetable, next_run, now, row.repeats_left, set(), _read(row.last_run_at)
        )
        taken = _taken(store, row, owed.due)
        due = [slot for slot in owed.due if slot not in taken]
        ids = enqueue(spec, due, now)
        ScheduleFiring.objects.using(store.using).bulk_create(
            ScheduleFiring(
                schedule=row, due_at=_stored(slot), result_id=result_id, fired_at=_stored(now)
            )
            for slot, result_id in zip(due, ids, strict=True)
        )
        _advance(row, owed, due, ids, now)
        row.save(using=store.using)
        _log_firing(row.name, owed, due, ids)
        if row.runs % scheduling.FIRINGS_KEPT < len(due):
            _trim(store, row)
    return [
        Fired(schedule=row.name, task_path=row.task_path, due_at=slot, result_id=result_id)
        for slot, result_id in zip(due, ids, strict=True)
    ]


def _log_firing(
    name: str, owed: scheduling.Firing, due: Sequence[datetime], ids: Sequence[str | None]
) -> None:
    if owed.missed:
        logger.info(
            "Schedule %r: %d run(s) or more missed, left out by its catch-up.", name, owed.missed
        )
    jobs = [i for i in ids if i]
    if jobs:
        logger.info(
            "Schedule %r fired %d run(s), due %s%s: job(s) %s.",
            name,
            len(jobs),
            due[0].isoformat(),
            f" to {due[-1].isoformat()}" if len(due) > 1 else "",
            ", ".join(jobs[:5]) + (", ..." if len(jobs) > 5 else ""),
        )


def _taken(store: Store, row: Schedule, slots: Sequence[datetime]) -> set[datetime]:
    if not slots:
        return set()
    found = ScheduleFiring.objects.using(store.using).filter(
        schedule=row, on_demand=False, due_at__in=[_stored(slot) for slot in slots]
    )
    return {clock.aware(moment) for moment in found.values_list("due_at", flat=True)}


def _advance(
    row: Schedule,
    owed: scheduling.Firing,
    due: Sequence[datetime],
    ids: Sequence[str | None],
    now: datetime,
) -> None:
    row.next_run_at = _stored(owed.next_run)
    row.repeats_left = owed.repeats_left
    if due:
        row.last_run_at = _stored(max(due))
        row.runs += sum(1 for result_id in ids if result_id)
        row.last_result_id = next((i for i in reversed(ids) if i), row.last_result_id)
    row.updated_at = _stored(now)


def _trim(store: Store, row: Schedule) -> None:
    """Forget firings older than the last ``FIRINGS_KEPT`` (the next run is past them)."""
    firings = ScheduleFiring.objects.using(store.using).filter(schedule=row)
    keep = list(
        firings.order_by("-due_at").values_list("due_at", flat=True)[: scheduling.FIRINGS_KEPT]
    )
    if len(keep) == scheduling.FIRINGS_KEPT:
        firings.filter(due_at__lt=keep[-1]).delete()


def run_now(store: Store, name: str, enqueue: Enqueue) -> Fired:
    """Fire one run of a schedule now, outside its timetable."""
    with store.dialect.write_transaction():
        row = _locked(store).filter(name=name, retired_at=None).first()
        if row is None:
            raise ScheduleNotFound(f"No schedule {name!r} on backend {store.backend!r}.")
        now = store.now()
        spec = replace(spec_of(row), jitter=0.0)
        (result_id,) = enqueue(spec, [now], now)
        if result_id is None:
            raise InvalidSchedule(
                f"Schedule {name!r}: its task {row.task_path} could not be enqueued (see the "
                "log); nothing was stored."
            )
        ScheduleFiring.objects.using(store.using).create(
            schedule=row,
            due_at=_stored(now),
            result_id=result_id,
            fired_at=_stored(now),
            on_demand=True,
        )
        row.runs += 1
        row.last_result_id = result_id or row.last_result_id
        row.updated_at = _stored(now)
        row.save(using=store.using)
    return Fired(
        schedule=name, task_path=row.task_path, due_at=now, result_id=result_id, on_demand=True
    )
