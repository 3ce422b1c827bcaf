"""Schedules in trouble, on every store: broken ones, changes under way, odd settings."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connections, transaction
from django.test import override_settings

from conveyor import schedules
from conveyor.exceptions import InvalidSchedule
from conveyor.testing import RunSummary, run_until_done, store_clock
from tests.helpers import job

REPORT = "tests.testapp.tasks.scheduled_report"


def code(name: str, **timing):  # type: ignore[no-untyped-def]
    args = timing.pop("args", ["c"])
    options = {k: timing.pop(k) for k in ("repeats",) if k in timing}
    tt = schedules.timetable_for(name, **timing)
    return schedules.spec_for(name, REPORT, tt, args=args, source="code", **options)


def test_a_schedule_that_cannot_be_enqueued_never_holds_up_the_others(backend, backend_alias):
    with store_clock() as clock:
        # Its task's unique key raises when a run is made: that run is skipped and logged.
        schedules.create(
            "broken", "tests.testapp.tasks.bad_key", every=60, args=[1], backend=backend_alias
        )
        schedules.create("healthy", REPORT, every=60, args=["h"], backend=backend_alias)
        for _ in range(3):
            clock.advance(61)
            fired = {f.schedule: f for f in backend.fire_schedules()}
            assert fired["healthy"].result_id is not None
            assert fired["broken"].result_id is None
        assert schedules.get("healthy", backend=backend_alias).runs == 3
        assert schedules.get("broken", backend=backend_alias).runs == 0
        assert run_until_done(backend_alias) == RunSummary(succeeded=3)


def test_a_changed_schedule_keeps_a_run_that_fell_due_while_no_worker_ran(backend, backend_alias):
    with store_clock() as clock:
        backend.sync_schedules([code("hourly", every=3600, args=["v1"])])
        clock.advance(3600 + 120)  # the workers were down over the due time
        report = backend.sync_schedules([code("hourly", every=3600, args=["v2"])])
        assert report.changed == ("hourly",)
        [fired] = backend.fire_schedules()
        assert job(backend.get_result(fired.result_id)).args == ["v2"]


def test_changing_other_fields_keeps_the_repeat_count(backend, backend_alias):
    with store_clock() as clock:
        schedules.create("twice", REPORT, every=60, args=["r"], repeats=2, backend=backend_alias)
        for _ in range(2):
            clock.advance(61)
            backend.fire_schedules()
        info = schedules.update("twice", jitter=1, backend=backend_alias)
        assert info.repeats_left == 0 and info.next_run_at is None
        clock.advance(600)
        assert backend.fire_schedules() == []
        info = schedules.update("twice", repeats=3, backend=backend_alias)  # a new count
        assert info.repeats_left == 3 and info.next_run_at is not None


def test_a_run_now_that_cannot_be_enqueued_records_nothing(backend, backend_alias):
    schedules.create("broken", "tests.testapp.tasks.bad_key", args=[1], backend=backend_alias)
    with pytest.raises(InvalidSchedule, match="could not be enqueued"):
        schedules.run("broken", backend=backend_alias)
    info = schedules.get("broken", backend=backend_alias)
    assert info.runs == 0 and info.last_result_id is None


def test_limits_that_would_hold_up_a_worker_are_refused(backend_alias):
    cases = [
        ({"catch_up_limit": 5000}, "catch_up_limit"),
        ({"catch_up": "skip", "grace": 0.5}, "grace"),
        ({"jitter": 1e12}, "jitter"),
        ({"every": float("nan")}, "interval"),
        ({"every": 1e300}, "interval"),
        ({"cron": ""}, "empty"),
        ({"cron": "0 " * 150}, "200 characters"),
    ]
    for changes, words in cases:
        timing = {"every": 60} if "every" not in changes and "cron" not in changes else {}
        with pytest.raises(InvalidSchedule, match=words) as raised:
            schedules.create("x", REPORT, args=["x"], backend=backend_alias, **timing, **changes)
        assert "'x'" in str(raised.value) and "Nothing was stored" in str(raised.value)
    assert schedules.all(backend=backend_alias) == []


@pytest.mark.parametrize("engine", ["memory", "sqlite"], indirect=True)
def test_schedules_fire_with_use_tz_off(backend, backend_alias):
    with override_settings(USE_TZ=False, TIME_ZONE="Europe/Paris"), store_clock() as clock:
        schedules.create(
            "local",
            REPORT,
            every=60,
            args=["l"],
            jitter=5,
            due_kwarg="due",
            backend=backend_alias,
        )
        clock.advance(61)
        [fired] = backend.fire_schedules()
        assert fired.result_id is not None
        clock.advance(10)
        assert run_until_done(backend_alias) == RunSummary(succeeded=1)
        assert schedules.run("local", backend=backend_alias).id


@pytest.mark.parametrize("engine", ["postgres", "mysql"], indirect=True)
def test_changes_wait_for_a_firer_holding_the_schedule(backend, backend_alias):
    from conveyor.models import Schedule

    schedules.create("held", REPORT, every=60, args=["h"], backend=backend_alias)
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        try:
            with transaction.atomic(using=backend.database):
                Schedule.objects.using(backend.database).select_for_update().get(name="held")
                locked.set()
                release.wait(10)
        finally:
            connections[backend.database].close()

    holder = threading.Thread(target=hold)
    holder.start()
    assert locked.wait(10)
    threading.Timer(0.3, release.set).start()
    schedules.pause("held", backend=backend_alias)  # waits for the lock, then pauses
    holder.join()
    assert schedules.get("held", backend=backend_alias).paused


@pytest.mark.parametrize("engine", ["sqlite", "postgres", "mysql"], indirect=True)
def test_workers_starting_together_all_sync_the_code_schedules(backend, backend_alias):
    specs = [code(f"s{i}", every=60 + i) for i in range(20)]
    errors: list[BaseException] = []

    def sync() -> None:
        try:
            backend.sync_schedules(specs)
        except BaseException as e:
            errors.append(e)
        finally:
            connections[backend.database].close()

    threads = [threading.Thread(target=sync) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(schedules.all(backend=backend_alias)) == 20


@pytest.mark.parametrize("engine", ["sqlite", "postgres", "mysql"], indirect=True)
def test_a_schedule_written_by_a_data_migration_is_set_up_at_start_up(backend, backend_alias):
    from conveyor.models import Schedule

    with store_clock() as clock:
        Schedule.objects.using(backend.database).create(
            backend_name=backend_alias,
            name="from-migration",
            task_path=REPORT,
            args=["m"],
            kind="every",
            every=timedelta(minutes=5),
            timezone="UTC",
        )
        backend.sync_schedules([])
        info = schedules.get("from-migration", backend=backend_alias)
        assert info.next_run_at is not None
        clock.advance(301)
        [fired] = backend.fire_schedules()
        assert fired.schedule == "from-migration" and fired.result_id is not None


@pytest.mark.parametrize("engine", ["postgres", "mysql"], indirect=True)
def test_a_firing_gives_up_on_a_transaction_holding_its_job_and_goes_on(backend, backend_alias):
    import time

    from tests.helpers import on
    from tests.testapp import tasks

    schedules.create(
        "held-key",
        "tests.testapp.tasks.unique_add",
        every=60,
        args=[1, 2],
        run_at_creation=True,
        backend=backend_alias,
    )
    schedules.create(
        "free", REPORT, every=60, args=["f"], run_at_creation=True, backend=backend_alias
    )
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:  # a user's transaction enqueued the same unique job, and is slow
        try:
            with transaction.atomic(using=backend.database):
                on(tasks.unique_add, backend_alias).enqueue(1, 2)
                inside.set()
                release.wait(15)
        finally:
            connections[backend.database].close()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert inside.wait(10)
        began = time.monotonic()
        fired = backend.fire_schedules()
        assert time.monotonic() - began < 5  # gave up on the held one after about 2 s
        assert [f.schedule for f in fired] == ["free"]
        assert backend.fire_schedules() == []  # the held one is left alone for a while
    finally:
        release.set()
        holder.join()
    assert schedules.get("held-key", backend=backend_alias).runs == 0


@pytest.mark.parametrize("engine", ["sqlite", "postgres", "mysql"], indirect=True)
def test_old_and_new_code_syncing_together_never_fail(backend, backend_alias):
    old = [code(f"old{i}", every=60 + i) for i in range(10)]
    new = [code(f"new{i}", every=60 + i) for i in range(10)]
    errors: list[BaseException] = []

    def sync(specs) -> None:  # type: ignore[no-untyped-def]
        try:
            for _ in range(5):
                backend.sync_schedules(specs)
        except BaseException as e:
            errors.append(e)
        finally:
            connections[backend.database].close()

    threads = [threading.Thread(target=sync, args=(old if i % 2 else new,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    names = {s.name for s in schedules.all(backend=backend_alias, retired=True)}
    assert names == {s.name for s in old + new}


def test_task_enqueued_is_sent_once_per_job_a_schedule_adds(backend, backend_alias):
    from django.tasks.signals import task_enqueued

    sent: list[str] = []

    def note(sender, task_result, **kwargs):  # type: ignore[no-untyped-def]
        sent.append(task_result.id)

    task_enqueued.connect(note)
    try:
        with store_clock() as clock:
            # Five missed runs of a unique task: one job holds the key, the others share it.
            schedules.create(
                "unique-runs",
                "tests.testapp.tasks.unique_add",
                every=60,
                args=[5, 5],
                catch_up="all",
                backend=backend_alias,
            )
            schedules.create(
                "plain-runs", REPORT, every=60, args=["p"], catch_up="all", backend=backend_alias
            )
            clock.advance(5 * 60 + 1)
            fired = backend.fire_schedules()
    finally:
        task_enqueued.disconnect(note)
    jobs = {f.result_id for f in fired if f.schedule == "unique-runs"}
    plain = [f.result_id for f in fired if f.schedule == "plain-runs"]
    assert len(jobs) == 1 and len(plain) == 5
    assert sorted(sent) == sorted([*jobs, *plain])
