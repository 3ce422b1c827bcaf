"""``manage.py conveyor schedules``: list, run, pause, resume and sync, and what it refuses."""

from __future__ import annotations

import re
from collections.abc import Iterator
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.tasks import TaskResultStatus, task_backends

from conveyor import schedules
from conveyor.testing import store_clock

REPORT = "tests.testapp.tasks.scheduled_report"

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def declarations() -> Iterator[None]:
    """Only the code schedules a test declares itself; the others are put back after."""
    saved = {alias: dict(specs) for alias, specs in schedules._DECLARED.items()}
    schedules._DECLARED.clear()
    yield
    schedules._DECLARED.clear()
    schedules._DECLARED.update(saved)


def conveyor(*args: str) -> str:
    """What ``manage.py conveyor schedules ARGS`` prints."""
    out = StringIO()
    call_command("conveyor", "schedules", *args, stdout=out)
    return out.getvalue()


def line_of(output: str, name: str) -> str:
    [line] = [line for line in output.splitlines() if line.startswith(f"{name}  ")]
    return line


def code_spec(name: str, label: str, cron: str = "0 3 * * *"):  # type: ignore[no-untyped-def]
    timetable = schedules.timetable_for(name, cron=cron)
    return schedules.spec_for(name, REPORT, timetable, args=[label], source="code")


def test_list_shows_each_schedule_with_its_task_and_next_run():
    daily = schedules.create("daily", REPORT, cron="0 3 * * *", args=["d"])
    schedules.create("by-hand", REPORT, args=["h"])
    out = conveyor()
    assert out == conveyor("list")  # list is the default verb
    assert out.splitlines()[0] == "Backend 'default': 2 schedule(s)"
    assert daily.next_run_at is not None
    line = line_of(out, "daily")
    assert REPORT in line
    assert f"next {daily.next_run_at.isoformat(timespec='seconds')}" in line
    assert "last -" in line and "runs 0" in line and "[active, database]" in line
    assert "next -" in line_of(out, "by-hand")  # runs only when asked to


def test_list_on_an_empty_backend_says_so():
    assert conveyor("--backend", "memory") == "Backend 'memory': 0 schedule(s)\n"


def test_retired_code_schedules_are_listed_only_when_asked_for():
    backend = task_backends["default"]
    backend.sync_schedules([code_spec("kept", "k"), code_spec("dropped", "d")])  # type: ignore[attr-defined]
    backend.sync_schedules([code_spec("kept", "k")])  # type: ignore[attr-defined]
    out = conveyor()
    assert "kept  " in out and "dropped" not in out
    every = conveyor("--retired")
    assert every.splitlines()[0] == "Backend 'default': 2 schedule(s)"
    assert "[retired, code]" in line_of(every, "dropped")
    assert "[active, code]" in line_of(every, "kept")


def test_run_enqueues_a_job_now_and_prints_its_id():
    schedules.create("daily", REPORT, cron="0 3 * * *", args=["d"])
    out = conveyor("run", "daily")
    found = re.fullmatch(r"Schedule 'daily': enqueued job (\S+)\.\n", out)
    assert found is not None, out
    result = task_backends["default"].get_result(found.group(1))
    assert result.status == TaskResultStatus.READY
    assert result.task.module_path == REPORT and result.args == ["d"]
    info = schedules.get("daily")
    assert info.runs == 1 and info.last_result_id == found.group(1)


def test_pause_and_resume_change_the_paused_state():
    schedules.create("minutely", REPORT, every=60, args=["m"])
    assert conveyor("pause", "minutely") == "Schedule 'minutely': paused.\n"
    assert schedules.get("minutely").paused is True
    assert "[paused, database]" in line_of(conveyor(), "minutely")
    with store_clock() as clock:
        clock.advance(600)
        assert task_backends["default"].fire_schedules() == []  # type: ignore[attr-defined]
        assert conveyor("resume", "minutely") == "Schedule 'minutely': resumed.\n"
        assert schedules.get("minutely").paused is False


@pytest.mark.parametrize("verb", ["run", "pause", "resume"])
def test_an_unknown_name_is_a_command_error_naming_it(verb: str):
    schedules.create("known", REPORT, every=60, args=["k"])
    with pytest.raises(CommandError, match="No schedule 'nope' on backend 'default'"):
        conveyor(verb, "nope")
    assert schedules.get("known").runs == 0 and schedules.get("known").paused is False


def test_an_unknown_name_is_escaped_in_the_error():
    with pytest.raises(CommandError) as refused:
        conveyor("pause", "no\x1bpe")
    assert "\x1b" not in str(refused.value)


@pytest.mark.parametrize("verb", ["run", "pause", "resume"])
def test_a_verb_that_needs_a_name_refuses_to_run_without_one(verb: str):
    with pytest.raises(CommandError, match=f"`schedules {verb}` needs the NAME of a schedule"):
        conveyor(verb)


@pytest.mark.parametrize("verb", ["list", "sync"])
def test_a_verb_that_takes_no_name_refuses_one(verb: str):
    with pytest.raises(CommandError, match=f"`schedules {verb}` takes no NAME"):
        conveyor(verb, "daily")


def test_an_unknown_verb_is_refused():
    with pytest.raises(CommandError, match="invalid choice: 'explode'"):
        conveyor("explode")


def test_run_of_a_retired_code_schedule_is_refused():
    backend = task_backends["default"]
    backend.sync_schedules([code_spec("old", "o")])  # type: ignore[attr-defined]
    backend.sync_schedules([])  # type: ignore[attr-defined]
    with pytest.raises(CommandError, match="'old'"):
        conveyor("run", "old")


def test_sync_prints_what_it_added_updated_and_retired():
    schedules.declare(code_spec("code-a", "a"), "default")
    schedules.declare(code_spec("code-b", "b"), "default")
    out = conveyor("sync")
    assert out.splitlines()[0] == "Added 2, updated 0, retired 0 code schedule(s)."
    assert "Backend 'default': 2 schedule(s)" in out
    assert conveyor("sync").splitlines()[0] == "Added 0, updated 0, retired 0 code schedule(s)."

    schedules._DECLARED["default"] = {}
    schedules.declare(code_spec("code-a", "a", cron="0 4 * * *"), "default")
    out = conveyor("sync")
    assert out.splitlines()[0] == "Added 0, updated 1, retired 1 code schedule(s)."
    assert schedules.get("code-a").spec.timetable.cron == "0 4 * * *"
    assert schedules.get("code-b").retired is True
    assert "code-b" not in out
    assert "code-b" in conveyor("sync", "--retired")


def test_sync_on_another_backend_syncs_that_backends_schedules():
    schedules.declare(code_spec("mem", "m"), "memory")
    task_backends["memory"].clear()  # type: ignore[attr-defined]
    try:
        out = conveyor("sync", "--backend", "memory")
        assert out.splitlines()[0] == "Added 1, updated 0, retired 0 code schedule(s)."
        assert schedules.get("mem", backend="memory").spec.source == "code"
        assert conveyor("sync").splitlines()[0] == "Added 0, updated 0, retired 0 code schedule(s)."
    finally:
        task_backends["memory"].clear()  # type: ignore[attr-defined]


def test_a_backend_that_is_not_conveyors_is_refused():
    with pytest.raises(CommandError, match="--backend 'immediate'"):
        conveyor("--backend", "immediate")
