"""Schedules on every store: saved, fired once per due time, caught up, paused, retired."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.tasks import TaskResultStatus

from conveyor import schedules
from conveyor.exceptions import InvalidSchedule, ScheduleExists, ScheduleNotFound
from conveyor.testing import RunSummary, run_until_done, store_clock
from tests.helpers import job

REPORT = "tests.testapp.tasks.scheduled_report"


def fire(backend) -> list:  # type: ignore[no-untyped-def]
    return backend.fire_schedules()


def test_an_interval_schedule_fires_each_due_time_once(backend, backend_alias):
    with store_clock() as clock:
        info = schedules.create(
            "every-minute", REPORT, every=60, args=["a"], due_kwarg="due", backend=backend_alias
        )
        assert info.next_run_at is not None
        assert fire(backend) == []
        clock.advance(61)
        first = fire(backend)
        assert len(first) == 1 and fire(backend) == []  # a second look fires nothing
        assert first[0].due_at == info.next_run_at
        assert run_until_done(backend_alias) == RunSummary(succeeded=1)
        assert job(backend.get_result(first[0].result_id)).return_value == (
            f"a@{info.next_run_at.isoformat()}"
        )
        stored = schedules.get("every-minute", backend=backend_alias)
        assert stored.runs == 1 and stored.last_run_at == info.next_run_at
        assert stored.next_run_at == info.next_run_at + timedelta(seconds=60)


def test_catch_up_once_fires_one_run_for_all_missed(backend, backend_alias):
    with store_clock() as clock:
        schedules.create("once", REPORT, every=60, args=["x"], backend=backend_alias)
        clock.advance(60 * 10 + 1)
        fired = fire(backend)
        assert len(fired) == 1


def test_catch_up_all_fires_each_missed_run_up_to_the_limit(backend, backend_alias):
    with store_clock() as clock:
        schedules.create(
            "all",
            REPORT,
            every=60,
            args=["x"],
            catch_up="all",
            catch_up_limit=5,
            backend=backend_alias,
        )
        clock.advance(60 * 3 + 1)
        assert len(fire(backend)) == 3
        clock.advance(60 * 20)
        fired = fire(backend)
        assert len(fired) == 5
        assert [f.due_at for f in fired] == sorted(f.due_at for f in fired)


def test_catch_up_skip_drops_runs_missed_by_more_than_the_grace(backend, backend_alias):
    with store_clock() as clock:
        schedules.create(
            "skip",
            REPORT,
            every=600,
            args=["x"],
            catch_up="skip",
            grace=30,
            backend=backend_alias,
        )
        clock.advance(600 + 120)
        assert fire(backend) == []
        info = schedules.get("skip", backend=backend_alias)
        assert info.runs == 0 and info.next_run_at is not None
        clock.advance(600 - 120 + 10)
        assert len(fire(backend)) == 1


def test_names_are_unique_and_bad_input_stores_nothing(backend, backend_alias):
    schedules.create("n", REPORT, cron="0 3 * * *", args=["x"], backend=backend_alias)
    with pytest.raises(ScheduleExists):
        schedules.create("n", REPORT, cron="0 4 * * *", args=["x"], backend=backend_alias)
    bad = [
        ({"cron": "61 * * * *"}, "cron"),
        ({"every": -5}, "interval"),
        ({"cron": "0 3 * * *", "timezone": "Mars/Olympus"}, "time zone"),
    ]
    for timing, words in bad:
        with pytest.raises(InvalidSchedule, match=words):
            schedules.create("bad", REPORT, args=["x"], backend=backend_alias, **timing)
    with pytest.raises(InvalidSchedule, match="registered"):
        schedules.create("bad", "tests.testapp.tasks.nope", every=60, backend=backend_alias)
    with pytest.raises(InvalidSchedule, match="JSON"):
        schedules.create("bad", REPORT, every=60, args=[object()], backend=backend_alias)
    with pytest.raises(InvalidSchedule, match="do not fit"):
        schedules.create("bad", REPORT, every=60, args=[], backend=backend_alias)
    assert [s.name for s in schedules.all(backend=backend_alias)] == ["n"]


def test_pause_resume_delete_and_run_now(backend, backend_alias):
    with store_clock() as clock:
        schedules.create("p", REPORT, every=60, args=["p"], backend=backend_alias)
        schedules.pause("p", backend=backend_alias)
        clock.advance(600)
        assert fire(backend) == []
        result = schedules.run("p", backend=backend_alias)
        assert result.status == TaskResultStatus.READY
        schedules.resume("p", backend=backend_alias)
        assert fire(backend) == []  # runs missed while paused are dropped
        clock.advance(61)
        assert len(fire(backend)) == 1
        schedules.delete("p", backend=backend_alias)
        with pytest.raises(ScheduleNotFound):
            schedules.get("p", backend=backend_alias)


def test_repeats_end_a_schedule(backend, backend_alias):
    with store_clock() as clock:
        schedules.create("r", REPORT, every=60, args=["r"], repeats=2, backend=backend_alias)
        for _ in range(4):
            clock.advance(61)
            fire(backend)
        info = schedules.get("r", backend=backend_alias)
        assert info.runs == 2 and info.next_run_at is None and info.repeats_left == 0


def test_run_at_creation_and_once(backend, backend_alias):
    with store_clock() as clock:
        schedules.create(
            "c", REPORT, cron="0 3 * * *", args=["c"], run_at_creation=True, backend=backend_alias
        )
        assert len(fire(backend)) == 1
        at = datetime.now(UTC) + timedelta(hours=1)
        schedules.create("o", REPORT, at=at, args=["o"], backend=backend_alias)
        clock.advance(3601)
        assert [f.schedule for f in fire(backend)] == ["o"]
        assert schedules.get("o", backend=backend_alias).next_run_at is None


def test_code_schedules_sync_add_change_and_retire(backend, backend_alias):
    tt = schedules.timetable_for("code-a", cron="0 3 * * *")
    a = schedules.spec_for("code-a", REPORT, tt, args=["a"], source="code")
    b = schedules.spec_for("code-b", REPORT, tt, args=["b"], source="code")
    report = backend.sync_schedules([a, b])
    assert sorted(report.added) == ["code-a", "code-b"]
    assert backend.sync_schedules([a, b]).added == ()
    changed = schedules.spec_for("code-a", REPORT, tt, args=["a2"], source="code")
    report = backend.sync_schedules([changed])
    assert report.changed == ("code-a",) and report.retired == ("code-b",)
    assert [s.name for s in backend.schedules()] == ["code-a"]
    assert [s.name for s in backend.schedules(retired=True)] == ["code-a", "code-b"]
    with pytest.raises(InvalidSchedule, match="declared in code"):
        schedules.delete("code-a", backend=backend_alias)
    schedules.delete("code-b", backend=backend_alias)
