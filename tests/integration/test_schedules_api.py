"""``conveyor.schedules`` as an application uses it: declared in code, made at run time,
management commands on a timetable, updates, daylight-saving changes and the due time."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.tasks import TaskResultStatus, task, task_backends
from django.test import override_settings

from conveyor import clock as store_time
from conveyor import schedules
from conveyor.commands import allowed_commands, run_command
from conveyor.cron import CRON, EVERY, MANUAL
from conveyor.exceptions import InvalidSchedule
from conveyor.testing import RunSummary, StoreClock, run_until_done, store_clock

REPORT = "tests.testapp.tasks.scheduled_report"
BERLIN = ZoneInfo("Europe/Berlin")

pytestmark = pytest.mark.django_db(transaction=True)


@task()
def nightly(label: str, due: str = "") -> str:
    """A task of this module that the tests below put on timetables."""
    return f"{label}@{due}"


def plain(label: str) -> str:
    return label


@pytest.fixture(autouse=True)
def declarations() -> Iterator[None]:
    """Keep the code schedules these tests declare from reaching any other test."""
    saved = {alias: dict(specs) for alias, specs in schedules._DECLARED.items()}
    yield
    schedules._DECLARED.clear()
    schedules._DECLARED.update(saved)


@pytest.fixture(params=["default", "memory"])
def alias(request: pytest.FixtureRequest) -> Iterator[str]:
    """A database store (SQLite) and the in-process one."""
    name: str = request.param
    if name == "memory":
        task_backends[name].clear()  # type: ignore[attr-defined]
    yield name
    if name == "memory":
        task_backends[name].clear()  # type: ignore[attr-defined]


def named(name: str) -> str:
    """A pattern matching a message that names schedule ``name``."""
    return re.escape(repr(name))


def declared_names(alias: str = "default") -> list[str]:
    return sorted(spec.name for spec in schedules.declared(alias))


# --- in code ---------------------------------------------------------------------------------


def test_stacked_schedules_declare_code_schedules_of_the_task():
    decorated = schedules.schedule("nightly-a", cron="0 3 * * *", args=["a"])(
        schedules.schedule("nightly-b", every=timedelta(minutes=5), args=["b"])(
            schedules.schedule("nightly-c", args=["c"], queue_name="reports")(nightly)
        )
    )
    assert decorated is nightly  # still the task: it enqueues as before
    specs = {s.name: s for s in schedules.declared("default") if s.name.startswith("nightly-")}
    assert sorted(specs) == ["nightly-a", "nightly-b", "nightly-c"]
    for spec in specs.values():
        assert spec.task_path == nightly.module_path and spec.source == "code"
    assert specs["nightly-a"].timetable.kind == CRON and specs["nightly-a"].args == ("a",)
    assert specs["nightly-b"].timetable.kind == EVERY
    assert specs["nightly-b"].timetable.every == timedelta(minutes=5)
    assert specs["nightly-c"].timetable.kind == MANUAL
    assert specs["nightly-c"].queue_name == "reports"
    assert "nightly-a" in {s.name for s in schedules.declared()}  # every backend's, too
    assert "nightly-a" not in declared_names("memory")


def test_a_schedule_declares_on_the_backend_it_names():
    schedules.schedule("on-memory", every=60, args=["m"], backend="memory")(nightly)
    assert "on-memory" in declared_names("memory")
    assert "on-memory" not in declared_names("default")


def test_declaring_the_same_schedule_again_is_harmless_but_a_different_one_is_refused():
    schedules.schedule("dup", every=60, args=["a"])(nightly)
    schedules.schedule("dup", every=60, args=["a"])(nightly)  # a module imported twice
    assert declared_names().count("dup") == 1
    with pytest.raises(InvalidSchedule, match=named("dup")) as refused:
        schedules.schedule("dup", every=120, args=["a"])(nightly)
    assert "declared twice" in str(refused.value)
    [spec] = [s for s in schedules.declared("default") if s.name == "dup"]
    assert spec.timetable.every == timedelta(seconds=60)  # the first one stays


def test_schedule_under_task_is_refused_with_a_clear_message():
    with pytest.raises(InvalidSchedule, match=named("upside-down")) as refused:
        task()(schedules.schedule("upside-down", every=60, args=["x"])(plain))
    assert "@schedule goes above @task" in str(refused.value)
    assert "function" in str(refused.value)
    assert "upside-down" not in declared_names()


BAD = [
    pytest.param({"cron": "61 * * * *", "args": ["x"]}, "cron", id="invalid-cron"),
    pytest.param({"cron": "0 3 * *", "args": ["x"]}, "5", id="cron-four-fields"),
    pytest.param(
        {"cron": "0 3 * * *", "timezone": "Mars/Olympus", "args": ["x"]},
        "unknown time zone 'Mars/Olympus'",
        id="unknown-time-zone",
    ),
    pytest.param({"every": -5, "args": ["x"]}, "interval", id="negative-interval"),
    pytest.param({"every": 0, "args": ["x"]}, "interval", id="zero-interval"),
    pytest.param({"every": 60, "args": [object()]}, "not JSON", id="args-not-json"),
    pytest.param({"every": 60, "kwargs": {"due": {1, 2}}}, "not JSON", id="kwargs-not-json"),
    pytest.param({"every": 60, "args": []}, "do not fit", id="args-missing"),
    pytest.param({"every": 60, "args": ["x", "y", "z"]}, "do not fit", id="args-too-many"),
    pytest.param({"every": 60, "args": ["x"], "kwargs": {"nope": 1}}, "do not fit", id="kwarg"),
    pytest.param({"every": 60, "args": ["x"], "queue_name": "nope"}, "nope", id="unknown-queue"),
    pytest.param(
        {"every": 60, "args": ["x"], "catch_up": "sometimes"},
        "catch_up must be one of skip, once, all",
        id="bad-catch-up",
    ),
    pytest.param({"every": 60, "args": ["x"], "repeats": 0}, "repeats", id="repeats-zero"),
    pytest.param(
        {"cron": "0 3 * * *", "every": 60, "args": ["x"]}, "cron, every", id="cron-and-every"
    ),
    pytest.param(
        {"every": 60, "args": ["x"], "due_kwarg": "when"}, "do not fit", id="due-kwarg-not-taken"
    ),
    pytest.param(
        {"every": 60, "args": ["x"], "kwargs": {"due": "a"}, "due_kwarg": "due"},
        "in kwargs too",
        id="due-kwarg-in-kwargs",
    ),
]


@pytest.mark.parametrize(("given", "words"), BAD)
def test_bad_declarations_are_refused_naming_the_schedule(given: dict[str, Any], words: str):
    with pytest.raises(InvalidSchedule, match=named("bad-one")) as refused:
        schedules.schedule("bad-one", **given)(nightly)
    assert words in str(refused.value)
    assert "bad-one" not in declared_names()


@pytest.mark.parametrize(("given", "words"), BAD)
def test_bad_schedules_made_at_run_time_store_nothing(
    alias: str, given: dict[str, Any], words: str
):
    with pytest.raises(InvalidSchedule, match=named("bad-one")) as refused:
        schedules.create("bad-one", nightly, backend=alias, **given)
    assert words in str(refused.value)
    assert schedules.all(backend=alias, retired=True) == []


# --- management commands ---------------------------------------------------------------------


def test_schedule_command_declares_a_code_schedule_of_run_command():
    schedules.schedule_command("checks", "check", "--deploy", cron="0 4 * * *")
    [spec] = [s for s in schedules.declared("default") if s.name == "checks"]
    assert spec.task_path == schedules.COMMAND_TASK == run_command.module_path
    assert spec.args == ("check", "--deploy") and spec.source == "code"
    assert spec.timetable.kind == CRON
    assert "check" in allowed_commands()  # a code schedule allows its command


def test_schedule_command_refuses_a_command_that_does_not_exist():
    with pytest.raises(InvalidSchedule, match=named("ghost")) as refused:
        schedules.schedule_command("ghost", "no_such_command", every=60)
    assert "'no_such_command'" in str(refused.value)
    assert "ghost" not in declared_names()


def test_schedule_command_refuses_bad_timing_naming_the_schedule():
    with pytest.raises(InvalidSchedule, match=named("bad-timing")):
        schedules.schedule_command("bad-timing", "check", cron="every day")
    with pytest.raises(InvalidSchedule, match=named("bad-option")):
        schedules.schedule_command("bad-option", "check", every=60, catch_up="never")
    assert not {"bad-timing", "bad-option"} & set(declared_names())


def test_create_command_refuses_a_command_not_allowed():
    with pytest.raises(InvalidSchedule, match=named("checks")) as refused:
        schedules.create_command("checks", "check", every=60)
    assert "CONVEYOR_COMMANDS" in str(refused.value)
    with pytest.raises(InvalidSchedule, match=named("ghost")) as refused:
        schedules.create_command("ghost", "no_such_command", every=60)
    assert "no management command 'no_such_command'" in str(refused.value)
    assert schedules.all() == []


def test_an_allowed_command_is_stored_fired_and_run_returning_its_output():
    with override_settings(CONVEYOR_COMMANDS=["diffsettings"]), store_clock() as clock:
        info = schedules.create_command("diff", "diffsettings", every=60)
        assert info.spec.task_path == schedules.COMMAND_TASK
        assert info.spec.args == ("diffsettings",)
        clock.advance(61)
        [fired] = task_backends["default"].fire_schedules()  # type: ignore[attr-defined]
        assert run_until_done() == RunSummary(succeeded=1)
        result = task_backends["default"].get_result(fired.result_id)
        assert result.status == TaskResultStatus.SUCCESSFUL
        assert "TIME_ZONE = 'UTC'" in result.return_value  # what diffsettings printed
        assert "CONVEYOR_COMMANDS = ['diffsettings']" in result.return_value


def test_a_scheduled_command_no_longer_allowed_fails_instead_of_running():
    with store_clock() as clock:
        with override_settings(CONVEYOR_COMMANDS=["check"]):
            schedules.create_command("checks", "check", every=60)
        clock.advance(61)  # the setting no longer lists it when the run comes
        [fired] = task_backends["default"].fire_schedules()  # type: ignore[attr-defined]
        assert run_until_done() == RunSummary(failed=1)
    result = task_backends["default"].get_result(fired.result_id)
    assert result.status == TaskResultStatus.FAILED
    [error] = result.errors
    assert error.exception_class_path == "builtins.PermissionError"
    assert "'check' may not run as a task" in error.traceback


def test_a_run_command_job_for_a_command_not_allowed_fails():
    result = run_command.enqueue("diffsettings")  # enqueued by hand, not by a schedule
    assert run_until_done() == RunSummary(failed=1)
    result.refresh()
    assert result.status == TaskResultStatus.FAILED
    assert result.errors[0].exception_class_path == "builtins.PermissionError"


# --- update ----------------------------------------------------------------------------------


def test_update_changes_timetable_and_args_and_recomputes_the_next_run(alias: str):
    backend = task_backends[alias]
    with store_clock() as clock:
        schedules.create("u", REPORT, every=60, args=["before"], backend=alias)
        clock.advance(61)
        [first] = backend.fire_schedules()  # type: ignore[attr-defined]
        info = schedules.update("u", cron="*/5 * * * *", args=["after"], backend=alias)
        now = store_time.now()
        assert info.spec.timetable.kind == CRON and info.spec.args == ("after",)
        assert info.last_run_at == first.due_at
        assert info.next_run_at is not None
        assert info.next_run_at > now and info.next_run_at > first.due_at
        assert info.next_run_at.minute % 5 == 0 and info.next_run_at.second == 0
        assert info.next_run_at - now <= timedelta(minutes=5)
        assert schedules.get("u", backend=alias).next_run_at == info.next_run_at
        clock.advance((info.next_run_at - now).total_seconds() + 1)
        [second] = backend.fire_schedules()  # type: ignore[attr-defined]
        assert second.due_at == info.next_run_at
        assert backend.get_result(second.result_id).args == ["after"]
        assert backend.fire_schedules() == []  # type: ignore[attr-defined]


def test_update_to_a_moment_already_passed_leaves_no_next_run(alias: str):
    with store_clock() as clock:
        schedules.create("u", REPORT, every=60, args=["x"], backend=alias)
        clock.advance(61)
        task_backends[alias].fire_schedules()  # type: ignore[attr-defined]
        passed = store_time.now() - timedelta(hours=1)
        info = schedules.update("u", at=passed, backend=alias)
        assert info.next_run_at is None
        clock.advance(3600)
        assert task_backends[alias].fire_schedules() == []  # type: ignore[attr-defined]


def test_update_refuses_bad_changes_and_keeps_the_schedule(alias: str):
    schedules.create("u", REPORT, every=60, args=["x"], backend=alias)
    with pytest.raises(InvalidSchedule, match=named("u")):
        schedules.update("u", cron="not a cron", backend=alias)
    with pytest.raises(InvalidSchedule, match=named("u")):
        schedules.update("u", args=[], backend=alias)
    info = schedules.get("u", backend=alias)
    assert info.spec.timetable.every == timedelta(seconds=60) and info.spec.args == ("x",)


def test_update_of_a_code_schedule_is_refused(alias: str):
    timetable = schedules.timetable_for("from-code", cron="0 3 * * *")
    spec = schedules.spec_for("from-code", REPORT, timetable, args=["c"], source="code")
    task_backends[alias].sync_schedules([spec])  # type: ignore[attr-defined]
    try:
        with pytest.raises(InvalidSchedule, match=named("from-code")):
            schedules.update("from-code", every=60, backend=alias)
    finally:
        info = schedules.get("from-code", backend=alias)
        assert info.spec.timetable.kind == CRON and info.spec.timetable.cron == "0 3 * * *"


def test_update_of_the_time_zone_alone_keeps_the_cron(alias: str):
    schedules.create("tz", REPORT, cron="30 2 * * *", args=["x"], backend=alias)
    info = schedules.update("tz", timezone="Europe/Berlin", backend=alias)
    assert info.spec.timetable.kind == CRON and info.spec.timetable.cron == "30 2 * * *"
    assert info.spec.timetable.timezone == "Europe/Berlin"
    assert info.next_run_at is not None
    assert info.next_run_at.astimezone(BERLIN).strftime("%H:%M") == "02:30"


# --- daylight-saving changes -----------------------------------------------------------------


def move_to(clock: StoreClock, moment: datetime) -> None:
    """Move the store clock forward so that "now" is ``moment``."""
    clock.advance((moment - store_time.now()).total_seconds())


def fire_days(alias: str, clock: StoreClock, days: int, step: float) -> list[datetime]:
    """Move the store clock ``days`` days forward, ``step`` seconds at a time, firing the due
    schedules at each step; return the due times fired, in Berlin time."""
    backend = task_backends[alias]
    dues: list[datetime] = []
    for _ in range(int(days * 86400 / step)):
        clock.advance(step)
        fired = backend.fire_schedules()  # type: ignore[attr-defined]
        assert backend.fire_schedules() == []  # type: ignore[attr-defined]
        dues += [f.due_at.astimezone(BERLIN) for f in fired]
    return dues


@pytest.mark.parametrize("step", [86400, 3600], ids=["daily-steps", "hourly-steps"])
def test_a_fixed_hour_in_the_spring_gap_runs_once_just_after_it(alias: str, step: float):
    with store_clock() as clock:
        move_to(clock, datetime(2027, 3, 26, 23, 59, tzinfo=UTC))
        info = schedules.create(
            "berlin",
            REPORT,
            cron="30 2 * * *",
            timezone="Europe/Berlin",
            catch_up="all",
            args=["b"],
            backend=alias,
        )
        assert info.next_run_at == datetime(2027, 3, 27, 1, 30, tzinfo=UTC)
        dues = fire_days(alias, clock, 4, step)
    assert [d.isoformat() for d in dues] == [
        "2027-03-27T02:30:00+01:00",
        "2027-03-28T03:30:00+02:00",  # 02:30 does not exist that night: just after the gap
        "2027-03-29T02:30:00+02:00",
        "2027-03-30T02:30:00+02:00",
    ]
    assert schedules.get("berlin", backend=alias).runs == 4


@pytest.mark.parametrize("step", [86400, 3600], ids=["daily-steps", "hourly-steps"])
def test_a_fixed_hour_repeated_in_the_autumn_runs_once(alias: str, step: float):
    with store_clock() as clock:
        move_to(clock, datetime(2027, 10, 29, 23, 59, tzinfo=UTC))
        schedules.create(
            "berlin",
            REPORT,
            cron="30 2 * * *",
            timezone="Europe/Berlin",
            catch_up="all",
            args=["b"],
            backend=alias,
        )
        dues = fire_days(alias, clock, 4, step)
    assert [d.isoformat() for d in dues] == [
        "2027-10-30T02:30:00+02:00",
        "2027-10-31T02:30:00+02:00",  # the first of the two 02:30s; not the second
        "2027-11-01T02:30:00+01:00",
        "2027-11-02T02:30:00+01:00",
    ]


# --- the due time ----------------------------------------------------------------------------


def test_due_kwarg_passes_the_due_time_to_the_task(alias: str):
    backend = task_backends[alias]
    with store_clock() as clock:
        info = schedules.create(
            "with-due", nightly, every=60, args=["n"], due_kwarg="due", backend=alias
        )
        clock.advance(61)
        [fired] = backend.fire_schedules()  # type: ignore[attr-defined]
        assert fired.due_at == info.next_run_at
        stored = backend.get_result(fired.result_id)
        assert stored.args == ["n"]
        assert stored.kwargs == {"due": fired.due_at.isoformat()}
        assert datetime.fromisoformat(stored.kwargs["due"]) == info.next_run_at
        assert run_until_done(alias) == RunSummary(succeeded=1)
        assert backend.get_result(fired.result_id).return_value == f"n@{fired.due_at.isoformat()}"


def test_without_due_kwarg_the_task_gets_only_its_arguments(alias: str):
    backend = task_backends[alias]
    with store_clock() as clock:
        schedules.create("no-due", nightly, every=60, args=["n"], backend=alias)
        clock.advance(61)
        [fired] = backend.fire_schedules()  # type: ignore[attr-defined]
        stored = backend.get_result(fired.result_id)
        assert stored.args == ["n"] and stored.kwargs == {}
