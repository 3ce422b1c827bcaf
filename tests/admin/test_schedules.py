"""The schedules admin: the list, its actions, and the form that checks as the API does."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.admin.models import CHANGE, LogEntry
from django.urls import reverse

from conveyor import schedules
from conveyor.backends.database.models import Job, Schedule
from tests.admin.conftest import SCHEDULES, act

pytestmark = pytest.mark.django_db

REPORT = "tests.testapp.tasks.scheduled_report"


def stored(name: str) -> Schedule:
    return Schedule.objects.get(backend_name="default", name=name)


def page(schedule: Schedule) -> str:
    return reverse("admin:conveyor_schedule_change", args=[schedule.pk])


def form(**changes: Any) -> dict[str, Any]:
    """What the add and change forms post for a nightly run of the report."""
    data = {
        "name": "nightly",
        "backend_name": "default",
        "task_path": REPORT,
        "args": '["r"]',
        "kwargs": "{}",
        "queue_name": "",
        "priority": "",
        "kind": "cron",
        "cron": "30 2 * * *",
        "every": "",
        "start_at_0": "",
        "start_at_1": "",
        "timezone": "Europe/Paris",
        "catch_up": "once",
        "catch_up_limit": "100",
        "grace": "60",
        "due_kwarg": "",
        "jitter": "0",
        "repeats": "",
    }
    return data | changes


def test_the_list_shows_every_schedule_with_its_timetable(admin_client):
    schedules.create("nightly", REPORT, cron="30 2 * * *", args=["r"], timezone="Europe/Paris")
    schedules.create("poll", REPORT, every=300, args=["p"], paused=True)
    schedules.sync()  # the code schedule of the test app
    response = admin_client.get(SCHEDULES)
    assert response.status_code == 200
    text = response.content.decode()
    assert "cron 30 2 * * * (Europe/Paris)" in text and "every 0:05:00" in text
    names = {s.name for s in response.context["cl"].result_list}
    assert names == {"nightly", "poll", "testapp-manual"}
    code = admin_client.get(SCHEDULES, {"source__exact": "code"}).context["cl"].result_list
    assert [s.name for s in code] == ["testapp-manual"]
    paused = admin_client.get(SCHEDULES, {"paused__exact": "1"}).context["cl"].result_list
    assert [s.name for s in paused] == ["poll"]
    found = admin_client.get(SCHEDULES, {"q": "nigh"}).context["cl"].result_list
    assert [s.name for s in found] == ["nightly"]


def test_pause_resume_and_run_now_are_logged(admin_client):
    schedules.create("nightly", REPORT, cron="30 2 * * *", args=["r"])
    nightly = stored("nightly")
    assert "1 schedule was paused." in act(admin_client, "pause_schedules", nightly, url=SCHEDULES)
    assert schedules.get("nightly").paused
    assert "1 schedule was resumed." in act(
        admin_client, "resume_schedules", nightly, url=SCHEDULES
    )
    assert not schedules.get("nightly").paused
    said = act(admin_client, "run_schedules_now", nightly, url=SCHEDULES)
    assert "1 schedule was run once now." in said
    [job] = Job.objects.all()
    assert job.args == ["r"] and job.task_path == REPORT
    messages = LogEntry.objects.filter(object_id=str(nightly.pk), action_flag=CHANGE)
    assert list(messages.order_by("id").values_list("change_message", flat=True)) == [
        "Paused.",
        "Resumed.",
        f"Ran once now: job {job.uuid}.",
    ]
    page_text = admin_client.get(page(nightly)).content.decode()
    assert str(job.uuid) in page_text and "on demand" in page_text  # the latest runs


def test_the_form_refuses_an_invalid_cron_and_stores_nothing(admin_client):
    schedules.create("nightly", REPORT, cron="30 2 * * *", args=["r"])
    nightly = stored("nightly")
    response = admin_client.post(page(nightly), form(cron="61 * * * *"))
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert "invalid cron expression '61 * * * *'" in " ".join(errors["cron"])
    assert "invalid cron expression" in response.content.decode()
    assert stored("nightly").cron == "30 2 * * *"
    assert not LogEntry.objects.exists()


def test_the_form_refuses_what_the_api_refuses(admin_client):
    schedules.create("nightly", REPORT, cron="30 2 * * *", args=["r"])
    nightly = stored("nightly")
    for changes, problem in (
        ({"task_path": "tests.testapp.tasks.plain_function"}, "registered tasks"),
        ({"args": '["a", "b", "c"]'}, "do not fit the task"),
        ({"args": '{"a": 1}'}, "JSON list"),
        ({"queue_name": "nowhere"}, "nowhere"),
        ({"kind": "every", "every": ""}, "interval"),
        ({"timezone": "Mars/Olympus"}, "Unknown time zone"),
        ({"grace": "1"}, "grace must be"),
    ):
        response = admin_client.post(page(nightly), form(**changes))
        assert response.status_code == 200, changes
        assert problem in str(response.context["adminform"].form.errors), changes
    assert stored("nightly").task_path == REPORT


def test_the_form_changes_and_adds_schedules_through_the_store(admin_client):
    schedules.create("nightly", REPORT, cron="30 2 * * *", args=["r"])
    nightly = stored("nightly")
    response = admin_client.post(page(nightly), form(kind="daily", cron="", **start("08:15")))
    assert response.status_code == 302, response.context and response.context["errors"]
    info = schedules.get("nightly")
    assert info.spec.timetable.kind == "daily"
    assert info.spec.timetable.start is not None
    assert info.spec.timetable.start.astimezone(info.spec.timetable.zone).hour == 8  # Paris
    assert info.next_run_at is not None

    add = reverse("admin:conveyor_schedule_add")
    response = admin_client.post(add, form(name="hourly-poll", kind="every", every="00:10:00"))
    assert response.status_code == 302
    assert schedules.get("hourly-poll").spec.timetable.every.total_seconds() == 600
    response = admin_client.post(add, form(name="hourly-poll", kind="every", every="00:10:00"))
    assert response.status_code == 200  # the name is taken
    assert Schedule.objects.filter(name="hourly-poll").count() == 1
    flags = set(LogEntry.objects.values_list("action_flag", flat=True))
    assert flags == {1, 2}  # an addition and a change


def start(at: str) -> dict[str, str]:
    return {"start_at_0": "2030-01-07", "start_at_1": at}


def test_code_schedules_are_read_only(admin_client):
    schedules.sync()
    code = stored("testapp-manual")
    response = admin_client.get(page(code))
    assert response.status_code == 200
    assert 'name="_save"' not in response.content.decode()
    assert admin_client.post(page(code), form(name="testapp-manual")).status_code == 403
    delete = reverse("admin:conveyor_schedule_delete", args=[code.pk])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403
    assert stored("testapp-manual").task_path == "tests.testapp.tasks.manual_ping"


def test_deleting_a_schedule_keeps_its_jobs(admin_client):
    schedules.create("nightly", REPORT, cron="30 2 * * *", args=["r"])
    schedules.run("nightly")
    delete = reverse("admin:conveyor_schedule_delete", args=[stored("nightly").pk])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 302
    assert not Schedule.objects.exists() and Job.objects.count() == 1


def test_schedule_actions_need_the_change_permission(staff_client):
    schedules.create("nightly", REPORT, cron="30 2 * * *", args=["r"])
    viewer = staff_client("view_schedule")
    act(viewer, "pause_schedules", stored("nightly"), url=SCHEDULES)
    act(viewer, "run_schedules_now", stored("nightly"), url=SCHEDULES)
    assert not schedules.get("nightly").paused and not Job.objects.exists()
    assert viewer.post(page(stored("nightly")), form(cron="0 3 * * *")).status_code == 403
